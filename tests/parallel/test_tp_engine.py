"""The tensor-parallel engine on CPU: rank 0 drives (scheduler, pages, sampling) and broadcasts
each step; the other ranks run the same forwards on their shards. Greedy tokens equal the
single-process engine's, with chunked prefill mixing prefill and decode rows, an S-layer plan
and expert parallelism, and so do the prompt logprobs one request asks for (its prompt rows join
the broadcast step's logits rows); a prefill -> payload -> decode round trip imports into every
rank."""

from __future__ import annotations

import pytest
import torch

from tests.engine.conftest import GREEDY, HEADS, PROMPT_LENS
from tests.parallel.spawn import run_ranks

SETTINGS = {"max_num_batched_tokens": 64, "num_blocks": 16}


def _params():
    """Greedy; the second prompt (two chunks, beside the others) asks for prompt logprobs."""
    from serving.engine import SamplingParams

    return [SamplingParams(**GREEDY, prompt_logprobs=3 if i == 1 else None) for i in range(3)]


def _results(outs):
    return [(o.token_ids, o.prompt_logprobs) for o in outs]


def _same_results(got, want) -> None:
    for (tokens, lps), (want_tokens, want_lps) in zip(got, want, strict=True):
        assert tokens == want_tokens, f"TP engine tokens {tokens} != single-process {want_tokens}"
        assert (lps is None) == (want_lps is None)
        for a, b in zip(lps or [], want_lps or [], strict=True):
            if b is None:
                assert a is None
                continue
            assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top]
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-4)


def _prompts():
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(5, 300, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _drive(par, path, plan, want, result_file):
    from serving.engine.tp import start_rank

    settings = {**SETTINGS, "tensor_parallel_size": par.size, "expert_parallel": True}
    # start_rank joins its own group: leave the one run_ranks made
    torch.distributed.destroy_process_group()
    eng = start_rank(path, plan, settings, par.rank, result_file + ".rdv", "gloo", 60)
    if eng is None:
        return  # a follower: served every forward until the driver shut down
    try:
        _same_results(_results(eng.generate(_prompts(), _params())), want)
        assert eng.block_manager.num_free == eng.block_manager.num_blocks
    finally:
        eng.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("plan", [None, "FSSF"])
def test_tp2_engine_greedy_equals_single_process(plan, tiny_dir, tmp_path):
    from serving.engine import LLMEngine

    path = tiny_dir("glm_moe_dsa", **HEADS)
    single = LLMEngine.from_pretrained(path, plan, **SETTINGS)
    want = _results(single.generate(_prompts(), _params()))
    assert want[1][1] is not None and want[0][1] is None
    run_ranks(2, _drive, path, plan, want, f"file://{tmp_path}/x", timeout_s=150)


def _drive_disaggregated(par, path, payloads, want, rdv):
    """A TP prefill replica's payloads decode on one process, and a TP decode replica imports a
    one-process prefill's payloads (into every rank's cache): both give the unified tokens."""
    from serving.engine import LLMEngine, SamplingParams
    from serving.engine.tp import start_rank

    torch.distributed.destroy_process_group()
    greedy = SamplingParams(**GREEDY)
    for i, role in enumerate(("prefill", "decode")):
        settings = {**SETTINGS, "role": role, "tensor_parallel_size": par.size}
        eng = start_rank(path, None, settings, par.rank, f"{rdv}.{i}", "gloo", 60)
        if eng is not None:
            try:
                if role == "prefill":
                    results = eng.prefill(_prompts(), greedy)
                    single = LLMEngine.from_pretrained(path, None, role="decode", **SETTINGS)
                    outs = single.decode([r.payload for r in results], greedy)
                else:
                    outs = eng.decode(payloads, greedy)
                got = [o.token_ids for o in outs]
                assert got == want, f"{role} on {par.size} ranks: {got} != {want}"
            finally:
                eng.shutdown()  # leaves the group: the next role joins a new one
        assert not torch.distributed.is_initialized()


@pytest.mark.slow
def test_tp2_prefill_and_decode_replicas(tiny_dir, tmp_path):
    from serving.engine import LLMEngine, SamplingParams

    path = tiny_dir("glm_moe_dsa", **HEADS)
    greedy = SamplingParams(**GREEDY)
    want = [
        o.token_ids
        for o in LLMEngine.from_pretrained(path, **SETTINGS).generate(_prompts(), greedy)
    ]
    pre = LLMEngine.from_pretrained(path, role="prefill", **SETTINGS)
    payloads = [r.payload for r in pre.prefill(_prompts(), greedy)]
    run_ranks(2, _drive_disaggregated, path, payloads, want, f"file://{tmp_path}/pd", timeout_s=150)
