"""Acceptance: a client that disconnects mid-stream cancels its request everywhere; the KV-cache
usage the replicas export goes back to zero, and generation stops long before max_tokens."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.serving.harness import API_KEY, metric_sum, scrape, wait_for

pytestmark = pytest.mark.ray


def test_disconnect_mid_stream_frees_kv(app):
    body = {
        "model": app.model,
        "prompt": "Once upon a time",
        "max_tokens": 3500,
        "ignore_eos": True,
        "stream": True,
        "temperature": 0,
    }
    before = metric_sum(scrape(app.metrics_url), "indexcache_generation_tokens_total")
    seen_busy = False
    with (
        httpx.Client(timeout=60) as http,
        http.stream(
            "POST",
            app.v1 + "/completions",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as r,
    ):
        assert r.status_code == 200
        events = 0
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: ") :]
            assert payload != "[DONE]", "the stream ended before the disconnect"
            assert "error" not in json.loads(payload)
            events += 1
            if events >= 3 and not seen_busy:
                # While the request runs, some replica must report KV pages in use.
                seen_busy = bool(
                    wait_for(
                        lambda: (
                            metric_sum(scrape(app.metrics_url), "indexcache_kv_cache_usage_ratio")
                            > 0
                        ),
                        20,
                        "KV usage > 0 while streaming",
                    )
                )
                break
    # Leaving the `with` block closed the connection mid-stream.
    assert seen_busy
    wait_for(
        lambda: (
            metric_sum(scrape(app.metrics_url), "indexcache_kv_cache_usage_ratio") == 0
            and metric_sum(scrape(app.metrics_url), "indexcache_num_requests_running") == 0
        ),
        30,
        "KV usage and running requests back to 0 after the disconnect",
    )
    generated = metric_sum(scrape(app.metrics_url), "indexcache_generation_tokens_total") - before
    assert 0 < generated < 3000, f"{generated} tokens generated: the request was not cancelled"
