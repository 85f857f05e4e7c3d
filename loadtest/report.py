"""A load-test run directory -> summary.json, report.md, latency.png and kv.png.

    python -m loadtest.report RUN_DIR [--slo-ttft-ms 2000] [--slo-itl-ms 100] [--slo-e2e-ms 0]

Inputs (written by loadtest/locustfile.py): run.json (plan, counts, drain), requests.jsonl (one
record per request), metrics.csv (/metrics sampled every second) and Locust's CSVs (locust_*).
Definitions follow `vllm bench serve` (../shared serving reference, section 4): TTFT is send to
first token; ITL are the gaps between token events, pooled over requests; TPOT is
(e2e - TTFT) / (output tokens - 1) per request; goodput counts the requests that met every SLO
given (an SLO of 0 is not checked), with the ITL SLO checked against each request's TPOT, its
mean inter-token latency, as vLLM's goodput does. Latency percentiles come from the per-request
log (exact); Locust's stats CSV is cross-checked against it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadtest.slo import SLO, add_slo_args, slo_from

KV_SATURATED = 0.9  # the KV usage a saturate run should hold in its oversubscribed stage


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@dataclass
class Run:
    meta: dict
    requests: list[dict]
    metrics: list[dict]  # floats
    locust_stats: list[dict]
    locust_history: list[dict]
    chaos: list[dict] | None = None  # the chaos scenario's actions (chaos.json)

    @classmethod
    def load(cls, run_dir: str | Path) -> Run:
        d = Path(run_dir)
        if not (d / "run.json").is_file():
            raise FileNotFoundError(f"{d}/run.json not found: is {d} a load-test output dir?")
        reqs = (
            [
                json.loads(line)
                for line in (d / "requests.jsonl").read_text().splitlines()
                if line.strip()
            ]
            if (d / "requests.jsonl").is_file()
            else []
        )
        metrics = [{k: float(v) for k, v in row.items()} for row in _read_csv(d / "metrics.csv")]
        chaos = json.loads((d / "chaos.json").read_text()) if (d / "chaos.json").is_file() else None
        return cls(
            json.loads((d / "run.json").read_text()),
            reqs,
            metrics,
            _read_csv(d / "locust_stats.csv"),
            _read_csv(d / "locust_stats_history.csv"),
            chaos,
        )


def pcts(values, qs=(50, 90, 99)) -> dict[str, float | None]:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    return {f"p{q}": (float(np.percentile(v, q)) if v.size else None) for q in qs}


def _latencies(recs: list[dict], duration: float, slo: SLO) -> dict:
    ok = [r for r in recs if "error" not in r]
    itl = [g for r in ok for g in r.get("itl_ms", [])]
    out_tokens = sum(r.get("output_tokens", 0) for r in ok)
    good = sum(slo.met(r) for r in recs)
    return {
        "requests": len(recs),
        "completed": len(ok),
        "failed": len(recs) - len(ok),
        "ttft_ms": pcts([r["ttft_s"] * 1000 for r in ok]),
        "tpot_ms": pcts([r["tpot_s"] * 1000 for r in ok if r.get("tpot_s") is not None]),
        "itl_ms": pcts(itl),
        "e2e_ms": pcts([r["e2e_s"] * 1000 for r in ok]),
        "prompt_tokens_mean": float(np.mean([r["prompt_tokens"] for r in ok])) if ok else None,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / duration if duration else None,
        "requests_per_s": len(ok) / duration if duration else None,
        "good_requests": good,
        "goodput_rps": good / duration if duration else None,
        "good_fraction": good / len(recs) if recs else None,
    }


def _kv(metrics: list[dict], start: float, stop: float, sat_from: float | None) -> dict:
    during = [m for m in metrics if start <= m["t"] <= stop]
    if not during:
        return {"samples": 0}
    usage = [m["kv_usage"] for m in during]
    out = {
        "samples": len(during),
        "max": max(usage),
        "mean": float(np.mean(usage)),
        "running_max": max(m["running"] for m in during),
        "waiting_max": max(m["waiting"] for m in during),
        "preemptions": during[-1]["preemptions"] - metrics[0]["preemptions"],
        "server_generation_tokens_per_s": (
            during[-1]["generation_tokens"] - metrics[0]["generation_tokens"]
        )
        / max(during[-1]["t"] - metrics[0]["t"], 1e-9),
    }
    if sat_from is not None:
        sat = [m["kv_usage"] for m in during if m["t"] >= start + sat_from]
        if sat:
            out["saturated"] = {
                "samples": len(sat),
                "p50": float(np.median(sat)),
                "mean": float(np.mean(sat)),
                "min": min(sat),
                f"share_ge_{KV_SATURATED}": sum(u >= KV_SATURATED for u in sat) / len(sat),
            }
    return out


def _failover(run: Run) -> dict:
    """What the faults did to requests: the server's failover counters over the run, and the
    client's view (completed, cleanly failed, lost = broken + never answered)."""
    req, ms = run.meta["requests"], run.metrics

    def delta(key: str) -> float | None:
        have = [m[key] for m in ms if key in m]
        return have[-1] - have[0] if len(have) >= 2 else None

    broken = req.get("failed_broken", req["failed"] - req.get("failed_clean", 0))
    return {
        "completed": req["completed"],
        "migrated": delta("migrations"),
        "retried": delta("retries"),
        "failed_clean": req.get("failed_clean", 0),
        "lost": broken + req["lost"],
        "actions": run.chaos,
    }


def _prefix(metrics: list[dict]) -> dict:
    """Prompt tokens looked up in the engines' prefix caches during the run, and the share hit."""
    if len(metrics) < 2 or "prefix_queries" not in metrics[0]:
        return {"queries": None, "hits": None, "hit_rate": None}
    q = metrics[-1]["prefix_queries"] - metrics[0]["prefix_queries"]
    h = metrics[-1]["prefix_hits"] - metrics[0]["prefix_hits"]
    return {"queries": q, "hits": h, "hit_rate": h / q if q else None}


def summarize(run: Run, slo: SLO) -> dict:
    m = run.meta
    start, stop = m.get("load_started") or 0.0, m.get("load_stopped") or 0.0
    duration = max(stop - start, 0.0)
    per = {
        w: _latencies([r for r in run.requests if r["workload"] == w], duration, slo)
        for w in sorted({r["workload"] for r in run.requests})
    }
    locust_posts = sum(int(r["Request Count"]) for r in run.locust_stats if r["Type"] == "POST")
    locust_fails = sum(int(r["Failure Count"]) for r in run.locust_stats if r["Type"] == "POST")
    finished = None
    if len(run.metrics) >= 2:
        finished = run.metrics[-1]["requests_finished"] - run.metrics[0]["requests_finished"]
    return {
        "scenario": m["plan"]["scenario"],
        "model": m["model"],
        "host": m["host"],
        "max_model_len": m["max_model_len"],
        "kv_capacity_tokens": m["kv_capacity_tokens"],
        "stages": m["plan"]["stages"],
        "requests_fit": m["plan"].get("requests_fit"),
        "workload": m["plan"]["workload"],
        "duration_s": duration,
        "slo": {"ttft_ms": slo.ttft_ms, "itl_ms": slo.itl_ms, "e2e_ms": slo.e2e_ms},
        "requests": m["requests"],
        "server_requests_finished": finished,
        "locust_posts": locust_posts,
        "locust_failures": locust_fails,
        "overall": _latencies(run.requests, duration, slo),
        "by_workload": per,
        "errors": dict(Counter(r["error"][:160] for r in run.requests if "error" in r)),
        "kv": _kv(run.metrics, start, stop, m["plan"].get("saturated_from_s")),
        "prefix_cache": _prefix(run.metrics),
        "drain": m.get("drain"),
        "failover": _failover(run),
    }


def _prefix_line(p: dict) -> str:
    if p.get("hit_rate") is None:
        return "- prefix cache: no lookups recorded"
    return (
        f"- prefix cache: {p['hit_rate'] * 100:.1f}% of looked-up prompt tokens hit "
        f"({p['hits']:,.0f} of {p['queries']:,.0f})"
    )


def _f(v, digits=0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def markdown(s: dict) -> str:
    w, req, kv = s["workload"], s["requests"], s["kv"]
    stages = ", ".join(f"{st['users']} users to {st['until_s']:.0f} s" for st in s["stages"])
    slo = (
        ", ".join(f"{k.removesuffix('_ms').upper()} <= {v:g} ms" for k, v in s["slo"].items() if v)
        or "none"
    )
    lines = [
        f"# Load test: {s['scenario']} on `{s['model']}`",
        "",
        f"- load: {stages} ({s['duration_s']:.0f} s); workload `{w['kind']}`, "
        f"{w['max_tokens']} output tokens per request"
        + (
            ""
            if w["kind"] == "chat"
            else f", documents of {w['doc_tokens'][0]}-{w['doc_tokens'][1]} prompt tokens"
        )
        + (f", {w.get('turns')} turns per conversation" if w["kind"] == "multiturn" else ""),
        f"- server: max_model_len {s['max_model_len']}, KV capacity "
        f"{s['kv_capacity_tokens']:.0f} tokens"
        + (f" (~{s['requests_fit']:.1f} requests)" if s.get("requests_fit") else ""),
        f"- requests: {req['sent']} sent, {req['completed']} completed, {req['failed']} failed, "
        f"{req['lost']} lost; server finished {_f(s['server_requests_finished'])}; Locust POSTs "
        f"{s['locust_posts']} ({s['locust_failures']} failed)",
        f"- SLOs for goodput: {slo}",
        _prefix_line(s.get("prefix_cache") or {}),
        "",
        "| workload | requests | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | ITL p50/p90/p99 ms "
        "| E2E p50/p90/p99 ms | output tok/s | req/s | goodput req/s (share) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = (
        [*s["by_workload"].items(), ("all", s["overall"])]
        if len(s["by_workload"]) > 1
        else [("all", s["overall"])]
    )
    for name, r in rows:
        tri = lambda d: "/".join(_f(d[k], 1) for k in ("p50", "p90", "p99"))  # noqa: E731
        lines.append(
            f"| {name} | {r['completed']}/{r['requests']} | {tri(r['ttft_ms'])} | "
            f"{tri(r['tpot_ms'])} | {tri(r['itl_ms'])} | {tri(r['e2e_ms'])} | "
            f"{_f(r['output_tokens_per_s'], 1)} | {_f(r['requests_per_s'], 2)} | "
            f"{_f(r['goodput_rps'], 2)} ({_f((r['good_fraction'] or 0) * 100, 0)}%) |"
        )
    lines += [
        "",
        "| KV usage max | KV usage mean | running max | waiting max | preemptions "
        "| server gen tok/s | saturated KV p50 | saturated share >= 0.9 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    sat = kv.get("saturated", {})
    lines.append(
        f"| {_f(kv.get('max'), 3)} | {_f(kv.get('mean'), 3)} | "
        f"{_f(kv.get('running_max'))} | {_f(kv.get('waiting_max'))} | "
        f"{_f(kv.get('preemptions'))} | {_f(kv.get('server_generation_tokens_per_s'), 1)}"
        f" | {_f(sat.get('p50'), 3)} | {_f(sat.get(f'share_ge_{KV_SATURATED}'), 2)} |"
    )
    d = s.get("drain") or {}
    last = d.get("last_sample") or {}
    lines += [
        "",
        f"After the load: server {'idle' if d.get('idle') else 'NOT idle'} after "
        f"{_f(d.get('seconds'), 1)} s (KV usage {_f(last.get('kv_usage'), 3)}, running "
        f"{_f(last.get('running'))}, waiting {_f(last.get('waiting'))}).",
    ]
    fo = s.get("failover") or {}
    if fo.get("actions") is not None or fo.get("migrated") or fo.get("retried"):
        lines += [
            "",
            f"Faults: {fo['completed']} completed, {_f(fo['migrated'])} migrated mid-stream, "
            f"{_f(fo['retried'])} retried before their first token, {fo['failed_clean']} "
            f"cleanly failed, {fo['lost']} lost.",
        ]
    if fo.get("actions"):
        lines += ["", "| at s | action | target | ok | detail |", "|---|---|---|---|---|"]
        lines += [
            f"| {a['at_s']:.1f} | {a['action']} | {a['target']} | {a['ok']} | {a['detail']} |"
            for a in fo["actions"]
        ]
    if s["errors"]:
        lines += ["", "| error | count |", "|---|---|"]
        lines += [f"| {e} | {n} |" for e, n in sorted(s["errors"].items(), key=lambda x: -x[1])]
    lines += ["", "![latency](latency.png)", "", "![kv](kv.png)", ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path, slo: SLO | None = None) -> dict:
    from loadtest.plots import plot_kv, plot_latency

    d = Path(run_dir)
    run = Run.load(d)
    s = summarize(run, slo or SLO())
    (d / "summary.json").write_text(json.dumps(s, indent=1))
    (d / "report.md").write_text(markdown(s))
    plot_latency(run, d / "latency.png")
    plot_kv(run, d / "kv.png")
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.report", description=__doc__.split("\n")[0]
    )
    p.add_argument("run_dir")
    add_slo_args(p)
    args = p.parse_args(argv)
    try:
        s = write_report(args.run_dir, slo_from(args))
    except (FileNotFoundError, ValueError) as e:
        print(f"loadtest.report: error: {e}", file=sys.stderr)
        return 2
    print(markdown(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
