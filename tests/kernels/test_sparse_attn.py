"""Triton sparse attention against the reference over a named grid: MLA in absorbed form (v a view
of the key rows), grouped-query attention, odd head dims, prefill (packed varlen) and decode
(one query per sequence, split over the index list and merged)."""

from __future__ import annotations

import pytest
import torch

from kernels.sparse_attn import sparse_attn_decode, sparse_attn_prefill
from kernels.sparse_attn import triton as stri
from kernels.testing import assert_close, attn_inputs, ratio_for

_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
interpret, gpu = pytest.mark.interpret, pytest.mark.gpu


def case(n_q, lens, heads, kv_heads, dk, dv, topk, dtype, mla, *marks):
    kind = "mla" if mla else f"gqa{kv_heads}"
    name = (
        f"B{len(lens)}-T{sum(n_q)}-L{max(lens)}-H{heads}-{kind}-D{dk}x{dv}-topk{topk}-"
        f"{_NAMES[dtype]}"
    )
    return pytest.param(n_q, lens, heads, kv_heads, dk, dv, topk, dtype, mla, id=name, marks=marks)


PREFILL = [
    # tiny MLA shape of the test checkpoints: 32 latent + 16 rope, value = latent view
    case([5, 3], [70, 130], 4, 1, 48, 32, 40, torch.float32, True, interpret),
    case([7, 1], [7, 1], 4, 2, 16, 16, 16, torch.float16, False, interpret),
    case([4], [100], 6, 2, 24, 20, 33, torch.float32, False, interpret),  # odd dims
    case([77, 1, 40], [77, 1, 3000], 64, 1, 576, 512, 2048, torch.bfloat16, True, gpu),
    case([50], [5000], 128, 1, 576, 512, 2048, torch.bfloat16, True, gpu),  # 2 head groups
    case([33, 64], [33, 2000], 16, 1, 576, 512, 512, torch.float16, True, gpu),
    case([77, 40], [77, 4000], 64, 8, 128, 128, 2048, torch.bfloat16, False, gpu),
    case([77, 40], [77, 4000], 20, 4, 128, 128, 256, torch.float16, False, gpu),
    case([30], [300], 12, 3, 96, 80, 100, torch.float32, False, gpu),
]

DECODE = [
    case([1], [100], 4, 1, 48, 32, 40, torch.float32, True, interpret),
    case([1] * 3, [1, 65, 200], 4, 2, 16, 16, 64, torch.float16, False, interpret),
    case([1], [70000], 64, 1, 576, 512, 2048, torch.bfloat16, True, gpu),
    case([1] * 5, [1, 64, 65, 3000, 70000], 64, 1, 576, 512, 2048, torch.bfloat16, True, gpu),
    case(
        [1] * 64,
        [4096 + 7 * i for i in range(64)],
        128,
        1,
        576,
        512,
        2048,
        torch.bfloat16,
        True,
        gpu,
    ),
    case([1] * 7, [100 * i + 1 for i in range(7)], 32, 8, 128, 128, 512, torch.float16, False, gpu),
]


def _inputs(n_q, lens, heads, kv_heads, dk, dv, topk, dtype, mla, device):
    inp = attn_inputs(n_q, lens, heads, kv_heads, dk, dv, topk, dtype, device, mla=mla)
    inp["indices"][0, : topk // 2] = -1  # a row with holes among the valid slots
    return inp


@pytest.mark.parametrize("n_q, lens, heads, kv_heads, dk, dv, topk, dtype, mla", PREFILL)
def test_prefill(n_q, lens, heads, kv_heads, dk, dv, topk, dtype, mla, device):
    inp = _inputs(n_q, lens, heads, kv_heads, dk, dv, topk, dtype, mla, device)
    scale = dk**-0.5
    ref = sparse_attn_prefill(**inp, scale=scale, impl="ref")
    out = sparse_attn_prefill(**inp, scale=scale, impl="triton")
    assert out.dtype == dtype
    assert_close("sparse_attn_prefill", ref.float(), out.float(), ratio_for(dtype))


@pytest.mark.parametrize("n_q, lens, heads, kv_heads, dk, dv, topk, dtype, mla", DECODE)
@pytest.mark.parametrize("splits", [None, 1, 3], ids=["auto-split", "split1", "split3"])
def test_decode(n_q, lens, heads, kv_heads, dk, dv, topk, dtype, mla, splits, device):
    inp = _inputs(n_q, lens, heads, kv_heads, dk, dv, topk, dtype, mla, device)
    inp.pop("cu_seqlens_q")
    ref = sparse_attn_decode(**inp, scale=0.1, impl="ref")
    out = stri.sparse_attn_decode(**inp, scale=0.1, splits=splits)
    assert_close("sparse_attn_decode", ref.float(), out.float(), ratio_for(dtype))


@pytest.mark.interpret
def test_row_without_valid_index_is_zero(device):
    inp = _inputs([3], [50], 4, 1, 48, 32, 16, torch.float32, True, device)
    inp["indices"][1] = -1
    out = sparse_attn_prefill(**inp, scale=0.2, impl="triton")
    assert out[1].abs().max().item() == 0.0
    dec = stri.sparse_attn_decode(
        inp["q"][1:2],
        inp["k_cache"],
        inp["v_cache"],
        inp["block_tables"],
        inp["seq_lens"],
        inp["indices"][1:2],
        0.2,
        splits=2,
    )
    assert dec.abs().max().item() == 0.0 and not torch.isnan(dec).any()


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", range(len(stri.WIDE_CONFIGS)))
def test_mla_every_config(cfg, device):
    inp = _inputs([40, 9], [40, 3000], 64, 1, 576, 512, 2048, torch.bfloat16, True, device)
    ref = sparse_attn_prefill(**inp, scale=0.07, impl="ref")
    out = stri.sparse_attn_prefill(**inp, scale=0.07, config=stri.WIDE_CONFIGS[cfg])
    assert_close("sparse_attn_prefill", ref.float(), out.float(), ratio_for(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", range(len(stri.NARROW_CONFIGS)))
def test_gqa_every_config(cfg, device):
    inp = _inputs([40, 9], [40, 3000], 32, 4, 128, 128, 1024, torch.bfloat16, False, device)
    ref = sparse_attn_prefill(**inp, scale=0.07, impl="ref")
    out = stri.sparse_attn_prefill(**inp, scale=0.07, config=stri.NARROW_CONFIGS[cfg])
    assert_close("sparse_attn_prefill", ref.float(), out.float(), ratio_for(torch.bfloat16))
