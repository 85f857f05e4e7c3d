"""`indexcache serve` as a user runs it: its own Ray cluster, the default model made on first
use, the printed URL and curl example working as printed, Ctrl-C to stop."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from serving.cli.serve import cluster_cpus, resolve_config
from tests.serving.harness import free_port, wait_for


class Args:
    config = model = mode = host = port = api_key = index_cache = graceful_shutdown_timeout = None


def test_resolve_config_makes_the_default_model(tmp_path, monkeypatch):
    monkeypatch.setenv("INDEXCACHE_HOME", str(tmp_path))
    cfg = resolve_config(Args())
    assert cfg.model == str(tmp_path / "models" / "smollm2-dsa") and cfg.mode == "unified"
    cfg_json = json.loads((tmp_path / "models" / "smollm2-dsa" / "config.json").read_text())
    assert cfg_json["model_type"] == "dsa_llama"
    assert cfg_json["index_topk_pattern"].count("F") == 8  # the searched 1/4 plan
    assert (cfg.ingress.host, cfg.ingress.port) == ("127.0.0.1", 8000)
    assert cluster_cpus(cfg) >= 2  # an engine (1 CPU) + the ingress (0.5) always fit


def test_flags_override_the_config_file(tmp_path, tiny_dir):
    path = tmp_path / "s.yaml"
    path.write_text(f"model: {tiny_dir('glm_moe_dsa')}\ningress: {{port: 9100, num_cpus: 0.1}}\n")
    args = Args()
    args.config, args.mode, args.api_key = str(path), "disaggregated", ["k"]
    cfg = resolve_config(args)
    assert (cfg.mode, cfg.ingress.port, cfg.ingress.num_cpus) == ("disaggregated", 9100, 0.1)
    assert cfg.ingress.api_keys == ("k",)


@pytest.mark.slow
@pytest.mark.ray
def test_indexcache_serve_end_to_end(tmp_path):
    port = free_port()
    env = {**os.environ, "INDEXCACHE_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops the server" in line:
                break
        out = "".join(lines)
        assert f"http://127.0.0.1:{port}/v1" in out, out[-3000:]
        curl = next(ln for ln in lines if ln.startswith("curl "))
        res = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=60)
        body = json.loads(res.stdout)
        assert body["object"] == "chat.completion" and 1 <= body["usage"]["completion_tokens"] <= 16
        # The embedded default is a real model: it answers sensibly through the OpenAI endpoint.
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        answer = client.chat.completions.create(
            model=client.models.list().data[0].id,
            temperature=0,
            max_tokens=24,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        assert "Paris" in answer.choices[0].message.content
    finally:
        proc.send_signal(signal.SIGTERM)  # what a supervisor sends; Ctrl-C takes the same path
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (from /proc), e.g. Ray's GCS, raylet and workers."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _serve(tmp_path, *args) -> subprocess.Popen:
    env = {**os.environ, "INDEXCACHE_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _stream(url: str, body: dict, out: dict) -> None:
    """Read one SSE stream to its end into `out` (events, errors, done)."""
    out.update(events=0, errors=[], done=False, finish=None)
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        out["status"] = r.status_code
        for line in r.iter_lines():
            if line == "data: [DONE]":
                out["done"] = True
            elif line.startswith("data: "):
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    out["errors"].append(chunk["error"])
                else:
                    out["events"] += 1
                    out["finish"] = chunk["choices"][0].get("finish_reason") or out["finish"]


@pytest.mark.slow
@pytest.mark.ray
def test_sigterm_drains_then_exits_0_leaving_no_process(tmp_path, tiny_dir):
    """SIGTERM under load: new requests get 503 + Retry-After at once, a stream that can finish
    within the graceful timeout does, the one that cannot ends with an error event; exit 0 and
    every process of the cluster gone. Also: `indexcache plans` finds the recorded cluster."""
    port = free_port()
    proc = _serve(
        tmp_path, "--model", tiny_dir("glm_moe_dsa"), "--port", str(port),
        "--graceful-shutdown-timeout", "10",
    )  # fmt: skip
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and "Ctrl-C stops" not in "".join(lines[-3:]):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        assert "Ctrl-C stops" in "".join(lines), "".join(lines)[-3000:]
        env = {**os.environ, "INDEXCACHE_HOME": str(tmp_path)}
        listed = subprocess.run(
            [sys.executable, "-m", "serving.cli", "plans", "list"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert listed.returncode == 0 and "no plans" in listed.stdout, listed.stderr[-2000:]

        url = f"http://127.0.0.1:{port}/v1/completions"
        model = json.loads(httpx.get(f"http://127.0.0.1:{port}/v1/models").text)["data"][0]["id"]
        stream = {"model": model, "prompt": "Hi", "stream": True, "ignore_eos": True}
        short, long_ = {}, {}
        threads = [
            # ~1 s of decoding (the tiny model streams ~100 tokens/s here): still running at
            # SIGTERM, done well within the 10 s; the other needs minutes.
            threading.Thread(target=_stream, args=(url, {**stream, "max_tokens": 80}, short)),
            threading.Thread(target=_stream, args=(url, {**stream, "max_tokens": 4000}, long_)),
        ]
        for t in threads:
            t.start()
        wait_for(lambda: short.get("events") and long_.get("events"), 60, "both streams")
        family = _descendants(proc.pid)
        assert len(family) >= 3  # GCS, raylet, workers

        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()

        def refused():
            r = httpx.post(url, json={"model": model, "prompt": "x", "max_tokens": 1}, timeout=30)
            return r if r.status_code == 503 else None

        r = wait_for(refused, 10, "new requests to be refused")
        assert r.json()["error"]["code"] == "shutting_down" and int(r.headers["Retry-After"]) > 0
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 503
        for t in threads:
            t.join(60)
        assert short["done"] and not short["errors"] and short["finish"] == "length"
        assert long_["done"] and [e["code"] for e in long_["errors"]] == ["shutting_down"], long_
        assert proc.wait(timeout=60) == 0
        assert time.monotonic() - t0 < 45
        wait_for(lambda: not any(_alive(p) for p in family), 20, "no orphaned process")
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + proc.stdout.read()
    # the two streams, plus any probe that reached the ingress before it began refusing
    drained = re.search(r"draining: (\d+) request\(s\) in flight", out)
    assert drained and int(drained.group(1)) >= 2 and "stopped" in out, out[-3000:]
    assert not (tmp_path / "ray-cluster.json").exists()  # the record goes with the server


def test_startup_failure_before_ray_is_one_line(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "nope"}))
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "serving.cli", "serve", "--model", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2 and time.monotonic() - t0 < 60
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("indexcache serve: error:"), res.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_a_replica_that_cannot_start_fails_the_command_in_one_line(tmp_path, tiny_dir):
    """Weights that do not load: Serve would retry the replica; the command stops at the first
    failure, names the cause in one line and takes its cluster down."""
    import shutil

    model = tmp_path / "broken"
    shutil.copytree(tiny_dir("glm_moe_dsa"), model)
    for f in model.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])  # truncated: the header is unreadable
    proc = _serve(tmp_path, "--model", str(model), "--port", str(free_port()))
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out[-3000:]
    ours = [ln for ln in out.splitlines() if ln.startswith("indexcache serve: error: ")]
    assert len(ours) == 1 and out.strip().splitlines()[-1] == ours[0], out[-3000:]
    assert "UnifiedServer failed to start" in ours[0] and "Error" in ours[0]
    assert "Traceback" not in out
