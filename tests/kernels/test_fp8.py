"""FP8 block quantisation: the reference's contract, and the Triton kernel bit-exact against it
(on the CPU too: tests/kernels/conftest.py fixes the interpreter's fp32 -> e4m3 conversion)."""

from __future__ import annotations

import pytest
import torch

from kernels.fp8 import FP8_MAX, act_quant, hadamard


@pytest.mark.parametrize("ue8m0", [True, False])
def test_ref_roundtrip(ue8m0):
    x = torch.randn(5, 3, 256) * torch.logspace(-3, 3, 256)
    q, s = act_quant(x, 128, ue8m0, impl="ref")
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 3, 2)
    back = q.float() * s.repeat_interleave(128, -1)
    # e4m3 keeps 3 mantissa bits: half an ulp is 1/16 relative, on each block's own scale.
    blocks = x.view(5, 3, 2, 128)
    err = (back - x).view(5, 3, 2, 128).abs().amax(-1)
    assert (err <= blocks.abs().amax(-1) / 8 + 1e-12).all()
    assert q.float().abs().max() <= FP8_MAX
    if ue8m0:
        assert torch.equal(s, torch.exp2(torch.log2(s).round()))


def test_hadamard_is_orthonormal():
    h = hadamard(64)
    assert torch.allclose(h @ h.T, torch.eye(64), atol=1e-6)


I, G = pytest.mark.interpret, pytest.mark.gpu


@pytest.mark.parametrize(
    "shape, block",
    [
        pytest.param((17, 128), 128, id="T17-D128", marks=I),
        pytest.param((33, 96), 32, id="T33-D96-b32", marks=I),
        pytest.param((4097, 64, 128), 128, id="T4097-H64-D128", marks=G),
        pytest.param((77, 128), 128, id="T77-D128", marks=G),
        pytest.param((1, 7, 512), 128, id="T1-H7-D512", marks=G),
    ],
)
@pytest.mark.parametrize("ue8m0", [True, False], ids=["ue8m0", "fp32scale"])
def test_triton_bit_exact(shape, block, ue8m0, device):
    x = torch.randn(shape, device=device) * torch.logspace(-4, 4, shape[-1], device=device)
    x[0] = 0.0  # all-zero block: floor scale
    for dtype in (torch.float32, torch.bfloat16):
        q_ref, s_ref = act_quant(x.to(dtype), block, ue8m0, impl="ref")
        q, s = act_quant(x.to(dtype), block, ue8m0, impl="triton")
        assert torch.equal(s, s_ref)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
