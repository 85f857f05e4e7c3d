"""`indexcache make-tiny` writes a loadable checkpoint whose tokenizer round-trips text."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from model import load_model
from model.tiny import KINDS
from model.tokenizer import Tokenizer


@pytest.mark.parametrize("kind", KINDS)
def test_make_tiny_cli_end_to_end(kind, tmp_path):
    out = tmp_path / kind
    r = subprocess.run(
        [sys.executable, "-m", "serving.cli.__main__", "make-tiny", "--kind", kind, str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    tok = Tokenizer.from_pretrained(out)
    text = "Hello, wörld! 1+1=2"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|user|>hi<|end|><|assistant|>"
    assert tok.eos_token_ids == (tok.tok.token_to_id("<|end|>"),)
    model = load_model(out, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor(tok.encode(prompt)))
    assert logits.shape == (len(tok.encode(prompt)), model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_generate_cli(tiny_dir):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.cli.__main__",
            "generate",
            "--model",
            tiny_dir("glm_moe_dsa"),
            "--chat",
            "--max-tokens",
            "4",
            "hi",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("'hi' -> ")


def test_cli_reports_bad_input(tiny_dir):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.cli.__main__",
            "generate",
            "--model",
            tiny_dir("glm_moe_dsa"),
            "--max-tokens",
            "0",
            "hi",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--max-tokens must be >= 1" in r.stderr
