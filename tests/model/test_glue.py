"""The model's glue functions trace into one graph each (what torch.compile needs to fuse them on
the GPU) and the traced function equals the eager one, at several token counts."""

from __future__ import annotations

import sys

import pytest
import torch

from model import load_model
from model.layers import glue


@pytest.fixture(scope="module")
def traced_model(tiny_dir):
    return load_model(tiny_dir("glm_moe_dsa", index_n_heads=16), "FSFS", dtype=torch.float32)


def _capture(model, t: int) -> dict:
    """Run a forward of t tokens and record each glue function's arguments."""
    calls: dict = {}
    originals = {f.__name__: f for f in glue._registry}

    def spy(f):
        def call(*a, **k):
            calls.setdefault(f.__name__, (a, k))
            return f.eager(*a, **k)

        return call

    mods = [m for n, m in list(sys.modules.items()) if n.startswith("model.") and m is not glue]
    patched = []
    for m in mods:
        for name, f in originals.items():
            if getattr(m, name, None) is f:
                setattr(m, name, spy(f))
                patched.append((m, name, f))
    try:
        ids = torch.randint(0, model.config.vocab_size, (t,))
        with torch.no_grad():
            model(ids)
    finally:
        for m, name, f in patched:
            setattr(m, name, f)
    return calls


@pytest.mark.parametrize("t", [1, 5, 33])
def test_glue_traces_whole_and_matches_eager(traced_model, t):
    calls = _capture(traced_model, t)
    assert set(calls) == {f.__name__ for f in glue._registry}  # every glue function ran
    torch._dynamo.reset()
    for name, (args, kwargs) in calls.items():
        fn = next(f for f in glue._registry if f.__name__ == name).eager
        traced = torch.compile(fn, backend="eager", fullgraph=True, dynamic=True)
        with torch.no_grad():
            want, got = fn(*args, **kwargs), traced(*args, **kwargs)
        want = want if isinstance(want, tuple) else (want,)
        got = got if isinstance(got, tuple) else (got,)
        for w, g in zip(want, got, strict=True):
            assert torch.equal(w, g), name


def test_compile_switch_is_cuda_only(traced_model):
    glue.set_compile(True)
    try:
        x = torch.randn(3, 8)
        assert torch.equal(
            glue.rms_norm(x, torch.ones(8), 1e-6), glue.rms_norm.eager(x, torch.ones(8), 1e-6)
        )
        assert glue.rms_norm.state["compiled"] is None  # CPU tensors never compile
    finally:
        glue.set_compile(False)
