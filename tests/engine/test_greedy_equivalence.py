"""Greedy tokens are identical for unified, chunked prefill (1, 7, 64 tokens), prefill -> payload
-> decode and a pool small enough to force preemption, with all-F and IndexCache plans, and equal
to full recomputation with the plain model."""

from __future__ import annotations

import pytest

from serving.engine import LLMEngine, SamplingParams
from tests.engine.conftest import GREEDY

# "FSSF": layer 1 is S right after F layer 0, so with chunked prefill the S layer's first rows of
# every chunk are those right after a chunk boundary, and they must reuse the top-k that layer 0
# computed for this chunk's tokens; layer 3 is F again after two S layers.
PLANS = [None, "FSSF"]


def spy_batches(engine: LLMEngine) -> list[list[tuple[str, int, int]]]:
    """Record each forward's rows as ("prefill" | "decode", new tokens, cached tokens)."""
    seen: list[list[tuple[str, int, int]]] = []
    run = engine.runner.run

    def wrapped(batch):
        seen.append(
            [
                ("decode" if s.num_cached >= s.num_prompt_tokens else "prefill", n, s.num_cached)
                for s, n in zip(batch.seqs, batch.num_new, strict=True)
            ]
        )
        return run(batch)

    engine.runner.run = wrapped
    return seen


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("chunk", [512, 64, 7])
def test_unified_and_chunked_match_full_recompute(model_dir, prompts, reference, plan, chunk):
    eng = LLMEngine.from_pretrained(model_dir(), plan, max_num_batched_tokens=chunk, num_blocks=16)
    batches = spy_batches(eng)
    outs = eng.generate(prompts, SamplingParams(**GREEDY))
    assert [o.token_ids for o in outs] == reference("glm_moe_dsa", plan)
    assert all(o.finish_reason == "length" for o in outs)
    if chunk < max(len(p) for p in prompts):
        # prompts really were split (a chunk continued a cached prefix), and some forward
        # mixed decode rows with a prefill chunk
        assert any(k == "prefill" and c > 0 for b in batches for k, _, c in b)
        assert any({k for k, _, _ in b} == {"prefill", "decode"} for b in batches)
    assert eng.block_manager.num_free == eng.block_manager.num_blocks


@pytest.mark.parametrize("plan", PLANS)
def test_chunk_of_one_token(model_dir, prompts, reference, plan):
    eng = LLMEngine.from_pretrained(model_dir(), plan, max_num_batched_tokens=1, num_blocks=4)
    out = eng.generate(prompts[:1], SamplingParams(**GREEDY))[0]
    assert out.token_ids == reference("glm_moe_dsa", plan)[0]


@pytest.mark.parametrize("plan", PLANS)
def test_prefill_payload_decode_matches(model_dir, prompts, reference, plan):
    pre = LLMEngine.from_pretrained(
        model_dir(), plan, role="prefill", num_blocks=8, max_num_batched_tokens=64
    )
    results = pre.prefill(prompts, SamplingParams(**GREEDY))
    assert pre.block_manager.num_free == pre.block_manager.num_blocks  # freed once exported
    ref = reference("glm_moe_dsa", plan)
    assert [r.first_token for r in results] == [r[0] for r in ref]
    assert [r.num_prompt_tokens for r in results] == [len(p) for p in prompts]
    assert all(r.finish_reason is None for r in results)
    # A decode replica with a different pool size and step budget: only the layout must agree.
    dec = LLMEngine.from_pretrained(
        model_dir(), plan, role="decode", num_blocks=12, max_num_batched_tokens=2
    )
    outs = dec.decode([r.payload for r in results], SamplingParams(**GREEDY))
    assert [o.token_ids for o in outs] == ref
    assert dec.block_manager.num_free == dec.block_manager.num_blocks


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("max_tokens", [GREEDY["max_tokens"], 40])
def test_preemption_completes_with_same_tokens(model_dir, prompts, reference, plan, max_tokens):
    """3 pages (192 slots) for prompts of 60 + 97 + 126 tokens that grow past page boundaries
    while decoding: sequences are preempted, recomputed, and still produce the same tokens."""
    sp = SamplingParams(**{**GREEDY, "max_tokens": max_tokens})
    roomy = LLMEngine.from_pretrained(model_dir(), plan, num_blocks=16).generate(prompts, sp)
    # No admission headroom: the point here is to force preemption.
    eng = LLMEngine.from_pretrained(
        model_dir(), plan, num_blocks=3, max_num_batched_tokens=64, kv_watermark=0
    )
    outs = eng.generate(prompts, sp)
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    if max_tokens == GREEDY["max_tokens"]:
        assert [o.token_ids for o in outs] == reference("glm_moe_dsa", plan)
    stats = eng.stats()
    assert stats.num_preemptions > 0
    assert eng.block_manager.num_free == 3 and stats.kv_blocks_used == 0
    assert stats.num_running == stats.num_waiting == 0


@pytest.mark.parametrize("kind", ["dsa_llama", "deepseek_v32"])
def test_other_families_unified_chunked_and_disaggregated(model_dir, prompts, reference, kind):
    """GQA k/v rows (dsa_llama) and YaRN MLA (deepseek_v32) through chunks and a payload."""
    ref = reference(kind, "FSSF")
    sp = SamplingParams(**GREEDY)
    eng = LLMEngine.from_pretrained(model_dir(kind), "FSSF", max_num_batched_tokens=7, num_blocks=8)
    assert [o.token_ids for o in eng.generate(prompts, sp)] == ref
    pre = LLMEngine.from_pretrained(model_dir(kind), "FSSF", role="prefill", num_blocks=8)
    dec = LLMEngine.from_pretrained(model_dir(kind), "FSSF", role="decode", num_blocks=8)
    outs = dec.decode([r.payload for r in pre.prefill(prompts, sp)], sp)
    assert [o.token_ids for o in outs] == ref


def test_fp8_index_keys_disaggregated_equals_unified(model_dir, prompts):
    """FP8 indexer keys carry a per-key scale through the payload; with both sides in FP8 the
    tokens equal the unified FP8 engine's."""
    sp = SamplingParams(**GREEDY)
    kw = {"index_fp8": True, "num_blocks": 8}
    unified = LLMEngine.from_pretrained(model_dir(), "FSSF", **kw).generate(prompts, sp)
    pre = LLMEngine.from_pretrained(model_dir(), "FSSF", role="prefill", **kw)
    results = pre.prefill(prompts, sp)
    assert results[0].payload.index_scale[0] is not None
    assert results[0].payload.index_scale[1] is None  # S layer: no scale rows either
    dec = LLMEngine.from_pretrained(model_dir(), "FSSF", role="decode", **kw)
    outs = dec.decode([r.payload for r in results], sp)
    assert [o.token_ids for o in outs] == [o.token_ids for o in unified]


def test_decode_role_preempts_by_recompute(model_dir, prompts):
    """A decode replica short of pages recomputes an imported request from its tokens."""
    sp = SamplingParams(**{**GREEDY, "max_tokens": 40})
    roomy = LLMEngine.from_pretrained(model_dir(), "FSSF", num_blocks=16).generate(prompts, sp)
    pre = LLMEngine.from_pretrained(model_dir(), "FSSF", role="prefill", num_blocks=8)
    dec = LLMEngine.from_pretrained(
        model_dir(), "FSSF", role="decode", num_blocks=3, max_num_batched_tokens=64, kv_watermark=0
    )
    outs = dec.decode([r.payload for r in pre.prefill(prompts, sp)], sp)
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    assert dec.stats().num_preemptions > 0 and dec.block_manager.num_free == 3
