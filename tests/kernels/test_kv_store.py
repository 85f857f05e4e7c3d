"""Triton paged-cache store: bit-exact against the reference for every cache the model keeps."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_store import store_rows

FP8 = torch.float8_e4m3fn

I, G = pytest.mark.interpret, pytest.mark.gpu
CASES = [
    pytest.param((9, 64, 1, 48), torch.float32, 77, id="mla-tiny-fp32-T77", marks=I),
    pytest.param((9, 64, 2, 16), torch.float16, 77, id="gqa-tiny-fp16-T77", marks=I),
    pytest.param((9, 64), torch.float32, 77, id="index-scale-fp32-T77", marks=I),
    pytest.param((9, 64, 32), FP8, 77, id="index-k-fp8-T77", marks=I),
    pytest.param((300, 64, 1, 576), torch.bfloat16, 5000, id="mla-bf16-T5000", marks=G),
    pytest.param((300, 64, 8, 128), torch.bfloat16, 4097, id="gqa-bf16-T4097", marks=G),
    pytest.param((300, 64, 128), FP8, 5000, id="index-k-fp8-T5000", marks=G),
    pytest.param((300, 64), torch.float32, 5000, id="index-scale-T5000", marks=G),
]


@pytest.mark.parametrize("shape, dtype, t", CASES)
def test_store_matches_ref(shape, dtype, t, device):
    cache = torch.randn(shape, device=device).to(dtype)
    rows = torch.randn(t, *shape[2:], device=device).to(dtype)
    slots = torch.randperm(shape[0] * shape[1], device=device)[:t]
    slots[::5] = -1  # padding rows are skipped
    want, got = cache.clone(), cache.clone()
    store_rows(want, rows, slots, impl="ref")
    store_rows(got, rows, slots.to(torch.int32), impl="triton")
    assert torch.equal(want.view(torch.uint8), got.view(torch.uint8))


@pytest.mark.interpret
def test_store_casts_rows_to_cache_dtype(device):
    cache = torch.zeros(2, 64, 16, dtype=torch.float16, device=device)
    rows = torch.randn(3, 16, device=device)
    store_rows(cache, rows, torch.tensor([0, 64, 127], device=device), impl="triton")
    assert torch.equal(cache[1, 63], rows[2].half()) and torch.equal(cache[1, 0], rows[1].half())


def test_triton_rejects_noncontiguous_rows():
    from kernels.kv_store import triton as ktri

    cache = torch.zeros(2, 64, 32)[..., ::2]
    with pytest.raises(ValueError, match="not contiguous"):
        ktri.store_rows(cache, torch.zeros(3, 16), torch.zeros(3, dtype=torch.int64))
