"""Engine test set-up: tiny checkpoints, prompts long enough for sparsity, and the greedy
reference (full recomputation with the plain model, no cache), computed once per session."""

from __future__ import annotations

import pytest
import torch

from model import load_model

# The tiny configs have 4 indexer heads: a key whose relu(q.k) is 0 on all 4 heads (1 in 16) scores
# exactly 0, and torch.topk orders exact ties by the tensor's length, so a full forward and a
# chunked one may keep different tied keys. 16 heads make exact ties vanishingly rare; the keys
# each path keeps are then defined, and greedy equality is a real check.
HEADS = {"index_n_heads": 16}
# Beyond index_topk=16, so every layer attends sparsely; 60 and 126 cross a page boundary
# (64 tokens) within N_GEN generated tokens.
PROMPT_LENS = (60, 97, 126)
N_GEN = 6
GREEDY = {"temperature": 0.0, "max_tokens": N_GEN, "ignore_eos": True}


@pytest.fixture(scope="session")
def model_dir(tiny_dir):
    def get(kind: str = "glm_moe_dsa") -> str:
        return tiny_dir(kind, **HEADS)

    return get


@pytest.fixture(scope="session")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(5, 300, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="session")
def reference(model_dir, prompts):
    """reference(kind, plan) -> greedy tokens of every prompt by full recomputation."""
    done: dict = {}

    def get(kind: str = "glm_moe_dsa", plan: str | None = None) -> list[list[int]]:
        if (kind, plan) not in done:
            model = load_model(model_dir(kind), plan, dtype=torch.float32)
            outs = []
            with torch.no_grad():
                for p in prompts:
                    out: list[int] = []
                    for _ in range(N_GEN):
                        out.append(int(model(torch.tensor(p + out))[-1].argmax()))
                    outs.append(out)
            done[kind, plan] = outs
        return done[kind, plan]

    return get
