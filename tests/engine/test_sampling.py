"""Sampler (top-k, top-p, seeds), logprobs, stop token ids, stop strings, detokenization."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model import load_model
from model.tokenizer import Tokenizer
from serving.engine import LLMEngine, SamplingParams
from serving.engine.detokenizer import Detokenizer
from serving.engine.sampler import filter_top_k_top_p, sample
from tests.engine.conftest import GREEDY


def test_top_k_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]] * 3))
    out = filter_top_k_top_p(logits, torch.tensor([2, 5, 5]), torch.tensor([1.0, 0.6, 0.7]))
    kept = torch.isfinite(out)
    assert kept[0].tolist() == [True, True, False, False, False]  # top_k=2
    assert kept[1].tolist() == [True, True, False, False, False]  # 0.5 < 0.6 -> take 0.2 too
    assert kept[2].tolist() == [True, True, False, False, False]  # 0.7 reached exactly
    assert torch.equal(out[kept], logits[kept])
    shuffled = logits[:1, [3, 0, 4, 1, 2]]  # order in the vocabulary does not matter
    assert torch.isfinite(
        filter_top_k_top_p(shuffled, torch.tensor([2]), torch.tensor([1.0]))
    ).tolist() == [[False, True, False, True, False]]


def test_sample_follows_the_distribution_and_the_seed():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    p = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    draws = [int(sample(logits, [p], [g])) for _ in range(2000)]
    freq = [draws.count(i) / 2000 for i in range(3)]
    assert abs(freq[0] - 0.7) < 0.05 and abs(freq[1] - 0.2) < 0.05
    a = [int(sample(logits, [p], [torch.Generator().manual_seed(7)])) for _ in range(5)]
    assert len(set(a)) == 1  # same seed, same draw
    greedy = SamplingParams(temperature=0)
    rows = torch.log(torch.tensor([[0.1, 0.9], [0.6, 0.4]]))
    assert sample(rows, [greedy, greedy], [None, None]).tolist() == [1, 0]
    top1 = SamplingParams(temperature=5.0, top_k=1)
    assert int(sample(logits, [top1], [torch.Generator().manual_seed(3)])) == 0


def test_seeded_sampling_is_reproducible_across_batches_and_roles(model_dir, prompts):
    sp = SamplingParams(
        temperature=0.9, top_p=0.9, top_k=50, seed=11, max_tokens=6, ignore_eos=True
    )
    eng = LLMEngine.from_pretrained(model_dir(), "FSSF", num_blocks=8)
    alone = eng.generate(prompts[:1], sp)[0].token_ids
    other = dataclasses.replace(sp, seed=12)
    batched = eng.generate([prompts[0], prompts[1], prompts[0]], [sp, sp, other])
    assert batched[0].token_ids == alone and batched[1].token_ids != alone
    assert batched[2].token_ids != alone  # another seed on the same prompt
    pre = LLMEngine.from_pretrained(model_dir(), "FSSF", role="prefill", num_blocks=8)
    dec = LLMEngine.from_pretrained(model_dir(), "FSSF", role="decode", num_blocks=8)
    out = dec.decode([pre.prefill(prompts[:1], sp)[0].payload], sp)[0]
    assert out.token_ids == alone  # the generator state travels in the payload


def test_logprobs_are_the_models_distribution(model_dir, prompts):
    eng = LLMEngine.from_pretrained(model_dir(), num_blocks=4)
    out = eng.generate(prompts[:1], SamplingParams(**{**GREEDY, "max_tokens": 2}, logprobs=3))[0]
    model = load_model(model_dir(), dtype=torch.float32)
    with torch.no_grad():
        lp = model(torch.tensor(prompts[0] + out.token_ids[:1])).log_softmax(-1)
    assert len(out.logprobs) == 2
    for i, entry in enumerate(out.logprobs):
        row = lp[len(prompts[0]) - 1 + i]
        assert entry.token_id == out.token_ids[i]
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)
        assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()
        assert entry.top[0][0] == entry.token_id  # greedy picks the most likely token


def test_stop_token_ids_and_stop_strings(model_dir, prompts):
    eng = LLMEngine.from_pretrained(model_dir(), num_blocks=4)
    sp = SamplingParams(**{**GREEDY, "max_tokens": 30})  # random weights: enough printable text
    full = eng.generate(prompts[:1], sp)[0]
    stop_tok = full.token_ids[4]
    cut = full.token_ids.index(stop_tok) + 1
    out = eng.generate(prompts[:1], dataclasses.replace(sp, stop_token_ids=(stop_tok,)))[0]
    assert out.token_ids == full.token_ids[:cut] and out.finish_reason == "stop"
    text = full.text
    stop = next(text[i : i + 2] for i in range(1, len(text) - 1) if "\ufffd" not in text[i : i + 2])
    out = eng.generate(prompts[:1], dataclasses.replace(sp, stop=(stop, "never-there")))[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]
    assert stop not in out.text
    eos = eng.generate(prompts[:1], dataclasses.replace(sp, ignore_eos=False))[0]
    assert eos.finish_reason == ("stop" if 4 in full.token_ids else "length")


def test_detokenizer_streams_utf8_and_holds_back_stop_prefixes(model_dir):
    tok = Tokenizer.from_pretrained(model_dir())
    text = "héllo wörld, ça va? 日本"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # multi-byte characters span several byte tokens
    d = Detokenizer(tok, SamplingParams())
    pieces = []
    for t in ids:
        d.add(t)
        pieces.append(d.delta(final=False))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)

    d = Detokenizer(tok, SamplingParams(stop=("wör",)))
    streamed, stopped = "", False
    for t in ids:
        stopped = d.add(t)
        streamed += d.delta(final=stopped)
        if stopped:
            break
    assert stopped and streamed == "héllo " and d.text == "héllo "


@pytest.mark.parametrize("n, vocab", [(1, 261), (3, 320), (16, 49157), (5, 64)])
def test_fused_bitmask_equals_the_plain_ops(n, vocab):
    """The grammar mask's fused path (llguidance's compiled helper, once it has compiled in the
    background) and the plain ops mask exactly the same entries, odd vocabularies (a partial
    last word) included."""
    from serving.engine import grammar

    g = torch.Generator().manual_seed(vocab)
    words = torch.randint(-(2**31), 2**31 - 1, (n, grammar.mask_words(vocab)), generator=g)
    words = words.to(torch.int32)
    logits = torch.randn(n, vocab, generator=g)
    fused, plain = logits.clone(), logits.clone()
    helper = grammar.FUSED.wait(logits.device)
    assert helper is not None, "the fused mask did not compile on this machine"
    grammar.apply_bitmask(fused, words)
    plain.masked_fill_(~grammar.allowed_from_bitmask(words, vocab), float("-inf"))
    assert torch.equal(fused, plain)
    bit = (words[:, torch.arange(vocab) >> 5] >> (torch.arange(vocab) & 31).to(torch.int32)) & 1
    assert torch.equal(torch.isinf(plain), bit == 0)
