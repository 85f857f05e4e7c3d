"""The converted SmolLM2 is the real model: Austen perplexity, tokenizer, a sensible chat answer."""

from __future__ import annotations

import math

import pytest
import torch

from model.tokenizer import Tokenizer

# The first 168 tokens of Pride and Prejudice as the janeaustenr package stores it (public domain).
PRIDE = (
    "PRIDE AND PREJUDICE\n\nBy Jane Austen\n\n\n\nChapter 1\n\n\nIt is a truth universally "
    "acknowledged, that a single man in possession\nof a good fortune, must be in want of a "
    "wife.\n\nHowever little known the feelings or views of such a man may be on his\nfirst "
    "entering a neighbourhood, this truth is so well fixed in the minds\nof the surrounding "
    "families, that he is considered the rightful property\nof some one or other of their "
    'daughters.\n\n"My dear Mr. Bennet," said his lady to him one day, "have you heard '
    'that\nNetherfield Park is let at last?"\n\nMr. Bennet replied that he had not.\n\n"But '
    'it is," returned she; "for Mrs. Long has just been here, and she'
)


def _ppl(model, ids: list[int]) -> float:
    x = torch.tensor(ids)[None]
    with torch.no_grad():
        logits = model(x)[0, :-1]
    return math.exp(torch.nn.functional.cross_entropy(logits, x[0, 1:]).item())


@pytest.mark.slow
def test_perplexity_on_austen(smollm_dir, smollm_fp32):
    ids = Tokenizer.from_pretrained(smollm_dir).encode(PRIDE)
    assert len(ids) == 168
    ppl = _ppl(smollm_fp32, ids)
    assert 20 < ppl < 25, ppl  # 22.5 with the GGUF's own fp32 weights (data.md); bf16 on disk
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))
    shuffled = [ids[i] for i in perm]
    assert _ppl(smollm_fp32, shuffled) > 20 * ppl


@pytest.mark.slow
def test_chat_answer_names_paris(smollm_dir, smollm_fp32):
    tok = Tokenizer.from_pretrained(smollm_dir)
    ids = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    )
    out = []
    with torch.no_grad():
        for _ in range(12):
            nxt = int(smollm_fp32(torch.tensor(ids + out)[None])[0, -1].argmax())
            if nxt in tok.eos_token_ids:
                break
            out.append(nxt)
    assert "Paris" in tok.decode(out)


@pytest.mark.slow
def test_tokenizer_matches_transformers_gguf_reader(smollm_dir, monkeypatch):
    """Independent rebuild: transformers' own GGUF tokenizer gives the same ids."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from model.gguf import smollm2_gguf_path

    path = smollm2_gguf_path()
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = Tokenizer.from_pretrained(smollm_dir)
    texts = [
        PRIDE,
        "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n",
        "naïve café — “quotes” \t tabs  double  spaces\n\n\nend",
        "def f(x):\n    return x**2",
    ]
    for t in texts:
        assert ours.encode(t) == theirs(t, add_special_tokens=False).input_ids
        assert ours.decode(ours.encode(t), skip_special_tokens=False) == t
    assert ours.encode("<|im_start|>") == [1] and ours.encode("2024") == ours.encode(
        "2"
    ) + ours.encode("0") + ours.encode("2") + ours.encode("4")
