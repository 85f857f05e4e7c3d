"""Presence, frequency and repetition penalties and logit_bias take effect in the engine's batched
sampler: each penalised row's greedy tokens equal a full recomputation with the plain model that
applies the OpenAI (or vLLM) formula by hand, move in the expected direction (fewer repeats, or
more with a negative penalty; +100 forces a token, -100 bans it), and unpenalised rows of the
same batch keep their plain greedy tokens."""

from __future__ import annotations

import pytest
import torch

from model import load_model
from serving.engine import LLMEngine, SamplingParams

N = 24  # enough tokens for the tiny model's greedy output to repeat itself
BASE = {"temperature": 0.0, "max_tokens": N, "ignore_eos": True}


def penalised_greedy(model, prompt: list[int], p: SamplingParams) -> list[int]:
    """Greedy decoding by full recomputation, the sampler's logit processing written out."""
    out: list[int] = []
    for _ in range(p.max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor(prompt + out))[-1].float()
        for tok, bias in p.logit_bias:
            logits[tok] += bias
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel())
        counts = counts.float()
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            seen[torch.tensor(prompt)] = True
            r = p.repetition_penalty
            logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
        out.append(int(logits.argmax()))
    return out


def distinct(tokens: list[int]) -> int:
    return len(set(tokens))


@pytest.fixture(scope="module")
def setup(model_dir, prompts):
    model = load_model(model_dir(), dtype=torch.float32)
    eng = LLMEngine.from_pretrained(model_dir(), num_blocks=16)
    plain = [penalised_greedy(model, p, SamplingParams(**BASE)) for p in prompts[:2]]
    # The setup is repetition-heavy: plain greedy repeats tokens within N.
    assert distinct(plain[0]) < N - 4, plain[0]
    return model, eng, plain


def test_penalties_change_greedy_output_in_the_expected_direction(setup, prompts):
    model, eng, plain = setup
    cases = {
        "frequency": SamplingParams(**BASE, frequency_penalty=0.7),
        "presence": SamplingParams(**BASE, presence_penalty=0.7),
        "repetition": SamplingParams(**BASE, repetition_penalty=1.8),
        # Negative penalties encourage repeats; only frequency grows with the count.
        "frequency_neg": SamplingParams(**BASE, frequency_penalty=-0.6),
        "presence_neg": SamplingParams(**BASE, presence_penalty=-0.6),
    }
    # Unpenalised rows interleaved with the penalised ones, in one batch.
    batch = [
        (prompts[0], SamplingParams(**BASE)),
        *[(prompts[0], p) for p in cases.values()],
        (prompts[1], SamplingParams(**BASE)),
    ]
    outs = eng.generate([b[0] for b in batch], [b[1] for b in batch])
    got = {name: outs[1 + i].token_ids for i, name in enumerate(cases)}
    assert outs[0].token_ids == plain[0] and outs[-1].token_ids == plain[1]
    for name, p in cases.items():
        assert got[name] == penalised_greedy(model, prompts[0], p), name
        assert got[name] != plain[0], name
    for name in ("frequency", "presence", "repetition"):
        assert distinct(got[name]) > distinct(plain[0]), (name, got[name])
    for name in ("frequency_neg", "presence_neg"):
        assert distinct(got[name]) < distinct(plain[0]), (name, got[name])
    assert got["frequency_neg"] != got["presence_neg"]  # counts above 1 weigh in
    # The repetition penalty covers prompt tokens too: fewer of them come back.
    seen = set(prompts[0])
    assert sum(t in seen for t in got["repetition"]) < sum(t in seen for t in plain[0])


def test_logit_bias_forces_and_bans_tokens(setup, prompts):
    model, eng, plain = setup
    forced = 7  # not among the plain tokens, so the bias alone puts it there
    assert forced not in plain[0]
    banned = tuple(sorted(set(plain[0])))
    force = SamplingParams(**BASE, logit_bias={forced: 100.0})
    ban = SamplingParams(**BASE, logit_bias=dict.fromkeys(banned, -100.0))
    outs = eng.generate(
        [prompts[1], prompts[0], prompts[0], prompts[0]],
        [SamplingParams(**BASE), force, ban, SamplingParams(**BASE)],
    )
    assert outs[0].token_ids == plain[1] and outs[3].token_ids == plain[0]
    assert outs[1].token_ids == [forced] * N
    assert not set(outs[2].token_ids) & set(banned), outs[2].token_ids
    assert outs[2].token_ids == penalised_greedy(model, prompts[0], ban)
    assert eng.block_manager.num_free == eng.block_manager.num_blocks
