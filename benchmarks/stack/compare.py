"""All-F against the 1/4 plan from two whole-stack runs (benchmarks/stack/run.py output folders):
one results JSON and a markdown table, the rows benchmarks/README.md quotes.

    python -m benchmarks.stack.compare RUNS_DIR --out benchmarks/results/stack-h200.json

RUNS_DIR holds all-F/ and quarter/. Output tokens/s "saturated" is the servers' generation
counter over the oversubscribed stage (the second half of the load) from metrics.csv; the
client-side figures (TTFT, ITL, whole-run tokens/s, requests) come from each run's summary.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

PLANS = ("all-F", "quarter")


def saturated_tokens_per_s(run_dir: Path) -> float | None:
    run = json.loads((run_dir / "run.json").read_text())
    start, stop = run.get("load_started"), run.get("load_stopped")
    sat_from = (run.get("plan") or {}).get("saturated_from_s")
    if start is None or stop is None or sat_from is None:
        return None
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if start + sat_from <= float(r["t"]) <= stop]
    if len(rows) < 2:
        return None
    dt = float(rows[-1]["t"]) - float(rows[0]["t"])
    tokens = float(rows[-1]["generation_tokens"]) - float(rows[0]["generation_tokens"])
    return tokens / dt if dt > 0 else None


def row(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    meta = json.loads((run_dir / "stack-run.json").read_text())
    o, kv, req = s["overall"], s["kv"], s["requests"]
    sat = kv.get("saturated") or {}
    return {
        "plan": meta["plan"],
        "pattern": meta["pattern"],
        "kv_capacity_tokens": s["kv_capacity_tokens"],
        "requests_fit": s.get("requests_fit"),
        "requests": req,
        "ttft_ms": o["ttft_ms"],
        "itl_ms": o["itl_ms"],
        "tpot_ms": o["tpot_ms"],
        "output_tokens_per_s": o["output_tokens_per_s"],
        "saturated_output_tokens_per_s": saturated_tokens_per_s(run_dir),
        "kv_saturated_p50": sat.get("p50"),
        "kv_saturated_share_ge_0.9": sat.get("share_ge_0.9"),
        "preemptions": kv.get("preemptions"),
        "drained": (s.get("drain") or {}).get("idle"),
        "kv_after": ((s.get("drain") or {}).get("last_sample") or {}).get("kv_usage"),
        "server_start_s": meta.get("server_start_s"),
        "loadtest_rc": meta.get("loadtest_rc"),
    }


def table(rows: list[dict]) -> str:
    def f(x, d=1):
        return "-" if x is None else f"{x:,.{d}f}"

    lines = [
        "| plan | KV pool tokens | requests (failed, lost) | TTFT p50 / p99 ms | ITL p50 / p99 ms "
        "| output tok/s (run) | output tok/s saturated | KV p50 saturated (share >= 0.9) | "
        "preemptions | KV after |",
        "|---|---:|---|---|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        q = r["requests"]
        lines.append(
            f"| {r['plan']} | {f(r['kv_capacity_tokens'], 0)} | {q['completed']} "
            f"({q['failed']}, {q['lost']}) | {f(r['ttft_ms']['p50'], 0)} / "
            f"{f(r['ttft_ms']['p99'], 0)} | {f(r['itl_ms']['p50'])} / {f(r['itl_ms']['p99'])} | "
            f"{f(r['output_tokens_per_s'])} | {f(r['saturated_output_tokens_per_s'])} | "
            f"{f(r['kv_saturated_p50'], 2)} ({f(r['kv_saturated_share_ge_0.9'], 2)}) | "
            f"{f(r['preemptions'], 0)} | {f(r['kv_after'], 3)} |"
        )
    return "\n".join(lines)


def compare(runs: Path) -> dict:
    rows = [row(runs / p) for p in PLANS if (runs / p / "summary.json").is_file()]
    if not rows:
        raise FileNotFoundError(f"no finished run under {runs} (expected {', '.join(PLANS)})")
    out = {"runs": rows}
    by = {r["plan"]: r for r in rows}
    a, q = by.get("all-F"), by.get("quarter")
    if a and q and a["saturated_output_tokens_per_s"] and q["saturated_output_tokens_per_s"]:
        out["quarter_over_all_f_saturated"] = (
            q["saturated_output_tokens_per_s"] / a["saturated_output_tokens_per_s"]
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default RUNS/stack.json)")
    ap.add_argument("--meta", default="{}", help="JSON merged into the result (device, date)")
    args = ap.parse_args(argv)
    res = {**json.loads(args.meta), **compare(args.runs)}
    out = args.out or args.runs / "stack.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(table(res["runs"]))
    if "quarter_over_all_f_saturated" in res:
        print(
            f"\n1/4 / all-F output tokens/s, saturated: {res['quarter_over_all_f_saturated']:.2f}x"
        )
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
