"""Acceptance: a client that disconnects mid-stream cancels its request everywhere; the KV-cache
usage the replicas export goes back to zero, and generation stops long before max_tokens."""

from __future__ import annotations

import json
import time

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


def test_client_gone_while_sending_its_body_logs_nothing(apps):
    """A client that closes its connection halfway through the request body (a load balancer's
    timeout, a killed client) costs nothing and logs no ERROR: the ingress sees the disconnect
    while reading the body, before any work starts. The app serves the next request."""
    import socket
    from urllib.parse import urlsplit

    from tests.serving.faults import LogWatch

    app = apps["unified"]
    url = urlsplit(app.v1 + "/completions")
    watch = LogWatch()
    watch.mark()
    for _ in range(4):
        with socket.create_connection((url.hostname, url.port), timeout=10) as s:
            s.sendall(
                f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
                "Content-Length: 4000\r\n\r\n"
                '{"model": "'.encode()
            )
            time.sleep(0.5)  # the ingress is now waiting for the rest of the body
    body = {"model": app.model, "prompt": "Hi", "max_tokens": 2, "temperature": 0}
    r = httpx.post(
        app.v1 + "/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    time.sleep(1.0)  # Serve writes its replica logs asynchronously
    errors = watch.errors()
    assert not errors, f"{len(errors)} errors logged; the first:\n{errors[0]}"
