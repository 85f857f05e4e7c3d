"""Radix-select row top-k against torch.topk, on score distributions that stress each level:
spread, a large common offset, heavy exact ties, and first-level bins too full for the
candidate buffer (the fallback that re-reads the row)."""

from __future__ import annotations

import pytest
import torch

from kernels.testing import assert_topk_close
from kernels.topk import ref as tref
from kernels.topk import topk_rows
from kernels.topk import triton as ttri


def scores_of(kind: str, rows: int, width: int, device) -> torch.Tensor:
    x = torch.randn(rows, width, device=device)
    if kind == "offset":  # a common offset: raw float bits would put everything in one bin
        return x + 1000.0
    if kind == "ties":  # few distinct values: the threshold key is shared by many columns
        return (x * 2).round() / 2
    if kind == "zeros":
        return torch.zeros_like(x)
    return x


def _check(kind, rows, width, topk, device, **kw):
    s = scores_of(kind, rows, width, device)
    lengths = torch.randint(0, width + 1, (rows,), device=device, dtype=torch.int32)
    lengths[0], lengths[-1] = width, min(width, topk)  # full row, exactly topk visible
    lengths[rows // 2] = 1
    out = ttri.topk_rows(s, lengths, topk, **kw) if kw else topk_rows(s, lengths, topk,
                                                                        impl="triton")
    ref = tref.topk_rows(s, lengths, topk)
    visible = torch.arange(width, device=device)[None, :] < lengths[:, None]
    assert_topk_close(ref, out, s.masked_fill(~visible, float("-inf")), lengths)


@pytest.mark.interpret
@pytest.mark.parametrize("kind", ["normal", "offset", "ties", "zeros"])
def test_small(kind, device):
    _check(kind, 9, 300, 24, device)


@pytest.mark.interpret
def test_candidate_overflow_fallback(device):
    _check("normal", 5, 300, 24, device, cap=8)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["normal", "offset", "ties", "zeros"])
@pytest.mark.parametrize("width, topk", [(65536, 2048), (4099, 2048), (20000, 512)],
                         ids=["W65536-topk2048", "W4099-topk2048", "W20000-topk512"])
def test_wide(kind, width, topk, device):
    _check(kind, 33, width, topk, device)


@pytest.mark.gpu
def test_wide_fallback(device):
    _check("normal", 17, 65536, 2048, device, cap=256)


def test_ref_pads_and_stays_causal():
    s = torch.tensor([[3.0, 1.0, 2.0, 9.0], [5.0, 4.0, 0.0, 7.0]])
    out = tref.topk_rows(s, torch.tensor([3, 1], dtype=torch.int32), 2)
    assert sorted(out[0].tolist()) == [0, 2]
    assert out[1].tolist() == [0, -1]
