"""Triton indexer (scores + causal top-k) against the reference, over a named grid.

Each case: (n_q per sequence, keys per sequence after the step, heads, dim, topk, dtype). Query
rows are each sequence's last tokens, so n_q < seq_len is chunked prefill over a cached prefix.
"""

from __future__ import annotations

import pytest
import torch

from kernels._common import cdiv
from kernels.indexer import indexer_topk_decode, indexer_topk_prefill
from kernels.indexer import ref as iref
from kernels.indexer import triton as itri
from kernels.testing import assert_topk_close, indexer_inputs, query_positions

FP8 = torch.float8_e4m3fn
_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", FP8: "fp8"}


def case(n_q, lens, heads, dim, topk, dtype, *marks):
    name = f"B{len(lens)}-T{sum(n_q)}-L{max(lens)}-H{heads}-topk{topk}-{_NAMES[dtype]}"
    return pytest.param(n_q, lens, heads, dim, topk, dtype, id=name, marks=marks)


interpret, gpu = pytest.mark.interpret, pytest.mark.gpu

PREFILL = [
    # interpreter subset: T not a multiple of the tile, a page boundary (64) inside the rows
    case([77], [77], 4, 32, 16, torch.float32, interpret),
    # varlen with a length-1 sequence, a cached prefix, topk above the visible keys
    case([1, 30, 5], [1, 130, 64], 4, 32, 64, torch.float16, interpret),
    case([77, 40], [77, 300], 20, 64, 64, torch.bfloat16, gpu),
    case([1, 200, 129], [1, 2000, 129], 64, 128, 2048, torch.bfloat16, gpu),
    case([1, 200, 129], [1, 2000, 129], 64, 128, 2048, FP8, gpu),
    case([300], [5000], 64, 128, 256, FP8, gpu),
    case([64, 63], [20000, 9000], 16, 128, 2048, torch.bfloat16, gpu),
    case([1000], [1000], 64, 128, 512, torch.float16, gpu),
    case([65, 1, 33], [65, 1, 4097], 32, 128, 128, torch.float32, gpu),
]

DECODE = [
    case([1], [100], 4, 32, 16, torch.float32, interpret),
    # ragged: a row shorter than topk, exactly topk + 1, a page boundary
    case([1, 1, 1], [1, 65, 200], 4, 32, 64, torch.float16, interpret),
    case([1], [5000], 64, 128, 2048, FP8, gpu),
    case([1] * 5, [1, 64, 65, 3000, 70000], 64, 128, 2048, torch.bfloat16, gpu),
    case([1] * 5, [1, 64, 65, 3000, 70000], 64, 128, 2048, FP8, gpu),
    case([1] * 64, [4096 + 7 * i for i in range(64)], 32, 128, 512, FP8, gpu),
    # GLM-4.7-Flash's indexer (32 heads x 128, top-2048) at long context, batch 1 and ragged
    case([1], [200_000], 32, 128, 2048, torch.bfloat16, gpu),
    case([1], [200_000], 32, 128, 2048, FP8, gpu),
    case([1] * 16, [2049 + 12_345 * i for i in range(16)], 32, 128, 2048, FP8, gpu),
]


def ref_scores(inp: dict, positions: torch.Tensor) -> torch.Tensor:
    """Reference score of every (query row, key), -inf past the row's position: [T, max len]."""
    cu, lens = inp["cu_seqlens_q"].tolist(), inp["seq_lens"].tolist()
    width = max(lens)
    out = torch.full((inp["q"].shape[0], width), float("-inf"), device=inp["q"].device)
    for b, n in enumerate(lens):
        k, s = iref.gather_keys(inp["k_cache"], inp["k_scale"], inp["block_tables"][b], n)
        for c in range(cu[b], cu[b + 1], 256):
            e = min(c + 256, cu[b + 1])
            out[c:e, :n] = iref.score_rows(inp["q"][c:e], inp["weights"][c:e], k, s)
    cols = torch.arange(width, device=out.device)
    return out.masked_fill(cols[None, :] > positions[:, None], float("-inf"))


def _check_prefill(n_q, lens, heads, dim, topk, dtype, device, **kw):
    inp = indexer_inputs(n_q, lens, heads, dim, dtype, device)
    ref = indexer_topk_prefill(**inp, topk=topk, impl="ref")
    out = itri.indexer_topk_prefill(**inp, topk=topk, **kw)
    pos = query_positions(n_q, lens, device)
    assert_topk_close(ref, out, ref_scores(inp, pos), pos + 1)


@pytest.mark.parametrize("n_q, lens, heads, dim, topk, dtype", PREFILL)
def test_prefill(n_q, lens, heads, dim, topk, dtype, device):
    _check_prefill(n_q, lens, heads, dim, topk, dtype, device)


def _check_decode(inp: dict, topk: int, out: torch.Tensor) -> None:
    ref = indexer_topk_decode(**inp, topk=topk, impl="ref")
    pos = inp["seq_lens"] - 1
    b = inp["seq_lens"].shape[0]
    cu = torch.arange(b + 1, dtype=torch.int32, device=pos.device)
    assert_topk_close(ref, out, ref_scores(dict(inp, cu_seqlens_q=cu), pos), pos + 1)


def decode_inputs(lens, heads, dim, dtype, device, extra_pages: int = 0) -> dict:
    """indexer_inputs for one query per sequence; `extra_pages` widens the block tables (as
    the engine's CUDA graphs pass the max-model-length width) with pages no row reaches."""
    inp = indexer_inputs([1] * len(lens), lens, heads, dim, dtype, device)
    inp.pop("cu_seqlens_q")
    if extra_pages:
        bt = inp["block_tables"]
        pad = torch.zeros(bt.shape[0], extra_pages, dtype=bt.dtype, device=bt.device)
        inp["block_tables"] = torch.cat([bt, pad], 1)
    return inp


@pytest.mark.parametrize("n_q, lens, heads, dim, topk, dtype", DECODE)
def test_decode(n_q, lens, heads, dim, topk, dtype, device):
    inp = decode_inputs(lens, heads, dim, dtype, device)
    _check_decode(inp, topk, indexer_topk_decode(**inp, topk=topk, impl="triton"))


# (lengths, parts per sequence, entries per part): parts that must compact (cap < part length,
# so only the running threshold keeps them bounded), several parts per row, a wide table.
DECODE_PARTS = [
    pytest.param([300, 5, 129], 1, 48, 0, id="B3-L300-S1-cap48-compacts"),
    pytest.param([251, 17], 3, 48, 0, id="B2-L251-S3-cap48-compacts"),
    pytest.param([97, 40, 130], 4, None, 40, id="B3-L130-S4-wide-table"),
]


@pytest.mark.interpret
@pytest.mark.parametrize("lens, splits, cap, extra_pages", DECODE_PARTS)
def test_decode_parts(lens, splits, cap, extra_pages, device):
    inp = decode_inputs(lens, 4, 32, torch.float32, device, extra_pages)
    # 32-key tiles on the GPU too, so a 48-entry buffer (>= topk + BN) is allowed there as well
    cfg = itri.INTERPRET_DECODE
    out = itri.indexer_topk_decode(**inp, topk=16, splits=splits, cap=cap, config=cfg)
    _check_decode(inp, 16, out)
    # fp32 scores of the same sums: the very same set as the reference, in column order
    ref = indexer_topk_decode(**inp, topk=16, impl="ref")
    long = inp["seq_lens"].cpu() > 16
    assert torch.equal(out.cpu()[long], ref.cpu()[long].sort(1).values)


def test_decode_scratch_ignores_table_width():
    """The table width (the graph's max model length) only caps the part buffers from above:
    past a few parts' worth of topk the decode scratch stops growing, at any batch."""
    from kernels.indexer import decode

    cpu = torch.device("cpu")
    for b in (1, 16, 64):
        sizes = []
        for width in (200_000, 2_000_000, 4_000_000, 20_000_000):
            s = decode.decode_splits(b, width, cpu)
            sizes.append(b * s * decode.part_cap(2048, width, s, 128) * 8)  # keys + columns
        assert sizes[1] == sizes[2] == sizes[3] >= sizes[0], (b, sizes)
        assert sizes[3] <= 18 << 20, (b, sizes)  # ~4 * SMs parts of 2 * topk entries


@pytest.mark.interpret
def test_decode_ties_prefer_lower_positions(device):
    """Exact score ties (every head's ReLU off: score 0) go to the lowest positions in decode
    too, across parts and through compaction."""
    n, topk, hi, di, ps = 200, 16, 2, 16, 16
    k = -torch.rand(n, di) - 0.1  # q.k < 0 for every head: score exactly 0 ...
    pos = [5, 17, 30, 70, 190]
    k[pos] *= -1  # ... except five keys, fewer than topk: the cut is a tie
    pages = (n + ps - 1) // ps
    cache = torch.zeros(pages, ps, di)
    cache.view(-1, di)[:n] = k
    args = (cache.to(device), None, torch.arange(pages, dtype=torch.int32, device=device)[None])
    q, w = torch.ones(1, hi, di, device=device), torch.ones(1, hi, device=device)
    lens = torch.tensor([n], dtype=torch.int32, device=device)
    ref = indexer_topk_decode(q, w, *args, lens, topk, impl="ref")
    zeros = [p for p in range(n) if p not in pos][: topk - len(pos)]
    assert sorted(ref[0].tolist()) == sorted(pos + zeros)
    for splits, cap in ((1, 48), (3, None)):
        cfg = itri.INTERPRET_DECODE  # 32-key tiles: a 48-entry buffer is allowed on the GPU too
        out = itri.indexer_topk_decode(q, w, *args, lens, topk, splits=splits, cap=cap, config=cfg)
        assert torch.equal(out.cpu(), ref.cpu().sort(1).values), (splits, cap)


@pytest.mark.interpret
def test_prefill_small_score_budget(device):
    """A budget of a few rows forces many launch groups, split inside a sequence."""
    _check_prefill([40, 25], [40, 90], 4, 32, 16, torch.float32, device, score_budget=4096)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", range(len(itri.PREFILL_CONFIGS)))
def test_prefill_every_config(cfg, device):
    _check_prefill(
        [300, 77], [3000, 77], 64, 128, 2048, FP8, device, config=itri.PREFILL_CONFIGS[cfg]
    )


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", range(len(itri.DECODE_CONFIGS)))
def test_decode_every_config(cfg, device):
    inp = decode_inputs([70, 3000, 9000], 64, 128, FP8, device)
    out = itri.indexer_topk_decode(**inp, topk=2048, config=itri.DECODE_CONFIGS[cfg])
    _check_decode(inp, 2048, out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
def test_decode_compacts_at_batch_64(dtype, device):
    """Batch 64 at long context: parts longer than their buffers, so compaction runs."""
    from kernels.indexer import decode

    lens = [150_000 + 777 * i for i in range(64)]
    s = decode.decode_splits(64, max(lens), device)
    assert cdiv(max(lens), s) > decode.part_cap(2048, max(lens), s, 128)
    inp = decode_inputs(lens, 32, 128, dtype, device)
    _check_decode(inp, 2048, itri.indexer_topk_decode(**inp, topk=2048))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
def test_decode_cuda_graph_replays_new_lengths(dtype, device):
    """Captured once over a full-width table (as serving/engine/cuda_graph.py does), replayed with
    other lengths (ragged, a padding row of length 0, rows below and above topk): every replay
    matches the reference for its own lengths."""
    b, max_len, topk = 8, 70_000, 2048
    full = decode_inputs([max_len] * b, 32, 128, dtype, device, extra_pages=500)
    static = {k: v.clone() if torch.is_tensor(v) else v for k, v in full.items()}
    lens = static["seq_lens"]
    itri.indexer_topk_decode(**static, topk=topk)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = itri.indexer_topk_decode(**static, topk=topk)
    for new in ([max_len] * b, [0, 1, 2048, 2049, 5000, 65_000, 12_345, max_len]):
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        g.replay()
        torch.cuda.synchronize()
        _check_decode(static, topk, out.clone())


def test_triton_rejects_odd_head_dim():
    inp = indexer_inputs([3], [3], 2, 24, torch.float32)
    with pytest.raises(ValueError, match="DI must be a power of two"):
        itri.indexer_topk_prefill(**inp, topk=4)


def test_triton_rejects_more_queries_than_keys():
    inp = indexer_inputs([3], [3], 2, 32, torch.float32)
    inp["seq_lens"] = torch.tensor([2], dtype=torch.int32)
    with pytest.raises(ValueError, match="has 3 queries but seq_lens 2"):
        itri.indexer_topk_prefill(**inp, topk=4)


@pytest.mark.interpret
def test_triton_ties_prefer_lower_positions(device):
    """The reference's tie rule (exact ties go to the lower position, whatever the chunking) holds
    for the Triton top-k too: exactly the same selection, on both of its paths (direct exact
    select, and the sampled bracket when the candidate buffer is smaller than the row)."""
    n, topk, hi, di, ps = 100, 16, 2, 16, 16
    k = -torch.rand(n, di) - 0.1  # q.k < 0 for every head: ReLU off, score exactly 0 ...
    k[[5, 17, 30, 70, 90]] *= -1  # ... except five keys, fewer than topk: the cut is a tie
    q, w = torch.ones(n, hi, di), torch.ones(n, hi)
    pages = (n + ps - 1) // ps
    cache = torch.zeros(pages, ps, di)
    cache.view(-1, di)[:n] = k
    args = (cache.to(device), None, torch.arange(pages, dtype=torch.int32, device=device)[None])
    lens = torch.tensor([n], dtype=torch.int32, device=device)
    for rows in (30, 13):  # two chunk sizes over a cached prefix
        cu = torch.tensor([0, rows], dtype=torch.int32, device=device)
        qr, wr = q[-rows:].to(device), w[-rows:].to(device)
        ref = indexer_topk_prefill(qr, wr, *args, cu, lens, topk, impl="ref")
        for cap in (4096, 48):
            out = itri.indexer_topk_prefill(qr, wr, *args, cu, lens, topk, topk_cap=cap)
            assert torch.equal(out.sort(1).values, ref.sort(1).values), (rows, cap)
