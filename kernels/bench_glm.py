"""kernels.bench sections at GLM-4.7-Flash's shapes: 20 MLA heads, an indexer of 32 heads x 128,
top-2048, prefill at 64K/128K/200K and decode at batch 1/16/64 over 200K keys.

Baselines ("PyTorch ms") are the best batched bf16 PyTorch of the same work
(kernels/bench_baselines.py); the per-sequence fp32 reference loops are reported apart
(`ref_loop_ms`), as a correctness tool rather than a competitor. Decode rows also give the time
of one CUDA-graph replay (`cuda_graph_ms`), which is how the engine runs decode.
"""

from __future__ import annotations

import torch

from kernels import bench as B
from kernels import bench_baselines as base

GLM = "GLM-4.7-Flash"


def _graph_sweep(out: dict, name: str, variants: list[dict], fn, *args, **kwargs) -> None:
    """CUDA-graph replay ms of fn(*args, config=v minus "splits", splits=v["splits"], **kwargs)
    per variant, into out["sweeps"][name] (failures recorded): what the defaults are chosen from."""
    times = {}
    for v in variants:
        key = ",".join(f"{k}={x}" for k, x in v.items())
        cfg = {k: x for k, x in v.items() if k != "splits"}
        try:
            t = B.bench_graph_ms(fn, *args, config=cfg, splits=v["splits"], **kwargs)
            times[key] = round(t, 4)
        except Exception as e:  # noqa: BLE001 - a variant that fails is data
            times[key] = f"failed: {type(e).__name__}: {str(e)[:160]}"
        print(f"  sweep {name} {key}: {times[key]}", flush=True)
    out["sweeps"][name] = times


def _inputs_1seq(sh, n, dtype):
    from kernels.testing import indexer_inputs

    return indexer_inputs([n], [n], sh.glm_index_heads, sh.dim, dtype, sh.device)


def glm_indexer(sh, out: dict) -> None:
    """Prefill indexer + top-k, one causal sequence per length, FP8 and bf16 keys."""
    from kernels.indexer import triton as itri

    h, d, topk, half = sh.glm_index_heads, sh.dim, sh.topk, getattr(torch, sh.half)
    for n in sh.glm_lengths:
        prep = base.indexer_prep(_inputs_1seq(sh, n, half))
        tuned = base.time_slow(base.indexer, prep, topk)
        print(f"  pytorch (batched bf16) indexer L={n} H={h}: {tuned:.2f} ms", flush=True)
        prep = None
        B._free()
        for dtype in (torch.float8_e4m3fn, half):
            inp = _inputs_1seq(sh, n, dtype)
            run = itri.indexer_topk_prefill
            label = f"glm indexer {n} {B._name(dtype)}"
            ms = B.try_ms(out, label, run, **inp, topk=topk)
            extra = {"scores_only_ms": B.try_ms(out, "", run, **inp, topk=topk, select="none")}
            if ms is not None:
                extra["check_last_rows"] = base.indexer_recall(inp, run(**inp, topk=topk), topk)
            out["results"].append(
                B.row(
                    "indexer+topk prefill",
                    f"L={n} H={h} D={d} topk={topk}",
                    B._name(dtype),
                    ms,
                    flops=h * d * n * (n + 1),
                    base_ms=tuned,
                    model=GLM,
                    **extra,
                )
            )
            inp = None
            B._free()


def glm_sparse(sh, out: dict) -> None:
    """Sparse MLA prefill with GLM's 20 query heads."""
    from kernels.sparse_attn import triton as stri
    from kernels.testing import attn_inputs

    (dk, dv), h, topk, half = sh.mla, sh.glm_mla_heads, sh.topk, getattr(torch, sh.half)
    for n in sh.glm_lengths:
        inp = attn_inputs([n], [n], h, 1, dk, dv, topk, half, sh.device, mla=True)
        ms = B.try_ms(out, f"glm sparse {n}", stri.sparse_attn_prefill, **inp, scale=0.07)
        base_ms = base.time_slow(base.sparse_attn, inp, 0.07)
        got = stri.sparse_attn_prefill(**inp, scale=0.07)
        out["results"].append(
            B.row(
                "sparse attn prefill",
                f"MLA absorbed L={n} H={h} D={dk}/{dv} topk={topk}",
                B._name(half),
                ms,
                flops=2 * h * (dk + dv) * topk * n,
                base_ms=base_ms,
                model=GLM,
                rms_err_last_rows=base.sparse_attn_err(inp, got, 0.07),
            )
        )
        inp = got = None
        B._free()


def _topk_decode(sh, out: dict, b: int, n: int) -> None:
    from kernels.topk import ref as tref
    from kernels.topk import split
    from kernels.topk import triton as ttri

    dev, topk = sh.device, sh.topk
    scores = torch.randn(b, n, device=dev)
    lengths = torch.full((b,), n, dtype=torch.int32, device=dev)
    ms = B.bench_ms(ttri.topk_rows, scores, lengths, topk)
    graph_ms = B.bench_graph_ms(ttri.topk_rows, scores, lengths, topk)
    s0 = split.splits_for(b, n, scores.device)
    if b in (1, max(sh.glm_dec_batches)):
        splits = sorted({max(1, s0 // 2), max(1, s0), 2 * s0, 1})
        variants = [dict(c, splits=x) for c in split.SPLIT_CONFIGS for x in splits if x > 1]
        variants += [dict(c, splits=1) for c in ttri.CONFIGS[:2]]  # one program per row
        _graph_sweep(
            out, f"glm_topk_decode_B{b}_L{n}", variants, ttri.topk_rows, scores, lengths, topk
        )
    base_ms = B.bench_ms(torch.topk, scores, topk, dim=-1)
    got = ttri.topk_rows(scores, lengths, topk).sort(1).values
    same = torch.equal(got, tref.topk_rows(scores, lengths, topk).sort(1).values)
    out["results"].append(
        B.row(
            "topk decode",
            f"B={b} L={n} topk={topk} fp32 scores",
            "fp32",
            ms,
            nbytes=b * n * 4,
            base_ms=base_ms,
            target="<= 0.06 ms" if b == 1 else None,
            model=GLM,
            cuda_graph_ms=round(graph_ms, 4),
            splits=s0,
            check="ok, exact set" if same else "FAILED: sets differ from the reference",
        )
    )


def _decode_check(inp, got, topk) -> str:
    from kernels.indexer import indexer_topk_decode
    from kernels.testing import assert_topk_close

    ref = indexer_topk_decode(**inp, topk=topk, impl="ref")
    try:
        return f"ok, recall {assert_topk_close(ref, got, None, inp['seq_lens']):.4f}"
    except AssertionError as e:
        return f"FAILED: {e}"


def _indexer_decode(sh, out: dict, lens: list[int], dtype, ragged: bool = False) -> None:
    from kernels.indexer import indexer_topk_decode
    from kernels.indexer import triton as itri
    from kernels.testing import indexer_inputs

    b, h, d, topk = len(lens), sh.glm_index_heads, sh.dim, sh.topk
    inp = indexer_inputs([1] * b, lens, h, d, dtype, sh.device)
    inp.pop("cu_seqlens_q")
    run = itri.indexer_topk_decode
    if dtype == torch.float8_e4m3fn and not ragged and b in (1, max(sh.glm_dec_batches)):
        from kernels.indexer import decode

        s0 = decode.decode_splits(b, max(lens), inp["q"].device)
        variants = [
            dict(c, splits=x)
            for c in itri.DECODE_CONFIGS
            for x in sorted({max(1, s0 // 2), s0, 2 * s0})
        ]
        _graph_sweep(out, f"glm_indexer_decode_fp8_B{b}", variants, run, **inp, topk=topk)
    ms = B.bench_ms(run, **inp, topk=topk)
    graph_ms = B.bench_graph_ms(run, **inp, topk=topk)
    scores_ms = B.bench_graph_ms(run, **inp, topk=topk, select="none")
    base_ms = B.bench_ms(base.indexer_decode_batched, inp, topk)
    ref_ms = base.time_slow(indexer_topk_decode, **inp, topk=topk, impl="ref")
    per_token = d + 4 if dtype == torch.float8_e4m3fn else d * 2
    kind = f"ragged 1..{max(lens)} (table {max(lens)} wide)" if ragged else f"L={lens[0]}"
    out["results"].append(
        B.row(
            "indexer+topk decode",
            f"B={b} {kind} H={h} D={d} topk={topk}",
            B._name(dtype),
            ms,
            nbytes=sum(lens) * per_token,
            base_ms=base_ms,
            model=GLM,
            cuda_graph_ms=round(graph_ms, 4),
            scores_filter_graph_ms=round(scores_ms, 4),
            ref_loop_ms=round(ref_ms, 3),
            check=_decode_check(inp, run(**inp, topk=topk), topk),
        )
    )


def _sparse_decode(sh, out: dict, b: int, n: int) -> None:
    from kernels.sparse_attn import sparse_attn_decode
    from kernels.sparse_attn import triton as stri
    from kernels.testing import attn_inputs, rms_rel_err

    (dk, dv), h, topk, half = sh.mla, sh.glm_mla_heads, sh.topk, getattr(torch, sh.half)
    inp = attn_inputs([1] * b, [n] * b, h, 1, dk, dv, topk, half, sh.device, mla=True)
    inp.pop("cu_seqlens_q")
    ms = B.bench_ms(stri.sparse_attn_decode, **inp, scale=0.07)
    graph_ms = B.bench_graph_ms(stri.sparse_attn_decode, **inp, scale=0.07)
    base_ms = B.bench_ms(base.sparse_decode_batched, inp, 0.07)
    ref_ms = base.time_slow(sparse_attn_decode, **inp, scale=0.07, impl="ref")
    ref = sparse_attn_decode(**inp, scale=0.07, impl="ref")
    got = stri.sparse_attn_decode(**inp, scale=0.07)
    out["results"].append(
        B.row(
            "sparse attn decode",
            f"MLA absorbed B={b} L={n} H={h} topk={topk}",
            B._name(half),
            ms,
            nbytes=b * topk * (dk * 2 + 4) + b * h * (dk + dv) * 2,
            base_ms=base_ms,
            model=GLM,
            cuda_graph_ms=round(graph_ms, 4),
            ref_loop_ms=round(ref_ms, 3),
            rms_err=round(rms_rel_err(ref.float(), got.float()), 6),
        )
    )


def glm_decode(sh, out: dict) -> None:
    """Decode at batch 1/16/64 over sh.glm_dec_len keys: top-k alone, indexer + top-k (FP8 and
    bf16 keys; at the largest batch also ragged lengths in a full-width table, as in a CUDA
    graph), and sparse MLA attention."""
    n = sh.glm_dec_len
    for b in sh.glm_dec_batches:
        _topk_decode(sh, out, b, n)
        B._free()
        for dtype in (torch.float8_e4m3fn, getattr(torch, sh.half)):
            _indexer_decode(sh, out, [n] * b, dtype)
            B._free()
        _sparse_decode(sh, out, b, n)
        B._free()
    b = max(sh.glm_dec_batches)
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(1, n + 1, (b,), generator=gen).tolist()
    lens[0] = n
    _indexer_decode(sh, out, lens, torch.float8_e4m3fn, ragged=True)
    B._free()
