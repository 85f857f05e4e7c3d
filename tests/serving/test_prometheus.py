"""Acceptance: a real Prometheus scraping the app's GET /metrics sees every request's TTFT."""

from __future__ import annotations

from urllib.parse import urlparse

import httpx
import pytest

from serving.metrics import METRIC_NAMES
from tests.serving.harness import API_KEY, Prometheus, metric_sum, scrape, wait_for

pytestmark = pytest.mark.ray

N_REQUESTS = 5


@pytest.fixture(scope="module")
def prometheus(apps):
    targets = []
    for a in apps.values():
        u = urlparse(a.metrics_url)
        targets.append((u.netloc, u.path))
    prom = Prometheus(targets)
    try:
        wait_for(prom.targets_up, 30, "prometheus targets up")
        yield prom
    finally:
        prom.stop()


def request(app, i: int, stream: bool = False) -> None:
    r = httpx.post(
        app.v1 + "/completions",
        timeout=60,
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={
            "model": app.model,
            "prompt": f"request {i}",
            "max_tokens": 3,
            "ignore_eos": True,
            "stream": stream,
        },
    )
    assert r.status_code == 200, r.text


def test_ttft_histogram_count_equals_requests(prometheus, app):
    name = "indexcache_time_to_first_token_seconds_count"
    promql = f'sum({name}{{model="{app.model}"}})'

    def caught_up():  # Prometheus holds what the app exports now (earlier tests sent requests)
        direct = metric_sum(scrape(app.metrics_url), name, model=app.model)
        return (direct,) if (prometheus.query(promql) or 0.0) == direct else None

    (base,) = wait_for(caught_up, 30, "prometheus to catch up with the app")
    for i in range(N_REQUESTS):
        request(app, i, stream=i % 2 == 0)
    wait_for(
        lambda: prometheus.query(promql) == base + N_REQUESTS,
        30,
        f"prometheus TTFT count == {base} + {N_REQUESTS}",
    )
    # Every request also reached the e2e histogram and (through the hub) the engine counters.
    e2e = f'sum(indexcache_e2e_request_latency_seconds_count{{model="{app.model}"}})'
    gen = f'sum(indexcache_generation_tokens_total{{model="{app.model}"}})'
    wait_for(
        lambda: (
            (prometheus.query(e2e) or 0) >= N_REQUESTS
            and (prometheus.query(gen) or 0) >= 3 * N_REQUESTS
        ),
        30,
        "e2e and token counters",
    )


def test_every_metric_name_is_exported(apps):
    for a in apps.values():
        request(a, 0)
    names = {n for a in apps.values() for n, _, _ in scrape(a.metrics_url)}
    families = {
        n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for n in names
    }
    missing = [m for m in METRIC_NAMES if m not in families]
    assert not missing, f"declared in serving/metrics.py but not exported: {missing}"
