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
        "| op | shape | dtype | ms | rate | % of ceiling | PyTorch ms | speedup | "
        "tuned PyTorch ms | speedup vs tuned | published ms | target |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in out["results"]:
        ms = "error" if r["ms"] is None else f"{r['ms']:.3f}"
        cells = [
            r["op"],
            r["shape"],
            r["dtype"],
            ms,
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
            "memory-bound ops count the bytes they must read (and write, for stores).",
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


def plot_indexer(out: dict, path: Path, published: dict[int, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in out["results"] if r["op"] == "indexer+topk prefill"]
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
    for key, label in (
        ("pytorch_ms", "plain PyTorch (bf16 einsum + topk)"),
        ("tuned_pytorch_ms", "tuned PyTorch (bf16 bmm + topk)"),
    ):
        base = sorted({(int(r["shape"].split()[0][2:]), r[key]) for r in rows if key in r})
        if base:
            ax.plot(*zip(*base, strict=True), "s--", label=label)
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
    ax.set_title(f"Lightning indexer prefill, 64 heads x 128, {out['gpu']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
