"""`indexcache loadtest`: run Locust headless against a server, then write the report.

    indexcache loadtest --host http://127.0.0.1:8000 --scenario saturate --duration 120 --out DIR

Runs loadtest/locustfile.py in a Locust subprocess (its periodic stats table is the progress
display), then loadtest/report.py on the run directory: report.md, summary.json, latency.png,
kv.png next to Locust's CSVs. Exit status 0 only when every request completed (none failed, none
lost), the server drained (KV usage, running and waiting back to zero) and, for `saturate`, the
KV pool stayed at >= 90% usage (median) in the oversubscribed stage; 1 otherwise. `chaos` kills
replicas and rolls out a plan meanwhile (loadtest/chaos.py, on the Ray cluster of `--ray-address`
or the one `indexcache serve` recorded); it passes when no request was lost (failures the server
reported cleanly are counted, not fatal) and every fault was injected.
"""

from __future__ import annotations

SATURATED_KV = 0.9


def register(p) -> None:
    from loadtest.plan import SCENARIOS
    from loadtest.slo import add_slo_args
    from loadtest.workloads import WORKLOADS

    p.add_argument("--host", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--scenario", choices=SCENARIOS, default="smoke")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--out", default=None, help="run directory (default: loadtest-<scenario>)")
    p.add_argument(
        "--users",
        type=int,
        default=None,
        help="constant users instead of the scenario's (saturate: its steps)",
    )
    p.add_argument(
        "--workload", choices=WORKLOADS, default=None, help="override the scenario's workload"
    )
    p.add_argument("--max-tokens", type=int, default=None, help="output tokens per request")
    p.add_argument(
        "--doc-tokens",
        type=int,
        default=None,
        help="largest document prompt in tokens (documents draw from [N/2, N])",
    )
    p.add_argument(
        "--turns", type=int, default=None, help="multiturn: turns per conversation (default 4)"
    )
    p.add_argument(
        "--oversubscribe",
        type=float,
        default=1.5,
        help="saturate: top-step users as a multiple of what the KV pool holds",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None, help="Bearer key of the server")
    p.add_argument(
        "--stop-timeout",
        type=float,
        default=600.0,
        help="seconds users may take to finish their last request at the end",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="seconds to wait after the load for the server to go idle",
    )
    p.add_argument("--quiet", action="store_true", help="no periodic Locust stats table")
    p.add_argument("--app", default="indexcache", help="chaos: the Serve application name")
    p.add_argument(
        "--ray-address",
        default=None,
        help="chaos: the server's Ray cluster (default: the one `indexcache serve` recorded)",
    )
    add_slo_args(p)
    p.set_defaults(run=run)


def locust_command(args, out) -> list[str]:
    import sys
    from pathlib import Path

    import loadtest

    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(Path(loadtest.__file__).parent / "locustfile.py"),
        "--headless",
        "--host",
        args.host.rstrip("/"),
        "--csv",
        str(out / "locust"),
        "--stop-timeout",
        f"{args.stop_timeout:g}",
        "--scenario",
        args.scenario,
        "--duration",
        f"{args.duration:g}",
        "--out-dir",
        str(out),
        "--seed",
        str(args.seed),
        "--oversubscribe",
        f"{args.oversubscribe:g}",
        "--drain-timeout",
        f"{args.drain_timeout:g}",
    ]
    for flag, value in (
        ("-u", args.users),
        ("--workload", args.workload),
        ("--max-tokens", args.max_tokens),
        ("--doc-tokens", args.doc_tokens),
        ("--turns", args.turns),
        ("--api-key", args.api_key),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    if args.quiet:
        cmd.append("--only-summary")
    return cmd


def verdict(summary: dict) -> list[str]:
    """What went wrong, one line each (empty: the run passed)."""
    problems = []
    req = summary["requests"]
    if summary["scenario"] == "chaos":
        from loadtest.chaos import SCHEDULE

        fo = summary["failover"]
        if fo["lost"]:
            problems.append(f"{fo['lost']} requests were lost (no answer, or a cut stream)")
        bad = [a for a in fo["actions"] or [] if not a["ok"]]
        if fo["actions"] is None or bad or len(fo["actions"]) < len(SCHEDULE):
            problems.append(f"not every fault was injected: {bad or fo['actions']}")
    elif req["failed"]:
        problems.append(f"{req['failed']} requests failed")
    if req["lost"] and summary["scenario"] != "chaos":
        problems.append(f"{req['lost']} requests were in flight when Locust stopped (lost)")
    drain = summary.get("drain") or {}
    if not drain.get("idle"):
        problems.append(
            "the server did not return to zero KV usage / no running or waiting "
            f"requests within the drain timeout (last: {drain.get('last_sample')})"
        )
    sat = summary["kv"].get("saturated")
    if summary["scenario"] == "saturate" and summary.get("requests_fit") is not None:
        if not sat or sat["p50"] < SATURATED_KV:
            problems.append(
                f"KV usage in the oversubscribed stage: median "
                f"{sat['p50'] if sat else 'n/a'} < {SATURATED_KV}: the pool never "
                "filled (max_num_seqs below the requests it holds, or prefill too "
                "slow to keep up: see waiting in kv.png)"
            )
    return problems


def _chaos(args, out):
    import ray

    from loadtest.chaos import ChaosMonkey
    from serving.cli.address import resolve
    from serving.env import apply_ray_local_env

    if not ray.is_initialized():
        apply_ray_local_env()
        ray.init(address=resolve(args.ray_address), log_to_driver=False)
    return ChaosMonkey(args.app, args.duration, out).start()


def run(args) -> int:
    import subprocess
    import sys
    from pathlib import Path

    from loadtest.report import write_report
    from loadtest.slo import slo_from

    if args.duration <= 0:
        raise ValueError(f"--duration must be > 0, got {args.duration}")
    slo = slo_from(args)
    out = Path(args.out or f"loadtest-{args.scenario}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").unlink(missing_ok=True)
    (out / "chaos.json").unlink(missing_ok=True)
    monkey = _chaos(args, out) if args.scenario == "chaos" else None
    try:
        rc = subprocess.call(locust_command(args, out))
    finally:
        if monkey is not None:
            monkey.stop()
    if not (out / "run.json").is_file():
        print(
            f"indexcache loadtest: Locust exited with status {rc} before the load started "
            "(see its message above)",
            file=sys.stderr,
        )
        return 2
    summary = write_report(out, slo)
    print((out / "report.md").read_text())
    problems = verdict(summary)
    for p in problems:
        print(f"indexcache loadtest: FAILED: {p}", file=sys.stderr)
    if rc not in (0, 1):  # 1 = Locust saw failures, reported above
        print(f"indexcache loadtest: Locust exited with status {rc}", file=sys.stderr)
        problems.append("locust")
    print(f"report: {out / 'report.md'}")
    return 1 if problems else 0
