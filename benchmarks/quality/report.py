"""Turn a pipeline run (eval.json + record.json) into benchmarks/results/quality-smollm2.json, the
markdown table in benchmarks/README.md and a perplexity-vs-retention PNG.

    python -m benchmarks.quality.report RUN_DIR [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ORDER = [
    "dense",
    "all-F",
    "uniform-1/2",
    "searched-1of2",
    "uniform-1/4",
    "searched-1of4",
    "ta-uniform-1/4",
    "uniform-1/8",
    "searched-1of8",
]


def summarise(rows: list[dict]) -> dict:
    table: dict = defaultdict(lambda: {"ppl": {}, "needle": {}, "needle_n": {}})
    for r in rows:
        t = table[r["plan"]]
        t["retention"], t["pattern"] = r["retention"], r["pattern"]
        if r["metric"] == "ppl":
            t["ppl"][r["length"]] = r["result"]["ppl"]
        else:
            t["needle"][r["length"]] = r["result"]["accuracy"]
            t["needle_n"][r["length"]] = r["result"]["n"]
    return dict(table)


def targets(t: dict) -> dict:
    lengths = sorted(t["dense"]["ppl"])
    ratio = lambda a, b, n: t[a]["ppl"][n] / t[b]["ppl"][n]  # noqa: E731
    needle = lambda p: 100 * sum(t[p]["needle"].values()) / len(t[p]["needle"])  # noqa: E731
    out = {}
    for n in lengths:
        out[f"all-F / dense @{n}"] = {"value": ratio("all-F", "dense", n), "target": "<= 1.03"}
        out[f"searched 1/4 / all-F @{n}"] = {
            "value": ratio("searched-1of4", "all-F", n),
            "target": "<= 1.01",
        }
        out[f"searched 1/4 / uniform 1/4 @{n}"] = {
            "value": ratio("searched-1of4", "uniform-1/4", n),
            "target": "< 1",
        }
    out["needle: searched 1/4 minus all-F (points, mean over lengths)"] = {
        "value": needle("searched-1of4") - needle("all-F"),
        "target": ">= -2",
    }
    checks = {"<=": lambda x, y: x <= y, "<": lambda x, y: x < y, ">=": lambda x, y: x >= y}
    for v in out.values():
        op, bound = v["target"].split()
        v["met"] = bool(checks[op](v["value"], float(bound)))
    return out


def markdown(t: dict, tg: dict) -> str:
    lengths = sorted(t["dense"]["ppl"])
    head = (
        "| plan | F layers | "
        + " | ".join(f"ppl @{n // 1024}K" for n in lengths)
        + " | "
        + " | ".join(f"needle @{n // 1024}K" for n in lengths)
        + " |"
    )
    lines = [head, "|" + "---|" * (2 + 2 * len(lengths))]
    for p in [p for p in ORDER if p in t]:
        row = t[p]
        f = "dense" if p == "dense" else f"{row['pattern'].count('F')}/{len(row['pattern'])}"
        lines.append(
            f"| {p} | {f} | "
            + " | ".join(f"{row['ppl'][n]:.3f}" for n in lengths)
            + " | "
            + " | ".join(f"{100 * row['needle'][n]:.0f}% ({row['needle_n'][n]})" for n in lengths)
            + " |"
        )
    lines += ["", "| target | measured | target | met |", "|---|---|---|---|"]
    for k, v in tg.items():
        lines.append(f"| {k} | {v['value']:.4f} | {v['target']} | {'yes' if v['met'] else 'no'} |")
    return "\n".join(lines)


def plot(t: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(t["dense"]["ppl"])
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.6))
    for ax, n in zip(axes, lengths, strict=True):
        for family, style in (("uniform", "o--"), ("searched", "s-")):
            pts = sorted((t[p]["retention"], t[p]["ppl"][n]) for p in t if p.startswith(family))
            pts.append((1.0, t["all-F"]["ppl"][n]))
            ax.plot(*zip(*sorted(pts), strict=True), style, label=family)
        ax.axhline(t["dense"]["ppl"][n], color="gray", lw=1, label="dense")
        if "ta-uniform-1/4" in t:
            ax.plot(
                [t["ta-uniform-1/4"]["retention"]],
                [t["ta-uniform-1/4"]["ppl"][n]],
                "r*",
                ms=11,
                label="training-aware 1/4",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("fraction of layers F")
        ax.set_title(f"held-out perplexity @{n // 1024}K")
    axes[0].set_ylabel("perplexity")
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M + lightning indexers (top-256): IndexCache plans")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.report")
    p.add_argument("run", type=Path, help="directory with eval.json and record.json")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    args = p.parse_args(argv)
    rows = json.loads((args.run / "eval.json").read_text())
    record = json.loads((args.run / "record.json").read_text())
    t = summarise(rows)
    tg = targets(t)
    doc = {
        "model": "SmolLM2-135M-Instruct + lightning indexers (dsa_llama)",
        "device": record.get("device"),
        "kernels": record.get("kernels"),
        "training": {
            k: {kk: vv for kk, vv in record[k].items() if kk != "history"}
            for k in ("warmup", "distill")
            if k in record
        },
        "search": record.get("search"),
        "overlap": record.get("overlap"),
        "args": record.get("args"),
        "table": t,
        "targets": tg,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality-smollm2.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot(t, args.out / "quality-smollm2.png")
    print(markdown(t, tg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
