"""Plain-PyTorch versions of the benchmarked work (what a user writes without kernels, as in
shared/reference/h200-anchor.md), and spot checks of the kernels' outputs at benchmark sizes."""

from __future__ import annotations

import torch

from kernels.testing import assert_topk_close, rms_rel_err


def time_slow(fn, *args, reps: int = 1, **kwargs) -> float:
    """Median ms of `reps` runs of fn(*args, **kwargs) after one warm-up, for work too slow for
    do_bench's defaults."""
    fn(*args, **kwargs)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args, **kwargs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def indexer_prep(inp: dict):
    """One sequence's (q, weights, contiguous keys) in bf16: the baseline reads no page table."""
    n = int(inp["seq_lens"][0])
    ps = inp["k_cache"].shape[1]
    pos = torch.arange(n, device=inp["q"].device)
    k = inp["k_cache"][inp["block_tables"][0, pos // ps].long(), pos % ps]
    return inp["q"].to(torch.bfloat16), inp["weights"], k.to(torch.bfloat16)


def indexer_plain(prep, topk: int, chunk: int | None = None) -> torch.Tensor:
    """What h200-anchor.md timed: einsum + relu + weighted head sum + masked topk, 2048
    queries at a time, bf16."""
    q, w, k = prep
    n = q.shape[0]
    chunk = chunk or indexer_chunk(q.shape[1], n)
    wb = w.to(torch.bfloat16)
    out = torch.full((n, topk), -1, dtype=torch.int64, device=q.device)
    for c in range(0, n, chunk):
        e = min(c + chunk, n)
        s = torch.einsum("thd,sd->ths", q[c:e], k[:e]).relu_()
        sc = (s * wb[c:e, :, None]).sum(1).float()
        cols = torch.arange(e, device=q.device)
        sc.masked_fill_(cols[None, :] > torch.arange(c, e, device=q.device)[:, None], float("-inf"))
        out[c:e, : min(topk, e)] = sc.topk(min(topk, e), dim=-1).indices
    return out


def indexer(prep, topk: int, chunk: int | None = None) -> torch.Tensor:
    """A tuned PyTorch version: the head sum as a batched matmul (bf16 tensor cores) instead of
    a broadcast multiply and reduction; otherwise as indexer_plain."""
    q, w, k = prep
    n, h, _ = q.shape
    chunk = chunk or indexer_chunk(h, n)
    out = torch.full((n, topk), -1, dtype=torch.int64, device=q.device)
    for c in range(0, n, chunk):
        e = min(c + chunk, n)
        s = torch.matmul(q[c:e].flatten(0, 1), k[:e].T).view(e - c, h, e).relu_()
        sc = torch.bmm(w[c:e, None, :].to(torch.bfloat16), s).squeeze(1).float()
        cols = torch.arange(e, device=q.device)
        sc.masked_fill_(cols[None, :] > torch.arange(c, e, device=q.device)[:, None], float("-inf"))
        out[c:e, : min(topk, e)] = sc.topk(min(topk, e), dim=-1).indices
    return out


def indexer_chunk(heads: int, n: int, budget: int = 16 << 30) -> int:
    """Query rows per step of the prefill baselines: their bf16 [rows, heads, n] scores within
    `budget` bytes (2048 rows up to 64 heads x 64K, as measured before; 1024 at 32 x 200K)."""
    rows = max(16, budget // (heads * n * 2))
    return min(2048, 1 << (rows.bit_length() - 1))


def indexer_decode_batched(inp: dict, topk: int, budget: int = 4 << 30) -> torch.Tensor:
    """The best batched bf16 PyTorch decode indexer: every sequence's keys gathered through its
    block table (padded to the table's width), one batched matmul for q.k over all heads, ReLU,
    one batched matmul for the weighted head sum (x the key scale for FP8 keys, which bf16 holds
    exactly), the invisible columns masked, torch.topk. Sequences in groups whose gathered keys
    and scores fit `budget` bytes."""
    q, w, kc, ks = inp["q"], inp["weights"], inp["k_cache"], inp["k_scale"]
    bt, lens = inp["block_tables"].long(), inp["seq_lens"]
    b, h, d = q.shape
    width = bt.shape[1] * kc.shape[1]
    qb, wb = q.to(torch.bfloat16), w.to(torch.bfloat16)[:, None, :]
    cols = torch.arange(width, device=q.device)
    out = torch.empty((b, min(topk, width)), dtype=torch.int64, device=q.device)
    group = max(1, budget // (width * (d + h) * 2))
    for c in range(0, b, group):
        e = min(c + group, b)
        k = kc[bt[c:e]].reshape(e - c, width, d).to(torch.bfloat16)
        s = torch.matmul(qb[c:e], k.transpose(1, 2)).relu_()  # [g, H, width]
        sc = torch.matmul(wb[c:e], s).squeeze(1).float()
        if ks is not None:
            sc *= ks[bt[c:e]].reshape(e - c, width)
        sc.masked_fill_(cols[None, :] >= lens[c:e, None], float("-inf"))
        out[c:e] = sc.topk(out.shape[1], dim=-1).indices
    return out


def sparse_decode_batched(inp: dict, scale: float) -> torch.Tensor:
    """The best batched bf16 PyTorch MLA decode: the selected latent rows of every sequence
    gathered through its block table at once, batched matmuls, fp32 softmax."""
    q, kc, idx, bt = inp["q"], inp["k_cache"], inp["indices"], inp["block_tables"].long()
    ps, dk = kc.shape[1], kc.shape[-1]
    dv = inp["v_cache"].shape[-1]
    i = idx.clamp(min=0).long()
    kv = kc.view(-1, dk)[bt.gather(1, i // ps) * ps + i % ps]  # [B, topk, Dk]
    logits = torch.matmul(q, kv.transpose(1, 2)).float() * scale  # [B, H, topk]
    logits.masked_fill_((idx < 0)[:, None, :], float("-inf"))
    p = torch.softmax(logits, -1).to(q.dtype)
    return torch.matmul(p, kv[..., :dv])


def indexer_recall(inp: dict, out: torch.Tensor, topk: int, rows: int = 64) -> str:
    """Check the last `rows` rows of a one-sequence prefill against the reference."""
    from kernels.indexer import ref as iref
    from kernels.topk import ref as tref

    n = int(inp["seq_lens"][0])
    rows = min(rows, n)
    k, s = iref.gather_keys(inp["k_cache"], inp["k_scale"], inp["block_tables"][0], n)
    scores = iref.score_rows(inp["q"][n - rows :], inp["weights"][n - rows :], k, s)
    lengths = torch.arange(n - rows + 1, n + 1, device=scores.device, dtype=torch.int32)
    ref = tref.topk_rows(scores, lengths, topk)
    try:
        return f"ok, recall {assert_topk_close(ref, out[n - rows :], scores, lengths):.4f}"
    except AssertionError as e:
        return f"FAILED: {e}"


def _slots(inp, idx):
    ps = inp["k_cache"].shape[1]
    i = idx.clamp(min=0).long()
    return inp["block_tables"][0].long()[i // ps] * ps + i % ps


def sparse_attn(inp: dict, scale: float, chunk: int = 512) -> torch.Tensor:
    """Gather the selected 576-d rows 512 queries at a time; softmax; weighted latent sum."""
    q, kc, idx = inp["q"], inp["k_cache"], inp["indices"]
    kf = kc.view(-1, kc.shape[-1])
    dv = inp["v_cache"].shape[-1]
    out = torch.empty(*q.shape[:2], dv, dtype=q.dtype, device=q.device)
    for c in range(0, q.shape[0], chunk):
        e = min(c + chunk, q.shape[0])
        kv = kf[_slots(inp, idx[c:e])]  # [C, topk, Dk]
        logits = torch.einsum("chd,ctd->cht", q[c:e], kv).float() * scale
        logits.masked_fill_((idx[c:e] < 0)[:, None, :], float("-inf"))
        p = torch.softmax(logits, -1).to(q.dtype)
        out[c:e] = torch.einsum("cht,ctv->chv", p, kv[..., :dv])
    return out


def sparse_attn_err(inp: dict, got: torch.Tensor, scale: float, rows: int = 64) -> float:
    from kernels.sparse_attn import ref as sref

    rows = min(rows, got.shape[0])
    ref = sref.attend_rows(
        inp["q"][-rows:],
        inp["k_cache"],
        inp["v_cache"],
        inp["block_tables"][0],
        inp["indices"][-rows:],
        scale,
    )
    return round(rms_rel_err(ref, got[-rows:].float()), 6)


def kernel_resources(fn) -> list[dict]:
    """Registers, spills and shared memory of every compiled variant of a @triton.jit kernel."""
    out = []
    for entry in getattr(fn, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        for k in cache.values():
            md = k.metadata
            out.append(
                {
                    "warps": md.num_warps,
                    "stages": md.num_stages,
                    "regs": k.n_regs,
                    "spills": k.n_spills,
                    "smem": md.shared,
                }
            )
    return out
