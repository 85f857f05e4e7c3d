"""FP8 indexer operands (Hadamard + e4m3, one pass): the reference's contract, and the Triton
kernels bit-exact against it (under the interpreter thanks to tests/kernels/conftest.py's e4m3
conversion fix, and on the GPU at the model's shapes)."""

from __future__ import annotations

import pytest
import torch

from kernels.fp8 import act_quant, hadamard
from kernels.fp8.ref import hadamard_transform
from kernels.index_fp8 import quant_index_queries, store_index_keys

FP8 = torch.float8_e4m3fn
I, G = pytest.mark.interpret, pytest.mark.gpu


def test_hadamard_transform_is_the_matrix():
    x = torch.randn(5, 3, 128) * torch.logspace(-3, 3, 128)
    ref = (x.double() @ hadamard(128, dtype=torch.float64)).float()
    assert torch.allclose(hadamard_transform(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max())
    with pytest.raises(ValueError, match="power of two"):
        hadamard_transform(torch.zeros(2, 24))


def test_ref_matches_matmul_quantisation():
    """The butterfly rotation quantises like the matmul one the model used before, up to
    one-ulp flips where fp32 rounding lands on an e4m3 rounding boundary."""
    x = torch.randn(300, 8, 128).bfloat16()
    w = torch.rand(300, 8)
    q, w2 = quant_index_queries(x, w, impl="ref")
    q0, s0 = act_quant(x.float() @ hadamard(128), 128)
    assert torch.equal(w2, w * s0[..., 0])  # power-of-two scales: the same for every row here
    diff = (q.float() - q0.float()).abs()
    assert (diff <= q0.float().abs() / 8 + 2**-9).all()
    assert (diff > 0).float().mean() < 1e-3


# (tokens, head dim, cache pages x page size, input dtype): odd token counts, a token count
# that is not a multiple of the kernel's row block, padding slots.
KEYS = [
    pytest.param(37, 32, (3, 16), torch.float32, id="T37-D32-fp32", marks=I),
    pytest.param(21, 128, (2, 16), torch.bfloat16, id="T21-D128-bf16", marks=I),
    pytest.param(4097, 128, (80, 64), torch.bfloat16, id="T4097-D128-bf16", marks=G),
    pytest.param(200_003, 128, (3200, 64), torch.bfloat16, id="T200003-D128-bf16", marks=G),
]


@pytest.mark.parametrize("t, d, pages, dtype", KEYS)
def test_store_index_keys_bit_exact(t, d, pages, dtype, device):
    k = (torch.randn(t, d, device=device) * torch.logspace(-3, 3, d, device=device)).to(dtype)
    k[1] = 0.0  # floor scale
    k[2, 0] = 1e4  # one outlier: the rotation spreads it over the row
    cache = torch.randn(*pages, d, device=device).to(FP8)
    scale = torch.rand(*pages, device=device)
    slots = torch.randperm(pages[0] * pages[1], device=device)[:t]
    slots[::5] = -1  # padding rows store nothing
    want = (cache.clone(), scale.clone())
    got = (cache.clone(), scale.clone())
    store_index_keys(k, *want, slots, impl="ref")
    store_index_keys(k, *got, slots.to(torch.int32), impl="triton")
    assert torch.equal(want[0].view(torch.uint8), got[0].view(torch.uint8))
    assert torch.equal(want[1], got[1])
    untouched = torch.ones(pages[0] * pages[1], dtype=torch.bool, device=device)
    untouched[slots[slots >= 0]] = False
    assert torch.equal(got[1].view(-1)[untouched], scale.view(-1)[untouched])


QUERIES = [
    pytest.param(7, 3, 64, torch.float32, id="T7-H3-D64-fp32", marks=I),
    pytest.param(5, 4, 128, torch.bfloat16, id="T5-H4-D128-bf16", marks=I),
    pytest.param(4097, 32, 128, torch.bfloat16, id="T4097-H32-D128-bf16", marks=G),
    pytest.param(1, 64, 128, torch.bfloat16, id="T1-H64-D128-bf16", marks=G),
]


@pytest.mark.parametrize("t, h, d, dtype", QUERIES)
def test_quant_index_queries_bit_exact(t, h, d, dtype, device):
    q = (torch.randn(t, h, d, device=device) * 3).to(dtype)
    q[0, 0] = 0.0
    w = torch.randn(t, h, device=device)
    q_ref, w_ref = quant_index_queries(q, w, impl="ref")
    q_tri, w_tri = quant_index_queries(q, w, impl="triton")
    assert q_tri.shape == (t, h, d) and q_tri.dtype == FP8
    assert torch.equal(q_ref.view(torch.uint8), q_tri.view(torch.uint8))
    assert torch.equal(w_ref, w_tri)


def test_errors_name_the_field():
    cache = torch.zeros(2, 16, 32, dtype=FP8)
    scale = torch.zeros(2, 16)
    slots = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="k_cache must be float8_e4m3fn"):
        store_index_keys(torch.zeros(3, 32), cache.float(), scale, slots)
    with pytest.raises(ValueError, match="head dim must be a power of two"):
        store_index_keys(torch.zeros(3, 24), cache, scale, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_index_keys(torch.zeros(3, 32), cache, scale, slots[:2])
    with pytest.raises(ValueError, match="weights must be fp32"):
        quant_index_queries(torch.zeros(3, 2, 32), torch.zeros(3, 3))
