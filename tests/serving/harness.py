"""Test harness for the serving suite: one local Ray cluster, Serve apps, a real Prometheus."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-indexcache-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.25):
    """Poll until `predicate()` returns a truthy value; fail naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what} (last: {last!r})")


# -- /metrics parsing ---------------------------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$")


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    text = httpx.get(url, timeout=10).text
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            out.append((m.group(1), labels, float(m.group(3))))
    return out


def metric_sum(samples, name: str, **labels) -> float:
    return sum(
        v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items())
    )


# -- Prometheus ---------------------------------------------------------------------------------
def prometheus_binary() -> Path:
    """Debian's prometheus, unpacked (no install, no root needed) into .cache/prometheus.
    Raises (never skips) when it cannot be had: CI has the Debian mirror."""
    root = REPO / ".cache" / "prometheus"
    binary = root / "root" / "usr" / "bin" / "prometheus"
    if binary.is_file():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    for d in root.glob("*.deb"):
        d.unlink()

    def download() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["apt-get", "download", "prometheus"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=300,
        )

    res = download()
    if res.returncode != 0 and os.geteuid() == 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
        res = download()
    debs = list(root.glob("prometheus_*.deb"))
    if res.returncode != 0 or not debs:
        raise RuntimeError(f"apt-get download prometheus failed: {res.stderr.strip()}")
    subprocess.run(["dpkg", "-x", str(debs[0]), str(root / "root")], check=True, timeout=120)
    if not binary.is_file():
        raise RuntimeError(f"{debs[0].name} has no usr/bin/prometheus")
    return binary


class Prometheus:
    """A real Prometheus server scraping loopback targets every second."""

    def __init__(self, targets: list[tuple[str, str]]):  # (host:port, metrics_path)
        self.dir = Path(tempfile.mkdtemp(prefix="prom"))
        self.port = free_port()
        jobs = "\n".join(
            f"  - job_name: job{i}\n    metrics_path: {path}\n"
            f"    static_configs:\n      - targets: ['{target}']"
            for i, (target, path) in enumerate(targets)
        )
        (self.dir / "prometheus.yml").write_text(
            f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{jobs}\n"
        )
        self.proc = subprocess.Popen(
            [
                str(prometheus_binary()),
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "log.txt", "w"),
        )
        wait_for(self._ready, 30, "prometheus to start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {(self.dir / 'log.txt').read_text()[-2000:]}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, promql: str) -> float | None:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10).json()
        result = r["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def targets_up(self) -> bool:
        r = httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()
        active = r["data"]["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
