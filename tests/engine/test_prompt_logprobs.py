"""Prompt logprobs (opt-in, `SamplingParams.prompt_logprobs`): every prompt token's logprob and
top-k equal a full recomputation of the prompt's log-softmax with the plain model, whatever the
chunking, beside batch-mates that do not ask (their tokens unchanged), after a prefix-cache hit
would have skipped rows, and from a prefill engine; requests that do not ask pay nothing."""

from __future__ import annotations

import pytest
import torch

from model import load_model
from serving.engine import LLMEngine, SamplingParams
from tests.engine.conftest import GREEDY

K = 3


@pytest.fixture(scope="module")
def full_logprobs(model_dir, prompts):
    model = load_model(model_dir(), dtype=torch.float32)
    with torch.no_grad():
        return [model(torch.tensor(p)).float().log_softmax(-1) for p in prompts]


def check(got, prompt: list[int], lp: torch.Tensor, k: int = K) -> None:
    assert len(got) == len(prompt) and got[0] is None  # nothing predicts the first token
    for i in range(1, len(prompt)):
        row, entry = lp[i - 1], got[i]
        assert entry.token_id == prompt[i]
        assert entry.logprob == pytest.approx(float(row[prompt[i]]), abs=1e-4), i
        top = row.topk(k)
        assert [t for t, _ in entry.top] == top.indices.tolist(), i
        assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("chunk", [512, 7])
def test_prompt_logprobs_equal_full_recompute(model_dir, prompts, reference, full_logprobs, chunk):
    eng = LLMEngine.from_pretrained(model_dir(), max_num_batched_tokens=chunk, num_blocks=16)
    asks = SamplingParams(**GREEDY, prompt_logprobs=K)
    outs = eng.generate(prompts, [asks, SamplingParams(**GREEDY), asks])
    for i in (0, 2):
        check(outs[i].prompt_logprobs, prompts[i], full_logprobs[i])
    assert outs[1].prompt_logprobs is None
    assert [o.token_ids for o in outs] == reference()  # generation itself is unchanged
    assert eng.block_manager.num_free == eng.block_manager.num_blocks


def test_prompt_logprobs_skip_the_prefix_cache_and_come_with_the_first_output(
    model_dir, prompts, full_logprobs
):
    eng = LLMEngine.from_pretrained(model_dir(), num_blocks=16)
    eng.generate(prompts[2:], SamplingParams(**GREEDY))  # its full pages are cached now
    assert eng.cached_prefix_tokens(prompts[2]) > 0
    eng.add_request("r", prompts[2], SamplingParams(**GREEDY, prompt_logprobs=0))
    firsts = []
    while eng.has_unfinished():
        firsts += [o for o in eng.step() if o.request_id == "r" and o.token_ids]
    check(firsts[0].prompt_logprobs, prompts[2], full_logprobs[2], k=0)
    assert all(o.prompt_logprobs is None for o in firsts[1:])  # sent once


def test_prompt_logprobs_from_a_prefill_engine(model_dir, prompts, full_logprobs):
    pre = LLMEngine.from_pretrained(model_dir(), role="prefill", num_blocks=8)
    dec = LLMEngine.from_pretrained(model_dir(), role="decode", num_blocks=8)
    sp = SamplingParams(**GREEDY, prompt_logprobs=K)
    res = pre.prefill(prompts[:1], sp)[0]
    check(res.prompt_logprobs, prompts[0], full_logprobs[0])
    out = dec.decode([res.payload], sp)[0]
    assert out.prompt_logprobs is None  # the decode side never recomputes the prompt


def test_no_prompt_logits_unless_asked(model_dir, prompts):
    """Without the option a prefill chunk that does not finish the prompt computes no logits, and
    a finishing one only its last row's."""
    eng = LLMEngine.from_pretrained(model_dir(), max_num_batched_tokens=32, num_blocks=8)
    sizes = []
    run = eng.runner.run

    def spy(batch):
        logits, sampling, prompt = run(batch)
        sizes.append((0 if logits is None else logits.shape[0], len(sampling), prompt))
        return logits, sampling, prompt

    eng.runner.run = spy
    eng.generate(prompts[:1], SamplingParams(**GREEDY))
    assert all(n == s and not p for n, s, p in sizes), sizes
    sizes.clear()
    eng.generate(prompts[:1], SamplingParams(**GREEDY, prompt_logprobs=1))
    assert sum(n - s for n, s, _ in sizes) == len(prompts[0]) - 1  # each prompt row once


def test_prompt_logprobs_survive_preemption_and_chunks_stay_capped(
    model_dir, prompts, reference, full_logprobs
):
    """3 pages for three growing requests force preemption, one of them in the middle of its
    prompt (recomputation skips the rows already recorded); max_num_seqs 4 caps each
    prompt-logprob chunk at 4 rows, while the request that does not ask prefills at once."""
    eng = LLMEngine.from_pretrained(
        model_dir(), num_blocks=3, max_num_batched_tokens=64, kv_watermark=0, max_num_seqs=4
    )
    rows, mid_prompt = [], []
    run, preempt = eng.runner.run, eng.scheduler._preempt

    def spy(batch):
        logits, sampling, prompt = run(batch)
        rows.extend(n for _, _, n in prompt)
        return logits, sampling, prompt

    def spy_preempt(seq):
        mid_prompt.append(seq.prompt_logits_pending)
        preempt(seq)

    eng.runner.run, eng.scheduler._preempt = spy, spy_preempt
    sp = SamplingParams(**GREEDY, prompt_logprobs=K)
    outs = eng.generate(prompts, [SamplingParams(**GREEDY), sp, sp])
    assert any(mid_prompt), mid_prompt
    for out, p, lp in zip(outs[1:], prompts[1:], full_logprobs[1:], strict=True):
        check(out.prompt_logprobs, p, lp)
    assert [o.token_ids for o in outs] == reference()
    assert max(rows) <= 4 and sum(rows) == sum(len(p) - 1 for p in prompts[1:])
    assert eng.block_manager.num_free == 3
