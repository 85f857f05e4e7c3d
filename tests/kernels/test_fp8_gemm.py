"""Block-scaled FP8 GEMM: the reference against a per-block loop written from the formula,
Triton against the reference over a named grid (odd M, K multiples of 128, N multiples of 128
and not), fp8_linear against full precision, validation errors, and (GPU) DeepSeek-V3.2
projection shapes. Each case: (M tokens, N out features, K in features, out dtype)."""

from __future__ import annotations

import pytest
import torch

from kernels.fp8 import act_quant
from kernels.fp8_gemm import fp8_gemm, fp8_linear
from kernels.fp8_gemm import ref as gref
from kernels.testing import assert_close, ratio_for

interpret, gpu = pytest.mark.interpret, pytest.mark.gpu
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
E4M3 = torch.float8_e4m3fn


def case(m, n, k, out=torch.float32, marks=()):
    return pytest.param(m, n, k, out, id=f"M{m}-N{n}-K{k}-{_NAMES[out]}", marks=marks)


def make(m, n, k, device, ue8m0=True):
    x = torch.randn(m, k, device=device) * torch.logspace(-2, 2, k, device=device)
    w = torch.randn(n, k, device=device) * 0.05
    xq, xs = act_quant(x, 128, ue8m0, impl="ref")
    # weight blocks with scales of very different magnitude: a swapped scale index shows
    nb, kb = -(-n // 128), k // 128
    ws = torch.logspace(-3, 1, nb * kb, device=device)[torch.randperm(nb * kb)].view(nb, kb)
    wq = (w / gref.dequant_weight(torch.ones(n, k, device=device), ws)).to(E4M3)
    return xq, xs, wq, ws.float()


def test_ref_matches_block_loop():
    m, n, k = 5, 200, 384
    a, a_s, b, b_s = make(m, n, k, "cpu")
    want = torch.zeros(m, n, dtype=torch.float64)
    for kb in range(k // 128):
        ks = slice(kb * 128, (kb + 1) * 128)
        for nb in range(-(-n // 128)):
            ns = slice(nb * 128, min(n, (nb + 1) * 128))
            dot = a[:, ks].double() @ b[ns, ks].double().T
            want[:, ns] += dot * a_s[:, kb, None].double() * b_s[nb, kb].double()
    assert_close("ref", want, gref.fp8_gemm(a, a_s, b, b_s, torch.float32), 1e-6)


GRID = [
    case(1, 128, 128),  # one token, one block each way
    case(7, 200, 256),  # N not a multiple of 128 (nor of the tile)
    case(33, 256, 384, marks=interpret),
    case(17, 72, 512),  # N below one block (kv_a_proj's 576 = 4.5 blocks, scaled down)
    case(19, 160, 128, torch.bfloat16),
    case(0, 128, 256),
]


@pytest.mark.parametrize("m, n, k, out", GRID)
@interpret
def test_triton_matches_ref(m, n, k, out, device):
    a, a_s, b, b_s = make(m, n, k, device)
    want = fp8_gemm(a, a_s, b, b_s, out, impl="ref")
    got = fp8_gemm(a, a_s, b, b_s, out, impl="triton")
    assert got.dtype == out and got.shape == (m, n)
    if m:
        assert_close(
            "fp8_gemm", want.float(), got.float(), ratio_for(E4M3 if out == torch.float32 else out)
        )


@pytest.mark.parametrize("ue8m0", [True, False], ids=["ue8m0", "fp32scale"])
@pytest.mark.parametrize("impl", ["ref", pytest.param("triton", marks=interpret)])
def test_fp8_linear_close_to_full_precision(impl, ue8m0, device):
    """Quantised both ways the product stays within e4m3's rounding of the fp32 product."""
    x = torch.randn(3, 5, 256, device=device)
    w = torch.randn(136, 256, device=device) * 0.05
    nb = -(-136 // 128)
    ws = w.abs().view(-1).new_zeros(nb, 2)
    for i in range(nb):
        for j in range(2):
            ws[i, j] = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].abs().amax() / 448
    wq = (w / gref.dequant_weight(torch.ones_like(w), ws)).to(E4M3)
    bias = torch.randn(136, device=device)
    y = fp8_linear(x, wq, ws, bias, ue8m0, impl=impl)
    assert y.shape == (3, 5, 136) and y.dtype == torch.float32
    exact = torch.nn.functional.linear(x, w, bias)
    assert_close("fp8_linear", exact, y, 0.05)  # two e4m3 roundings: ~2^-4 relative each


def test_validation_names_the_field():
    a, a_s, b, b_s = make(4, 128, 256, "cpu")
    with pytest.raises(ValueError, match="K=200"):
        fp8_gemm(torch.zeros(4, 200, dtype=E4M3), a_s, b, b_s)
    with pytest.raises(ValueError, match="a_scale"):
        fp8_gemm(a, a_s[:, :1], b, b_s)
    with pytest.raises(ValueError, match="b_scale"):
        fp8_gemm(a, a_s, b, b_s.double())
    with pytest.raises(ValueError, match="b must be"):
        fp8_gemm(a, a_s, b.float(), b_s)
    with pytest.raises(ValueError, match="out_dtype"):
        fp8_gemm(a, a_s, b, b_s, torch.int32)
    with pytest.raises(ValueError, match="last dim"):
        fp8_linear(torch.randn(2, 128), b, b_s)


# DeepSeek-V3.2 projections (hidden 7168): q_a, q_b, kv_a (N=576: 4.5 blocks), o, dense MLP
# gate/up and down, and o_proj's TP=8 shard.
GPU_GRID = [
    case(m, n, k, torch.bfloat16, marks=gpu)
    for m in (1, 77, 4096)
    for n, k in (
        (1536, 7168),
        (24576, 1536),
        (576, 7168),
        (7168, 16384),
        (18432, 7168),
        (7168, 18432),
        (7168, 2048),
    )
]


@pytest.mark.parametrize("m, n, k, out", GPU_GRID)
def test_triton_matches_ref_deepseek_shapes(m, n, k, out, device):
    a, a_s, b, b_s = make(m, n, k, device)
    want = fp8_gemm(a, a_s, b, b_s, torch.float32, impl="ref")
    got = fp8_gemm(a, a_s, b, b_s, out, impl="triton")
    assert_close("fp8_gemm", want, got.float(), ratio_for(out))
