"""What a load test reads from the server: the model card, the tokenizer's characters per token,
and the /metrics gauges and counters (KV usage and capacity, queue depths, preemptions).

Plain urllib, so it works both inside Locust (gevent-patched sockets) and in the CLI process.
KV figures count the engines that hold KV for a request's whole life (roles `unified` and
`decode`); a prefill replica's pages are freed as soon as its payload leaves.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from loadtest import corpus

KV_ROLES = ("unified", "decode")


class ServerError(RuntimeError):
    pass


def _call(url: str, api_key: str | None, body: dict | None = None, timeout: float = 30) -> bytes:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        raise ServerError(f"{url}: HTTP {e.code}: {e.read()[:300].decode(errors='replace')}") from e
    except (urllib.error.URLError, OSError) as e:
        raise ServerError(f"{url}: {e}") from e


@dataclass(frozen=True)
class ModelInfo:
    id: str
    max_model_len: int


def model_info(host: str, api_key: str | None = None) -> ModelInfo:
    cards = json.loads(_call(f"{host}/v1/models", api_key))["data"]
    if not cards:
        raise ServerError(f"{host}/v1/models lists no model")
    card = cards[0]
    if not card.get("max_model_len"):
        raise ServerError(f"{host}/v1/models: model {card['id']!r} reports no max_model_len")
    return ModelInfo(card["id"], int(card["max_model_len"]))


def chars_per_token(
    host: str, model: str, api_key: str | None = None, sample_chars: int = 2000
) -> float:
    """Characters of corpus text per prompt token, from the usage of one 1-token completion."""
    text = corpus.corpus_text()[:sample_chars]
    body = {"model": model, "prompt": text, "max_tokens": 1, "temperature": 0}
    usage = json.loads(_call(f"{host}/v1/completions", api_key, body, timeout=120))["usage"]
    return len(text) / usage["prompt_tokens"]


@dataclass(frozen=True)
class MetricsSample:
    t: float  # unix time of the scrape
    kv_usage: float  # capacity-weighted over unified/decode engine replicas (0..1)
    kv_capacity_tokens: float  # summed over unified/decode engine replicas
    kv_capacity_per_replica: float  # the smallest engine replica's pool, prefill included
    running: float
    waiting: float
    preemptions: float  # cumulative
    generation_tokens: float  # cumulative
    requests_finished: float  # cumulative: e2e histogram count at the ingress
    migrations: float = 0.0  # cumulative: streams continued on another replica (failover)
    retries: float = 0.0  # cumulative: requests restarted before their first token
    prefix_queries: float = 0.0  # cumulative prompt tokens looked up in prefix caches (all roles)
    prefix_hits: float = 0.0  # cumulative: of those, found cached

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def parse_metrics(text: str, t: float) -> MetricsSample:
    usage: dict[tuple, float] = {}
    cap: dict[tuple, float] = {}
    smallest = float("inf")  # a prompt must fit every pool it passes through
    sums = {
        "running": 0.0,
        "waiting": 0.0,
        "preemptions": 0.0,
        "generation_tokens": 0.0,
        "requests_finished": 0.0,
        "migrations": 0.0,
        "retries": 0.0,
        "prefix_queries": 0.0,
        "prefix_hits": 0.0,
    }
    names = {
        "indexcache_num_requests_running": "running",
        "indexcache_num_requests_waiting": "waiting",
        "indexcache_num_preemptions_total": "preemptions",
        "indexcache_generation_tokens_total": "generation_tokens",
        "indexcache_e2e_request_latency_seconds_count": "requests_finished",
        "indexcache_request_migrations_total": "migrations",
        "indexcache_request_retries_total": "retries",
        "indexcache_prefix_cache_queries_total": "prefix_queries",
        "indexcache_prefix_cache_hits_total": "prefix_hits",
    }
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.labels.get("role"), s.labels.get("replica"))
            if s.name == "indexcache_kv_cache_usage_ratio" and key[0] in KV_ROLES:
                usage[key] = s.value
            elif s.name == "indexcache_kv_cache_capacity_tokens":
                smallest = min(smallest, s.value)
                if key[0] in KV_ROLES:
                    cap[key] = s.value
            elif s.name in names:
                sums[names[s.name]] += s.value
    total = sum(cap.get(k, 0.0) for k in usage)
    if total:
        kv = sum(u * cap.get(k, 0.0) for k, u in usage.items()) / total
    else:
        kv = sum(usage.values()) / len(usage) if usage else 0.0
    return MetricsSample(t, kv, sum(cap.values()), smallest if cap else 0.0, **sums)


def scrape(host: str, api_key: str | None = None, timeout: float = 10) -> MetricsSample:
    text = _call(f"{host}/metrics", api_key, timeout=timeout).decode()
    return parse_metrics(text, time.time())


def wait_for_capacity(
    host: str, api_key: str | None = None, timeout_s: float = 60
) -> MetricsSample:
    """The first scrape that reports KV capacity (engine replicas publish metrics periodically,
    so a freshly started app may not have them yet)."""
    deadline = time.monotonic() + timeout_s
    while True:
        sample = scrape(host, api_key)
        if sample.kv_capacity_tokens > 0:
            return sample
        if time.monotonic() > deadline:
            raise ServerError(
                f"{host}/metrics reports no indexcache_kv_cache_capacity_tokens "
                f"after {timeout_s:.0f}s"
            )
        time.sleep(0.5)


def is_idle(s: MetricsSample) -> bool:
    return s.kv_usage == 0 and s.running == 0 and s.waiting == 0


class MetricsRecorder:
    """Scrapes /metrics every `interval_s` in a background thread (a greenlet under Locust) and
    appends each sample to a CSV, so a run that dies still leaves its timeline."""

    def __init__(self, host: str, csv_path, api_key: str | None = None, interval_s: float = 1.0):
        import threading

        self.host, self.api_key, self.interval_s = host, api_key, interval_s
        self.path = csv_path
        self.samples: list[MetricsSample] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-scraper", daemon=True)

    def start(self) -> MetricsRecorder:
        self._thread.start()
        return self

    def sample(self) -> MetricsSample | None:
        try:
            s = scrape(self.host, self.api_key)
        except ServerError:
            self.errors += 1
            return None
        import csv

        new = not self.samples
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(s.as_row()))
            if new:
                w.writeheader()
            w.writerow(s.as_row())
        self.samples.append(s)
        return s

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            self.sample()
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - t0)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def drain(self, timeout_s: float) -> tuple[bool, float]:
        """After the load stops: keep sampling until a sample taken from now on shows the server
        idle (no KV pages in use, nothing running or waiting). Returns (idle, seconds waited)."""
        t0, since = time.monotonic(), time.time()
        while True:
            s = self.samples[-1] if self.samples else None
            if s is not None and s.t >= since and is_idle(s):
                return True, time.monotonic() - t0
            if time.monotonic() - t0 > timeout_s:
                return False, time.monotonic() - t0
            time.sleep(self.interval_s / 2)
