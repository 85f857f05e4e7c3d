"""`python -m kernels.bench`: time the Triton kernels at the DSA target shapes on a CUDA GPU.

Per op: the median time (triton.testing.do_bench), TFLOP/s or GB/s against the measured H200
ceilings, the plain-PyTorch version of the same work, published figures where they exist, and a
sweep of the kernel configs (the defaults in the kernel files are the sweep's winners). Writes
a JSON file, a PNG plot and a table into a README between markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kernels import bench_baselines as base

# Measured on one H200 (shared/reference/h200-anchor.md): bf16 and fp8 matmul, device copy.
CEILING = {"bf16": 772e12, "fp16": 772e12, "fp8": 1410e12, "bytes": 4.25e12}
# SGLang's H200 notes: DeepGEMM fp8 MQA logits + torch.topk, 64 heads x 128, one sequence (ms).
PUBLISHED_INDEXER = {4096: 0.70, 8192: 1.99, 16384: 6.55, 32768: 28.4, 65536: 114.7}
PUBLISHED_INDEXER_DECODE = {1: 0.098, 64: 0.32}  # ms at 64K context, paged, next_n = 1
MARK_START, MARK_END = "<!-- kernels-bench:start -->", "<!-- kernels-bench:end -->"


@dataclass(frozen=True)
class Shapes:
    """Problem sizes; the defaults are the targets of the kernels issue."""

    lengths: tuple[int, ...] = (4096, 8192, 16384, 32768, 65536)
    sweep_len: int = 32768
    heads: int = 64  # indexer heads and MLA query heads
    dim: int = 128  # indexer head dim
    topk: int = 2048
    attn_lens: tuple[int, ...] = (65536, 16384)
    mla: tuple[int, int] = (576, 512)
    gqa: tuple[int, int] = (8, 128)  # KV heads, head dim
    dec_batch: int = 64
    dec_len: int = 65536
    dec_heads: tuple[int, ...] = (64, 16, 128)
    store_tokens: int = 65536
    quant_tokens: int = 16384
    # GLM-4.7-Flash (kernels/bench_glm.py)
    glm_index_heads: int = 32
    glm_mla_heads: int = 20
    glm_lengths: tuple[int, ...] = (65536, 131072, 200000)
    glm_dec_batches: tuple[int, ...] = (1, 16, 64)
    glm_dec_len: int = 200000
    device: str = "cuda"
    half: str = "bfloat16"  # the 16-bit dtype (the CPU smoke test uses float16)


def bench_ms(fn, *args, **kwargs) -> float:
    """Median ms of fn(*args, **kwargs) by triton.testing.do_bench."""
    import triton.testing

    return float(
        triton.testing.do_bench(
            lambda: fn(*args, **kwargs), warmup=25, rep=100, return_mode="median"
        )
    )


def bench_graph_ms(fn, *args, **kwargs) -> float:
    """Median ms of one CUDA-graph replay of fn(*args, **kwargs), as the engine runs decode (no
    launch overhead), the L2 flushed between replays as in bench_ms. Without CUDA (the smoke
    test's interpreter run): bench_ms."""
    if not torch.cuda.is_available():
        return bench_ms(fn, *args, **kwargs)
    fn(*args, **kwargs)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(*args, **kwargs)
    return bench_ms(g.replay)


def sweep(name: str, configs: list[dict], fn, *args, **kwargs) -> tuple[dict, dict]:
    """Time fn(*args, config=c, **kwargs) for each config c (extra keys of c go as keywords);
    failures (e.g. out of shared memory) are recorded, not raised."""
    times = {}
    for cfg in configs:
        key = ",".join(f"{k}={v}" for k, v in cfg.items())
        kernel_cfg = {k: v for k, v in cfg.items() if k != "splits"}
        extra = {"splits": cfg["splits"]} if "splits" in cfg else {}
        try:
            times[key] = round(bench_ms(fn, *args, config=kernel_cfg, **extra, **kwargs), 4)
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is data
            times[key] = f"failed: {type(e).__name__}: {str(e)[:160]}"
        print(f"  sweep {name} {key}: {times[key]}", flush=True)
    ok = {k: v for k, v in times.items() if isinstance(v, float)}
    best = min(ok, key=ok.get)
    return dict(configs[list(times).index(best)]), times


def try_ms(out: dict, label: str, fn, *args, **kwargs) -> float | None:
    """bench_ms, or None with the error kept in out["errors"] (the other numbers still count)."""
    try:
        return round(bench_ms(fn, *args, **kwargs), 4)
    except Exception as e:  # noqa: BLE001
        out["errors"][label or repr(fn)] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"  {label} failed: {out['errors'][label or repr(fn)]}", flush=True)
        return None


def row(
    op,
    shape,
    dtype,
    ms,
    *,
    flops=None,
    nbytes=None,
    base_ms=None,
    tuned_ms=None,
    published=None,
    target=None,
    **extra,
) -> dict:
    r = {"op": op, "shape": shape, "dtype": dtype, "ms": None if ms is None else round(ms, 4)}
    if ms is None:
        pass
    elif flops is not None:
        r["tflops"] = round(flops / ms / 1e9, 1)
        r["pct_ceiling"] = round(100 * flops / (ms * 1e-3) / CEILING[dtype], 1)
    elif nbytes is not None:
        r["gbps"] = round(nbytes / ms / 1e6, 1)
        r["pct_ceiling"] = round(100 * nbytes / (ms * 1e-3) / CEILING["bytes"], 1)
    if base_ms is not None:
        r["pytorch_ms"] = round(base_ms, 3)
        if ms is not None:
            r["speedup"] = round(base_ms / ms, 1)
    if tuned_ms is not None:
        r["tuned_pytorch_ms"] = round(tuned_ms, 3)
        if ms is not None:
            r["speedup_vs_tuned"] = round(tuned_ms / ms, 1)
    if published is not None:
        r["published_ms"] = published
    if target is not None:
        r["target"] = target
    r.update(extra)
    print("  " + json.dumps(r), flush=True)
    return r


def _free() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _name(dtype) -> str:
    return {torch.float8_e4m3fn: "fp8", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _with_topk_config(*args, config, scores_config, **kwargs):
    from kernels.indexer import triton as itri

    return itri.indexer_topk_prefill(*args, config=scores_config, topk_config=config, **kwargs)


def indexer_prefill(sh: Shapes, out: dict) -> None:
    from kernels.indexer import triton as itri
    from kernels.testing import indexer_inputs
    from kernels.topk import triton as topk_tri

    h, d, topk, dev, half = sh.heads, sh.dim, sh.topk, sh.device, getattr(torch, sh.half)
    base_ms, tuned_ms = {}, {}
    for n in sh.lengths:
        prep = base.indexer_prep(indexer_inputs([n], [n], h, d, half, dev))
        reps = 1 if n > 16384 else 3
        base_ms[n] = base.time_slow(base.indexer_plain, prep, topk, reps=reps)
        tuned_ms[n] = base.time_slow(base.indexer, prep, topk, reps=reps)
        print(
            f"  pytorch indexer L={n}: plain {base_ms[n]:.2f} ms, tuned {tuned_ms[n]:.2f} ms",
            flush=True,
        )
        prep = None
        _free()
    for dtype in (torch.float8_e4m3fn, half):
        inp = indexer_inputs([sh.sweep_len], [sh.sweep_len], h, d, dtype, dev)
        # Configs are chosen on the scores alone, so a top-k failure cannot hide them.
        cfg, times = sweep(
            f"indexer-{_name(dtype)}",
            itri.PREFILL_CONFIGS,
            itri.indexer_topk_prefill,
            **inp,
            topk=topk,
            select="none",
        )
        out["sweeps"][f"indexer_prefill_{_name(dtype)}_L{sh.sweep_len}_scores_only"] = times
        out["resources"][f"indexer_prefill_{_name(dtype)}"] = base.kernel_resources(
            itri._prefill_logits_kernel
        )
        if dtype == torch.float8_e4m3fn:
            tcfg, times = sweep(
                "topk", topk_tri.CONFIGS, _with_topk_config, **inp, topk=topk, scores_config=cfg
            )
            out["sweeps"][f"indexer_prefill_fp8_L{sh.sweep_len}_topk_configs"] = times
            out["resources"]["topk"] = base.kernel_resources(topk_tri._topk_rows_kernel)
        for n in sh.lengths:
            inp = indexer_inputs([n], [n], h, d, dtype, dev)
            run = itri.indexer_topk_prefill
            ms = try_ms(
                out,
                f"indexer {n} {_name(dtype)}",
                run,
                **inp,
                topk=topk,
                config=cfg,
                topk_config=tcfg,
            )
            extra = {
                "scores_only_ms": try_ms(out, "", run, **inp, topk=topk, config=cfg, select="none")
            }
            if dtype == torch.float8_e4m3fn:
                extra["scores_plus_torch_topk_ms"] = try_ms(
                    out,
                    f"indexer torch.topk {n}",
                    run,
                    **inp,
                    topk=topk,
                    config=cfg,
                    select="torch",
                )
            if n == max(sh.lengths) and ms is not None:
                misses = torch.zeros(1, dtype=torch.int32, device=dev)
                got = run(**inp, topk=topk, config=cfg, misses=misses, topk_config=tcfg)
                extra["check_last_rows"] = base.indexer_recall(inp, got, topk)
                extra["topk_bracket_misses"] = f"{int(misses.item())} of {n - topk} rows"
            target = {65536: "<= 90 ms", 32768: "<= 25 ms"}.get(n)
            out["results"].append(
                row(
                    "indexer+topk prefill",
                    f"L={n} H={h} D={d} topk={topk}",
                    _name(dtype),
                    ms,
                    flops=h * d * n * (n + 1),
                    base_ms=base_ms[n],
                    tuned_ms=tuned_ms[n],
                    published=PUBLISHED_INDEXER.get(n),
                    target=target,
                    config=cfg,
                    topk_config=tcfg,
                    **extra,
                )
            )
            inp = None
            _free()


def indexer_decode(sh: Shapes, out: dict) -> None:
    from kernels.indexer import indexer_topk_decode
    from kernels.indexer import triton as itri
    from kernels.testing import indexer_inputs

    n, topk = sh.dec_len, sh.topk
    for b in (sh.dec_batch, 1):
        for dtype in (torch.float8_e4m3fn, getattr(torch, sh.half)):
            inp = indexer_inputs([1] * b, [n] * b, sh.heads, sh.dim, dtype, sh.device)
            inp.pop("cu_seqlens_q")
            cfg = None
            if b > 1 and dtype == torch.float8_e4m3fn:
                cfg, times = sweep(
                    "indexer-decode",
                    itri.DECODE_CONFIGS,
                    itri.indexer_topk_decode,
                    **inp,
                    topk=topk,
                )
                out["sweeps"][f"indexer_decode_fp8_B{b}_L{n}"] = times
            ms = bench_ms(itri.indexer_topk_decode, **inp, topk=topk, config=cfg)
            graph_ms = bench_graph_ms(itri.indexer_topk_decode, **inp, topk=topk, config=cfg)
            scores_ms = bench_ms(
                itri.indexer_topk_decode, **inp, topk=topk, config=cfg, select="none"
            )
            base_ms = bench_ms(base.indexer_decode_batched, inp, topk)
            ref_ms = base.time_slow(indexer_topk_decode, **inp, topk=topk, impl="ref")
            per_token = sh.dim + 4 if dtype == torch.float8_e4m3fn else sh.dim * 2
            published = PUBLISHED_INDEXER_DECODE.get(b) if dtype == torch.float8_e4m3fn else None
            out["results"].append(
                row(
                    "indexer+topk decode",
                    f"B={b} L={n} H={sh.heads} D={sh.dim} topk={topk}",
                    _name(dtype),
                    ms,
                    nbytes=b * n * per_token,
                    base_ms=base_ms,
                    published=published if n == 65536 else None,
                    config=cfg,
                    cuda_graph_ms=round(graph_ms, 4),
                    scores_filter_ms=round(scores_ms, 4),
                    ref_loop_ms=round(ref_ms, 3),
                )
            )
            inp = None
            _free()


def sparse_prefill(sh: Shapes, out: dict) -> None:
    from kernels.sparse_attn import triton as stri
    from kernels.testing import attn_inputs

    (dk, dv), (gkv, gd), h, topk = sh.mla, sh.gqa, sh.heads, sh.topk
    half = getattr(torch, sh.half)
    shapes = [(n, 1, dk, dv, True) for n in sh.attn_lens] + [(sh.attn_lens[0], gkv, gd, gd, False)]
    for n, hkv, kd, vd, mla in shapes:
        inp = attn_inputs([n], [n], h, hkv, kd, vd, topk, half, sh.device, mla=mla)
        kind = "MLA absorbed" if mla else f"GQA {hkv} KV heads"
        cfg = None
        if mla and n == sh.attn_lens[0]:
            cfg, times = sweep(
                "sparse-mla",
                stri.WIDE_CONFIGS + stri.EXPERIMENTAL_WIDE,
                stri.sparse_attn_prefill,
                **inp,
                scale=0.07,
            )
            out["sweeps"][f"sparse_mla_prefill_L{n}"] = times
            out["resources"]["sparse_attn"] = base.kernel_resources(stri._sparse_attn_kernel)
        ms = bench_ms(stri.sparse_attn_prefill, **inp, scale=0.07, config=cfg)
        extra, base_ms = {}, None
        if mla:
            base_ms = base.time_slow(base.sparse_attn, inp, 0.07)
            got = stri.sparse_attn_prefill(**inp, scale=0.07, config=cfg)
            extra["rms_err_last_rows"] = base.sparse_attn_err(inp, got, 0.07)
        target = ">= 300 TFLOP/s" if mla and n == 65536 else None
        out["results"].append(
            row(
                "sparse attn prefill",
                f"{kind} L={n} H={h} D={kd}/{vd} topk={topk}",
                _name(half),
                ms,
                flops=2 * h * (kd + vd) * topk * n,
                base_ms=base_ms,
                target=target,
                config=cfg,
                **extra,
            )
        )
        inp = None
        _free()


def sparse_decode(sh: Shapes, out: dict) -> None:
    from kernels.sparse_attn import sparse_attn_decode
    from kernels.sparse_attn import triton as stri
    from kernels.testing import attn_inputs

    b, n, topk, (dk, dv) = sh.dec_batch, sh.dec_len, sh.topk, sh.mla
    for i, h in enumerate(sh.dec_heads):
        inp = attn_inputs(
            [1] * b, [n] * b, h, 1, dk, dv, topk, getattr(torch, sh.half), sh.device, mla=True
        )
        inp.pop("cu_seqlens_q")
        cfg, splits = None, None
        if i == 0:
            variants = [dict(c, splits=s) for c in stri.WIDE_CONFIGS[:3] for s in (None, 1, 2, 4)]
            best, times = sweep(
                "sparse-decode", variants, stri.sparse_attn_decode, **inp, scale=0.07
            )
            out["sweeps"][f"sparse_mla_decode_B{b}_H{h}"] = times
            splits = best.pop("splits")
            cfg = best
        ms = bench_ms(stri.sparse_attn_decode, **inp, scale=0.07, config=cfg, splits=splits)
        base_ms = bench_ms(base.sparse_decode_batched, inp, 0.07)
        ref_ms = base.time_slow(sparse_attn_decode, **inp, scale=0.07, impl="ref")
        # Bytes it must read: the selected rows (the value is the same row) and indices, q; out.
        nbytes = b * topk * (dk * 2 + 4) + b * h * (dk + dv) * 2
        target = ">= 60% of 4.25 TB/s" if i == 0 else None
        out["results"].append(
            row(
                "sparse attn decode",
                f"MLA absorbed B={b} L={n} H={h} topk={topk}",
                _name(getattr(torch, sh.half)),
                ms,
                nbytes=nbytes,
                base_ms=base_ms,
                target=target,
                tflops=round(2 * h * (dk + dv) * topk * b / ms / 1e9, 1),
                config=cfg,
                splits=splits,
                ref_loop_ms=round(ref_ms, 3),
            )
        )
        inp = None
        _free()


def small_ops(sh: Shapes, out: dict) -> None:
    from kernels.fp8 import act_quant
    from kernels.kv_store import store_rows

    t, dev = sh.store_tokens, sh.device
    for shape, dtype, name in [
        ((t, 1, sh.mla[0]), getattr(torch, sh.half), "MLA rows"),
        ((t, sh.dim), torch.float8_e4m3fn, "indexer k fp8"),
        ((t,), torch.float32, "indexer k scale fp32"),
    ]:
        cache = torch.zeros((t // 64 + 1, 64, *shape[1:]), device=dev).to(dtype)
        rows = torch.randn(shape, device=dev).to(dtype)
        slots = torch.randperm(cache.shape[0] * 64, device=dev)[:t]
        ms = bench_ms(store_rows, cache, rows, slots, impl="triton")
        base_ms = bench_ms(store_rows, cache, rows, slots, impl="ref")
        out["results"].append(
            row(
                "kv store",
                f"T={t} {name} {tuple(shape[1:])}",
                "bytes",
                ms,
                nbytes=2 * rows.numel() * rows.element_size(),
                base_ms=base_ms,
            )
        )
    x = torch.randn(sh.quant_tokens, sh.heads, sh.dim, device=dev)
    ms = bench_ms(act_quant, x, sh.dim, impl="triton")
    base_ms = bench_ms(act_quant, x, sh.dim, impl="ref")
    out["results"].append(
        row(
            "act_quant fp8",
            f"T={sh.quant_tokens} H={sh.heads} D={sh.dim} fp32 in",
            "bytes",
            ms,
            nbytes=x.numel() * 5 + x.numel() * 4 // sh.dim,
            base_ms=base_ms,
        )
    )


def _glm_sections() -> dict:
    from kernels import bench_glm

    return {
        "glm_indexer": bench_glm.glm_indexer,
        "glm_sparse": bench_glm.glm_sparse,
        "glm_decode": bench_glm.glm_decode,
    }


SECTIONS = {
    "indexer": indexer_prefill,
    "indexer_decode": indexer_decode,
    "sparse": sparse_prefill,
    "sparse_decode": sparse_decode,
    "small": small_ops,
    **_glm_sections(),
}
# Sections of rows written before rows carried their section (for merging old results files).
_OLD_ROW_SECTIONS = {
    "indexer+topk prefill": "indexer",
    "indexer+topk decode": "indexer_decode",
    "sparse attn prefill": "sparse",
    "sparse attn decode": "sparse_decode",
    "kv store": "small",
    "act_quant fp8": "small",
}


def run(sh: Shapes, sections: list[str], after_each=None) -> dict:
    """Run the named sections; a failing section is recorded and the others still run.
    `after_each(out)` is called after every section (the CLI saves partial results)."""
    import triton

    dev = torch.device(sh.device)
    out = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "command": "python -m kernels.bench",
        "ceilings": {"bf16_tflops": 772, "fp8_tflops": 1410, "copy_tbps": 4.25},
        "shapes": asdict(sh),
        "results": [],
        "sweeps": {},
        "resources": {},
        "errors": {},
    }
    torch.manual_seed(0)
    for name in sections:
        print(f"== {name}", flush=True)
        first = len(out["results"])
        try:
            SECTIONS[name](sh, out)
        except Exception as e:  # noqa: BLE001 - keep the other sections' numbers
            out["errors"][name] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"  section {name} failed: {out['errors'][name]}", flush=True)
        for r in out["results"][first:]:
            r["section"] = name
        _free()
        if after_each is not None:
            after_each(out)
    return out


def merge(old: dict, new: dict, sections: list[str]) -> dict:
    """`new` plus the rows, sweeps and errors of `old` from sections this run did not redo, so
    sections run one command at a time add up to one results file."""
    keep = [
        r
        for r in old.get("results", [])
        if r.get("section", _OLD_ROW_SECTIONS.get(r["op"])) not in sections
    ]
    out = dict(new, results=keep + new["results"])
    for key in ("sweeps", "resources"):
        out[key] = {**old.get(key, {}), **new[key]}
    out["errors"] = {
        **{k: v for k, v in old.get("errors", {}).items() if k not in sections},
        **new["errors"],
    }
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__)
    ap.add_argument(
        "--sections",
        default="indexer,sparse,sparse_decode,indexer_decode,small,glm_indexer,glm_sparse,glm_decode",
    )
    ap.add_argument(
        "--fresh", action="store_true", help="replace the results file instead of merging into it"
    )
    ap.add_argument("--lengths", default="4096,8192,16384,32768,65536")
    ap.add_argument("--results-dir", default="benchmarks/results")
    ap.add_argument("--readme", default="benchmarks/README.md")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernels.bench needs a CUDA GPU")
    lengths = tuple(int(x) for x in args.lengths.split(","))
    sh = Shapes(lengths=lengths, sweep_len=32768 if 32768 in lengths else lengths[-1])
    from kernels import bench_report

    res = Path(args.results_dir)
    res.mkdir(parents=True, exist_ok=True)

    path = res / "kernels-h200.json"
    old = {} if args.fresh or not path.exists() else json.loads(path.read_text())
    sections = args.sections.split(",")

    def save(out: dict) -> None:  # after every section, so a cut-off run keeps its numbers
        out = merge(old, out, sections)
        path.write_text(json.dumps(out, indent=1))
        bench_report.plot_indexer(out, res / "kernels-h200-indexer.png", PUBLISHED_INDEXER)
        bench_report.plot_indexer(out, res / "kernels-h200-glm.png", {}, model="GLM-4.7-Flash")
        bench_report.write_readme(
            Path(args.readme), out, bench_report.table(out), MARK_START, MARK_END
        )

    out = run(sh, sections, after_each=save)
    print(bench_report.table(merge(old, out, sections)))


if __name__ == "__main__":
    main()
