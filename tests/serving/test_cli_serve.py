"""`indexcache serve` as a user runs it: its own Ray cluster, the default model made on first
use, the printed URL and curl example working as printed, Ctrl-C to stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from serving.cli.serve import cluster_cpus, resolve_config
from tests.serving.harness import free_port


class Args:
    config = model = mode = host = port = api_key = index_cache = None


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
