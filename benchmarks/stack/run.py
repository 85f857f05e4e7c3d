"""One plan through the whole stack: `indexcache serve --mode disaggregated` on the checkpoint that
benchmarks/stack/model.py wrote, one request through the official openai client, then
`indexcache loadtest --scenario saturate`, then the server stopped and its memory given back.

    python -m benchmarks.stack.run --model /tmp/stack-model --plan all-F --out /tmp/stack-runs/all-F

Plans: all-F (every layer indexes) and quarter (one F layer in four, FSSS...), on the same KV
byte budgets (stack.yaml). The load test's documents and output length come from sizing.json, so
both plans get the same requests; its users follow each plan's KV capacity (a 1/4 pool holds
more tokens, so more requests). Writes server.log and stack-run.json beside the load test's files.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks.saturation import quarter_pattern

PLANS = ("all-F", "quarter")


def pattern_for(plan: str, layers: int) -> str:
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")
    return "F" * layers if plan == "all-F" else quarter_pattern(layers)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def start_server(model: Path, pattern: str, log: Path, timeout_s: float) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--config", str(model / "stack.yaml")]
    cmd += ["--index-cache", pattern, "--timeout", f"{timeout_s:g}"]
    with open(log, "wb") as f:  # its own session: stopping it reaches Ray's processes too
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def wait_up(proc: subprocess.Popen, url: str, log: Path, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{_tail(log)}")
        if "is up" in log.read_text(errors="replace") and _healthy(url):
            return time.monotonic() - t0
        time.sleep(2)
    raise TimeoutError(f"the server was not up after {timeout_s:.0f} s:\n{_tail(log)}")


def stop_server(proc: subprocess.Popen, timeout_s: float = 45.0) -> None:
    """SIGTERM (the CLI then shuts Serve and its local Ray cluster down), SIGKILL if it hangs."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    try:  # Ray workers outlive the driver for a moment: wait for the group to empty
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            os.killpg(proc.pid, 0)
            time.sleep(1)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(log: Path, n: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def smoke_request(url: str, model: str) -> dict:
    """One chat completion through the official client: the path a user meets, end to end."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
    t0 = time.monotonic()
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8
    )
    return {"seconds": time.monotonic() - t0, "completion_tokens": r.usage.completion_tokens}


def run(args) -> dict:
    import yaml

    conf = yaml.safe_load((args.model / "stack.yaml").read_text())
    sizing = json.loads((args.model / "sizing.json").read_text())
    layers = json.loads((args.model / "config.json").read_text())["num_hidden_layers"]
    pattern = pattern_for(args.plan, layers)
    url = f"http://127.0.0.1:{conf['ingress']['port']}"
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "server.log"
    record = {"plan": args.plan, "pattern": pattern, "layers": layers, "sizing": sizing}
    if _healthy(url):
        raise RuntimeError(f"something already serves {url}: stop it first")
    print(f"run: {args.plan} ({pattern}) serving ...", flush=True)
    proc = start_server(args.model, pattern, log, args.start_timeout)
    try:
        record["server_start_s"] = wait_up(proc, url, log, args.start_timeout + 30)
        print(f"run: server up in {record['server_start_s']:.0f} s", flush=True)
        record["smoke"] = smoke_request(url, conf["served_model_name"])
        work = sizing["workload"]
        cmd = [sys.executable, "-m", "serving.cli", "loadtest", "--host", url]
        cmd += ["--scenario", "saturate", "--duration", f"{args.duration:g}", "--quiet"]
        cmd += ["--doc-tokens", str(work["doc_tokens"]), "--max-tokens", str(work["max_tokens"])]
        cmd += ["--out", str(args.out), "--stop-timeout", f"{args.stop_timeout:g}"]
        cmd += ["--drain-timeout", "60", "--slo-ttft-ms", str(args.slo_ttft_ms)]
        cmd += ["--slo-itl-ms", str(args.slo_itl_ms)]
        t0 = time.monotonic()
        cap = args.duration + args.stop_timeout + 180
        record["loadtest_rc"] = subprocess.call(cmd, timeout=cap)
        record["loadtest_s"] = time.monotonic() - t0
    finally:
        stop_server(proc)
        record["server_log_tail"] = _tail(log, 30)
        (args.out / "stack-run.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="benchmarks/stack/model.py --out")
    ap.add_argument("--plan", choices=PLANS, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    ap.add_argument("--start-timeout", type=float, default=420.0, help="a device call has 600 s")
    ap.add_argument("--stop-timeout", type=float, default=60.0)
    ap.add_argument("--slo-ttft-ms", type=float, default=5000.0)
    ap.add_argument("--slo-itl-ms", type=float, default=100.0)
    args = ap.parse_args(argv)
    # `timeout` (run_stack.sh keeps each device call inside its limit) sends SIGTERM: unwind, so
    # the load test is killed, the server stopped and stack-run.json written before the end.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    rec = run(args)
    print(f"run: {args.plan}: load test exit status {rec['loadtest_rc']}", flush=True)
    return rec["loadtest_rc"]


if __name__ == "__main__":
    sys.exit(main())
