"""Render kernels.bench results: a markdown table (also placed in a README between markers) and
a plot of indexer prefill time against context length."""

from __future__ import annotations

from pathlib import Path


def _rate(r: dict) -> str:
    if "tflops" in r:
        return f"{r['tflops']} TFLOP/s"
    if "gbps" in r:
        return f"{r['gbps']} GB/s"
    return ""


def table(out: dict) -> str:
    lines = [
        "| op | model | shape | dtype | ms | CUDA graph ms | rate | % of ceiling | PyTorch ms | "
        "speedup | tuned PyTorch ms | speedup vs tuned | published ms | target |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in out["results"]:
        ms = "error" if r["ms"] is None else f"{r['ms']:.3f}"
        cells = [
            r["op"],
            r.get("model", "DSA (64 heads)"),
            r["shape"],
            r["dtype"],
            ms,
            f"{r['cuda_graph_ms']:.3f}" if r.get("cuda_graph_ms") is not None else "",
            _rate(r),
            f"{r['pct_ceiling']}%" if "pct_ceiling" in r else "",
            f"{r['pytorch_ms']:.2f}" if "pytorch_ms" in r else "",
            f"{r['speedup']}x" if "speedup" in r else "",
            f"{r['tuned_pytorch_ms']:.2f}" if "tuned_pytorch_ms" in r else "",
            f"{r['speedup_vs_tuned']}x" if "speedup_vs_tuned" in r else "",
            str(r.get("published_ms", "")),
            r.get("target", ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_readme(path: Path, out: dict, tbl: str, start: str, end: str) -> None:
    c = out["ceilings"]
    section = "\n".join(
        [
            start,
            "## Kernels on one H200",
            "",
            f"Command: `{out['command']}` · GPU: {out['gpu']} · torch {out['torch']}, triton "
            f"{out['triton']} · date {out['date']}. Full numbers, config sweeps and spot checks: "
            "`benchmarks/results/kernels-h200.json`; plot: "
            "`benchmarks/results/kernels-h200-indexer.png`.",
            "",
            "Ceilings (measured, shared/reference/h200-anchor.md): "
            f"bf16 {c['bf16_tflops']} TFLOP/s, "
            f"fp8 {c['fp8_tflops']} TFLOP/s, copy {c['copy_tbps']} TB/s. Indexer FLOPs count the "
            "causal half (H·D·2·L²/2); sparse attention counts 2·H·(Dk+Dv)·topk per query; "
            "memory-bound ops count the bytes they must read (and write, for stores). "
            "PyTorch ms: the best batched bf16 PyTorch of the same work (decode: all sequences "
            "at once, keys gathered through the block tables); the per-sequence fp32 reference "
            "loops are in the JSON as `ref_loop_ms`. CUDA graph ms: one graph replay, as the "
            "engine runs decode.",
            "",
            tbl,
            end,
        ]
    )
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def plot_indexer(
    out: dict, path: Path, published: dict[int, float], model: str | None = None
) -> None:
    """Indexer prefill time against context length for one model's shapes (None: the 64-head
    DSA rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        r for r in out["results"] if r["op"] == "indexer+topk prefill" and r.get("model") == model
    ]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for dtype in ("fp8", "bf16"):
        pts = sorted(
            (int(r["shape"].split()[0][2:]), r["ms"])
            for r in rows
            if r["dtype"] == dtype and r["ms"] is not None
        )
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=f"Triton scores + radix top-k ({dtype})")
    plain = (
        "best batched bf16 PyTorch (bmm + topk)" if model else "plain PyTorch (bf16 einsum + topk)"
    )
    for key, label in (
        ("pytorch_ms", plain),
        ("tuned_pytorch_ms", "tuned PyTorch (bf16 bmm + topk)"),
    ):
        base = sorted({(int(r["shape"].split()[0][2:]), r[key]) for r in rows if key in r})
        if base:
            ax.plot(*zip(*base, strict=True), "s--", label=label)
    if published:
        ax.plot(
            list(published),
            list(published.values()),
            "^:",
            label="published: DeepGEMM fp8 logits + torch.topk",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length L (one causal sequence)")
    ax.set_ylabel("ms (indexer scores + top-2048)")
    heads = rows[0]["shape"].split()[1][2:]
    ax.set_title(f"Lightning indexer prefill, {model or 'DSA'}: {heads} heads x 128, {out['gpu']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
