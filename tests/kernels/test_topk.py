"""Row top-k (sampled bracket + radix select) against torch.topk, on score distributions that
stress it: spread, a large common offset, heavy exact ties, all equal; rows short enough for the
direct exact path, rows long enough for the bracket, and brackets that must miss (the fallback
that re-reads the row). `misses` counts the rows that took the fallback, so each test also
checks which path ran."""

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


def _check(kind, rows, width, topk, device, **kw) -> int:
    """Compare with the reference; returns how many rows took the fallback."""
    s = scores_of(kind, rows, width, device)
    lengths = torch.randint(0, width + 1, (rows,), device=device, dtype=torch.int32)
    lengths[0], lengths[-1] = width, min(width, topk)  # full row, exactly topk visible
    lengths[rows // 2] = 1
    misses = torch.zeros(1, dtype=torch.int32, device=device)
    out = ttri.topk_rows(s, lengths, topk, misses=misses, **kw)
    ref = tref.topk_rows(s, lengths, topk)
    visible = torch.arange(width, device=device)[None, :] < lengths[:, None]
    assert_topk_close(ref, out, s.masked_fill(~visible, float("-inf")), lengths)
    return int(misses.item())


@pytest.mark.interpret
@pytest.mark.parametrize("kind", ["normal", "offset", "ties", "zeros"])
def test_short_rows_exact_path(kind, device):
    assert _check(kind, 9, 300, 24, device) == 0


@pytest.mark.interpret
@pytest.mark.parametrize("kind", ["normal", "offset"])
def test_bracket_path(kind, device):
    """cap 64 < 300 keys: rows take the sampled bracket, which holds for smooth data."""
    assert _check(kind, 9, 300, 24, device, cap=64) == 0


@pytest.mark.interpret
def test_bracket_miss_falls_back(device):
    """A bracket wider than the buffer (cap 8), or inverted (z < 0), must still give the top-k."""
    assert _check("normal", 5, 300, 24, device, cap=8) > 0
    assert _check("ties", 5, 300, 24, device, cap=64, z=-4.0) > 0


def test_public_op_dispatches(device):
    s = torch.randn(3, 50, device=device)
    lengths = torch.tensor([50, 3, 0], dtype=torch.int32, device=device)
    assert torch.equal(topk_rows(s, lengths, 4, impl="ref"), tref.topk_rows(s, lengths, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["normal", "offset", "ties", "zeros"])
@pytest.mark.parametrize(
    "width, topk",
    [(65536, 2048), (4099, 2048), (20000, 512)],
    ids=["W65536-topk2048", "W4099-topk2048", "W20000-topk512"],
)
def test_wide(kind, width, topk, device):
    misses = _check(kind, 33, width, topk, device)
    if kind in ("normal", "offset"):
        assert misses <= 1  # ~2e-4 per row and side


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", range(len(ttri.CONFIGS)))
def test_every_config(cfg, device):
    assert _check("normal", 20, 30000, 2048, device, config=ttri.CONFIGS[cfg]) <= 1
    assert _check("ties", 20, 30000, 2048, device, config=ttri.CONFIGS[cfg], cap=512) > 0


@pytest.mark.gpu
def test_wide_fallback(device):
    assert _check("normal", 17, 65536, 2048, device, cap=256) > 0


@pytest.mark.gpu
def test_triton_op_dispatches(device):
    s = torch.randn(5, 9000, device=device)
    lengths = torch.tensor([9000, 3, 0, 2048, 5000], dtype=torch.int32, device=device)
    out = topk_rows(s, lengths, 2048, impl="triton")
    assert_topk_close(tref.topk_rows(s, lengths, 2048), out, s, lengths)


def test_ref_pads_and_stays_causal():
    s = torch.tensor([[3.0, 1.0, 2.0, 9.0], [5.0, 4.0, 0.0, 7.0]])
    out = tref.topk_rows(s, torch.tensor([3, 1], dtype=torch.int32), 2)
    assert sorted(out[0].tolist()) == [0, 2]
    assert out[1].tolist() == [0, -1]
