"""Fused MoE over FP8 experts: Triton against the reference over a named grid, the reference
against a per-token loop from the formula, closeness to the bf16-weight op on the dequantised
experts, validation, and (GPU) DeepSeek-V3.2 shapes. Case: (T, E, top-k, d, I, routing)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.fp8 import act_quant
from kernels.fp8_gemm import dequant_weight
from kernels.moe import fused_moe, fused_moe_fp8
from kernels.testing import assert_close, ratio_for

interpret, gpu = pytest.mark.interpret, pytest.mark.gpu
E4M3 = torch.float8_e4m3fn


def quant_experts(w: torch.Tensor):
    """[E, N, K] fp32 -> e4m3 and per-expert 128 x 128 block scales [E, N/128, K/128]."""
    e, n, k = w.shape
    blocks = w.view(e, n // 128, 128, k // 128, 128)
    s = blocks.abs().amax((2, 4)) / 448 * torch.logspace(-1, 1, e, device=w.device)[:, None, None]
    q = (blocks / s[:, :, None, :, None]).clamp(-448, 448).to(E4M3).view(e, n, k)
    return q, s


def make(t, e, k, d, i, routing, device, dtype=torch.float32):
    x = (torch.randn(t, d, device=device) * torch.logspace(-1, 1, d, device=device)).to(dtype)
    wg, sg = quant_experts(torch.randn(e, 2 * i, d) * d**-0.5)
    wd, sd = quant_experts(torch.randn(e, d, i) * i**-0.5)
    if routing == "spread":
        ids = torch.rand(t, e).topk(k, dim=1).indices
    else:
        ids = torch.tensor([1, e - 1])[torch.randint(0, 2, (t, k))]
    w = torch.rand(t, k)
    return tuple(a.to(device) for a in (x, wg, sg, wd, sd, w, ids.int()))


def case(t, e, k, d, i, routing="spread", dtype=torch.float32):
    name = f"T{t}-E{e}-k{k}-d{d}-I{i}-{routing}-{str(dtype)[6:]}"
    return pytest.param(t, e, k, d, i, routing, dtype, id=name)


GRID = [
    case(1, 4, 2, 128, 128),
    case(7, 8, 2, 256, 128),  # odd T; two K blocks in gate_up
    case(19, 4, 3, 128, 256, "two"),  # two experts get every slot, a token repeats one
    case(5, 4, 4, 256, 256, "spread", torch.float16),
    case(0, 4, 2, 128, 128),
]


@interpret
@pytest.mark.parametrize("t, e, k, d, i, routing, dtype", GRID)
@pytest.mark.parametrize("ue8m0", [True, False], ids=["ue8m0", "fp32scale"])
def test_triton_matches_ref(t, e, k, d, i, routing, dtype, ue8m0, device):
    inp = make(t, e, k, d, i, routing, device, dtype)
    want = fused_moe_fp8(*inp, ue8m0, impl="ref")
    got = fused_moe_fp8(*inp, ue8m0, impl="triton")
    assert got.shape == (t, d) and got.dtype == dtype
    if t:
        # fp32: both quantise identical values (measured <= 5e-7); fp16: the intermediate's
        # rounding to x's dtype (the interpreter's is not torch's) can move an e4m3 step
        ratio = ratio_for(E4M3 if dtype == torch.float32 else dtype)
        assert_close("moe fp8", want.float(), got.float(), ratio)


def test_ref_matches_per_token_formula():
    x, wg, sg, wd, sd, w, ids = make(3, 4, 2, 128, 128, "spread", "cpu")
    ids[1] = torch.tensor([2, 2], dtype=torch.int32)
    out = fused_moe_fp8(x, wg, sg, wd, sd, w, ids, False, impl="ref")
    xq, xs = act_quant(x, 128, False, impl="ref")
    xd = xq.float() * xs.repeat_interleave(128, 1)
    for t in range(3):
        want = torch.zeros(128)
        for j in range(2):
            e = int(ids[t, j])
            gu = dequant_weight(wg[e], sg[e]) @ xd[t]
            h = F.silu(gu[:128]) * gu[128:]
            hq, hs = act_quant(h[None], 128, False, impl="ref")
            want += w[t, j] * (dequant_weight(wd[e], sd[e]) @ (hq.float() * hs)[0])
        torch.testing.assert_close(out[t], want, rtol=1e-5, atol=1e-5)


def test_close_to_dequantised_bf16_op():
    """Against the plain op on the dequantised experts: only activation rounding differs."""
    x, wg, sg, wd, sd, w, ids = make(9, 4, 2, 256, 128, "spread", "cpu")
    dq = [
        torch.stack([dequant_weight(a[e], s[e]) for e in range(4)]) for a, s in ((wg, sg), (wd, sd))
    ]
    plain = fused_moe(x, dq[0], dq[1], w, ids, impl="ref")
    assert_close("fp8 vs dequantised", plain, fused_moe_fp8(x, wg, sg, wd, sd, w, ids), 0.06)


@pytest.mark.parametrize(
    "idx, bad, match",
    [
        (1, lambda a: a.float(), "w_gate_up must be float8_e4m3fn"),
        (2, lambda a: a[:, :1], r"w_gate_up_scale must be fp32 \[4, 2, 1\]"),
        (4, lambda a: a.double(), "w_down_scale must be fp32"),
        (0, lambda a: a[:, :64], "w_gate_up must be"),
        (6, lambda a: a[:2], "topk_ids must be"),
    ],
    ids=["w_gate_up-dtype", "gu-scale-shape", "down-scale-dtype", "x-wrong-d", "ids-wrong-T"],
)
def test_validation(idx, bad, match):
    inp = list(make(3, 4, 2, 128, 128, "spread", "cpu"))
    inp[idx] = bad(inp[idx])
    with pytest.raises(ValueError, match=match):
        fused_moe_fp8(*inp)


def test_validation_needs_whole_blocks():
    x = torch.randn(2, 64)
    wg, wd = torch.zeros(4, 256, 64, dtype=E4M3), torch.zeros(4, 64, 128, dtype=E4M3)
    with pytest.raises(ValueError, match="d=64 and I=128 must be positive multiples of 128"):
        fused_moe_fp8(
            x,
            wg,
            torch.ones(4, 2, 1),
            wd,
            torch.ones(4, 1, 1),
            torch.rand(2, 2),
            torch.zeros(2, 2, dtype=torch.int64),
        )


@pytest.fixture(scope="module")
def deepseek_experts():
    """DeepSeek-V3.2's expert shape (d 7168, I 2048), 32 of its 256 experts (memory)."""
    e, d, i = 32, 7168, 2048
    wg, sg = quant_experts(torch.randn(e, 2 * i, d, device="cuda") * d**-0.5)
    wd, sd = quant_experts(torch.randn(e, d, i, device="cuda") * i**-0.5)
    yield wg, sg, wd, sd
    torch.cuda.empty_cache()


@gpu
@pytest.mark.parametrize("t", [1, 5, 64, 513, 4096])
def test_gpu_deepseek_shape(t, deepseek_experts):
    k, d = 8, 7168
    x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(t, 32, device="cuda").topk(k, dim=1).indices
    args = (x, *deepseek_experts, torch.rand(t, k, device="cuda"), ids)
    want = fused_moe_fp8(*args, impl="ref")
    got = fused_moe_fp8(*args, impl="triton")
    assert_close(f"moe fp8 T={t}", want.float(), got.float(), ratio_for(torch.bfloat16))
