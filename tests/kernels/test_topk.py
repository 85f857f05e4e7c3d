"""Row top-k against the reference, exactly: the same set of columns in every row, ties included
(the lower column wins), on score distributions that stress it: spread, a large common offset,
heavy exact ties, all equal, signed zeros. Both Triton paths: one program per row (rows short
enough for the direct exact select, rows long enough for the sampled bracket, brackets that must
miss: `misses` counts the rows that took the fallback, so each test also checks which path ran),
and several programs per row (kernels/topk/split.py), over ragged lengths."""

from __future__ import annotations

import pytest
import torch

from kernels.testing import assert_topk_close
from kernels.topk import ref as tref
from kernels.topk import split as tsplit
from kernels.topk import topk_rows
from kernels.topk import triton as ttri


def scores_of(kind: str, rows: int, width: int, device) -> torch.Tensor:
    x = torch.randn(rows, width, device=device)
    if kind == "offset":  # a common offset: raw float bits would put everything in one bin
        return x + 1000.0
    if kind == "ties":  # few distinct values: the threshold key is shared by many columns
        return (x * 2).round() / 2
    if kind == "zeros":  # half +0.0, half -0.0: equal scores, so the lowest columns win
        return torch.where(x > 0, 0.0, -0.0)
    return x


def lengths_of(rows: int, width: int, topk: int, device) -> torch.Tensor:
    lengths = torch.randint(0, width + 1, (rows,), dtype=torch.int32)
    lengths[0], lengths[-1] = width, min(width, topk)  # full row, exactly topk visible
    lengths[rows // 2] = 1
    if rows > 3:
        lengths[1], lengths[2] = 0, min(width, topk + 1)
    return lengths.to(device)


def assert_same_sets(ref: torch.Tensor, out: torch.Tensor) -> None:
    ref, out = ref.cpu().sort(1).values, out.cpu().sort(1).values
    bad = (ref != out).any(1)
    assert not bad.any(), f"top-k sets differ from the reference in rows {bad.nonzero()[:8]}"


def _check(kind, rows, width, topk, device, **kw) -> int:
    """Compare with the reference (on the CPU: its stable sort is the spec); returns how many
    rows took the one-program fallback."""
    s = scores_of(kind, rows, width, device)
    lengths = lengths_of(rows, width, topk, device)
    misses = torch.zeros(1, dtype=torch.int32, device=device)
    out = ttri.topk_rows(s, lengths, topk, misses=misses, **kw)
    ref = tref.topk_rows(s.cpu(), lengths.cpu(), topk)
    visible = torch.arange(width)[None, :] < lengths.cpu()[:, None]
    assert_topk_close(ref, out, s.cpu().masked_fill(~visible, float("-inf")), lengths)
    assert_same_sets(ref, out)
    return int(misses.item())


@pytest.mark.interpret
@pytest.mark.parametrize("kind", ["normal", "offset", "ties", "zeros"])
def test_short_rows_exact_path(kind, device):
    assert _check(kind, 9, 300, 24, device, splits=1) == 0


@pytest.mark.interpret
@pytest.mark.parametrize("kind", ["normal", "offset"])
def test_bracket_path(kind, device):
    """cap 64 < 300 keys: rows take the sampled bracket, which holds for smooth data."""
    assert _check(kind, 9, 300, 24, device, cap=64, splits=1) == 0


@pytest.mark.interpret
def test_bracket_miss_falls_back(device):
    """A bracket wider than the buffer (cap 8), or inverted (z < 0), must still give the top-k."""
    assert _check("normal", 5, 300, 24, device, cap=8, splits=1) > 0
    assert _check("ties", 5, 300, 24, device, cap=64, z=-4.0, splits=1) > 0


# (kind, rows, width, topk, splits): odd widths and part counts, a part per few columns,
# ties straddling part boundaries, more parts than a short row fills.
SPLIT = [
    pytest.param("normal", 1, 301, 24, 5, id="B1-W301-topk24-S5-normal"),
    pytest.param("ties", 4, 257, 40, 3, id="B4-W257-topk40-S3-ties"),
    pytest.param("zeros", 3, 130, 17, 4, id="B3-W130-topk17-S4-zeros"),
    pytest.param("offset", 2, 200, 64, 2, id="B2-W200-topk64-S2-offset"),
]


@pytest.mark.interpret
@pytest.mark.parametrize("kind, rows, width, topk, splits", SPLIT)
def test_split_path(kind, rows, width, topk, splits, device):
    assert _check(kind, rows, width, topk, device, splits=splits) == 0


@pytest.mark.interpret
def test_split_output_is_in_column_order(device):
    s = scores_of("ties", 2, 150, device)
    lengths = torch.tensor([150, 90], dtype=torch.int32, device=device)
    out = ttri.topk_rows(s, lengths, 20, splits=3).cpu()
    assert torch.equal(out, out.sort(1).values)
    assert torch.equal(out, tref.topk_rows(s.cpu(), lengths.cpu(), 20).sort(1).values)


def test_splits_follow_the_shape():
    cpu = torch.device("cpu")  # counts as 132 SMs (an H200)
    assert tsplit.splits_for(1, 200_000, cpu) == tsplit.MAX_SPLITS
    assert tsplit.splits_for(64, 200_000, cpu) == 4
    assert tsplit.splits_for(16, 20_000, cpu) == 16
    assert tsplit.splits_for(300, 200_000, cpu) == 1  # many rows: one program each
    assert tsplit.splits_for(1, 4096, cpu) == 1  # narrow rows: one program each


def test_public_op_dispatches(device):
    s = torch.randn(3, 50, device=device)
    lengths = torch.tensor([50, 3, 0], dtype=torch.int32, device=device)
    assert torch.equal(topk_rows(s, lengths, 4, impl="ref"), tref.topk_rows(s, lengths, 4))


def test_ref_ties_go_to_lower_columns():
    s = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, -0.0, 0.0]])
    lengths = torch.tensor([7], dtype=torch.int32)
    assert tref.topk_rows(s, lengths, 2).tolist() == [[1, 2]]
    assert sorted(tref.topk_rows(s, lengths, 6)[0].tolist()) == [0, 1, 2, 3, 4, 5]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["normal", "offset", "ties", "zeros"])
@pytest.mark.parametrize(
    "width, topk",
    [(65536, 2048), (4099, 2048), (20000, 512)],
    ids=["W65536-topk2048", "W4099-topk2048", "W20000-topk512"],
)
def test_wide(kind, width, topk, device):
    misses = _check(kind, 33, width, topk, device, splits=1)
    if kind in ("normal", "offset"):
        assert misses <= 1  # ~2e-4 per row and side


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["normal", "offset", "ties", "zeros"])
@pytest.mark.parametrize(
    "rows, width",
    [(1, 200_000), (16, 131_072), (64, 200_000), (3, 65_537)],
    ids=["B1-W200K", "B16-W128K", "B64-W200K", "B3-W65537"],
)
def test_split_wide(kind, rows, width, device):
    """The decode shapes: as many programs per row as the shape gives (kernels/topk/split.py)."""
    assert tsplit.splits_for(rows, width, device) > 1
    _check(kind, rows, width, 2048, device)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", range(len(tsplit.SPLIT_CONFIGS)))
def test_every_split_config(cfg, device):
    _check("ties", 5, 100_003, 2048, device, config=tsplit.SPLIT_CONFIGS[cfg])


@pytest.mark.gpu
def test_wide_200k_brackets_hold(device):
    """The one-program path at 200K keys: the candidate buffer grows with the width
    (topk.triton.cap_for), so smooth rows almost never miss."""
    assert _check("normal", 64, 200_000, 2048, device, splits=1) <= 1


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", range(len(ttri.CONFIGS)))
def test_every_config(cfg, device):
    assert _check("normal", 20, 30000, 2048, device, config=ttri.CONFIGS[cfg], splits=1) <= 1
    kw = dict(config=ttri.CONFIGS[cfg], cap=512, splits=1)
    assert _check("ties", 20, 30000, 2048, device, **kw) > 0


@pytest.mark.gpu
def test_wide_fallback(device):
    assert _check("normal", 17, 65536, 2048, device, cap=256, splits=1) > 0


@pytest.mark.gpu
def test_triton_op_dispatches(device):
    s = torch.randn(5, 9000, device=device)
    lengths = torch.tensor([9000, 3, 0, 2048, 5000], dtype=torch.int32, device=device)
    out = topk_rows(s, lengths, 2048, impl="triton")
    assert_same_sets(tref.topk_rows(s.cpu(), lengths.cpu(), 2048), out)


def test_ref_pads_and_stays_causal():
    s = torch.tensor([[3.0, 1.0, 2.0, 9.0], [5.0, 4.0, 0.0, 7.0]])
    out = tref.topk_rows(s, torch.tensor([3, 1], dtype=torch.int32), 2)
    assert sorted(out[0].tolist()) == [0, 2]
    assert out[1].tolist() == [0, -1]
