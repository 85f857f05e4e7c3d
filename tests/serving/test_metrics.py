"""Metric definitions and the merge the ingress serves at GET /metrics."""

from __future__ import annotations

import pickle

from prometheus_client.parser import text_string_to_metric_families

from serving import metrics


def families(text: bytes) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def test_names_are_prefixed_and_unique():
    assert len(set(metrics.METRIC_NAMES)) == len(metrics.METRIC_NAMES) >= 14
    assert all(n.startswith("indexcache_") for n in metrics.METRIC_NAMES)
    for n in (
        "indexcache_time_to_first_token_seconds",
        "indexcache_kv_cache_usage_ratio",
        "indexcache_prompt_tokens_total",
        "indexcache_kv_transfer_bytes_total",
        "indexcache_indexer_layers_run_total",
        "indexcache_f_layer_ratio",
    ):
        assert n in metrics.METRIC_NAMES


def test_engine_totals_become_counter_increments():
    r = metrics.Recorder("m-counter-test", "decode", "r1")
    r.update_engine(
        {
            "prompt_tokens_total": 10,
            "generation_tokens_total": 4,
            "kv_usage": 0.5,
            "num_running": 2,
            "kv_capacity_tokens": 1024,
        }
    )
    r.update_engine(
        {"prompt_tokens_total": 25, "generation_tokens_total": 4, "kv_usage": 0.0, "num_running": 0}
    )
    labels = {"model": "m-counter-test", "role": "decode", "replica": "r1"}
    get = metrics.REGISTRY.get_sample_value
    assert get("indexcache_prompt_tokens_total", labels) == 25
    assert get("indexcache_generation_tokens_total", labels) == 4
    assert get("indexcache_kv_cache_usage_ratio", labels) == 0.0
    assert get("indexcache_kv_cache_capacity_tokens", labels) == 1024  # kept: not re-reported
    assert get("indexcache_num_preemptions_total", labels) is None  # not reported: not created
    r.update_engine({"num_preemptions": 0})
    assert get("indexcache_num_preemptions_total", labels) == 0.0  # reported: exported at 0


def test_render_merges_replicas_into_one_valid_exposition():
    a = metrics.Recorder("m-merge-test", "ingress", "a")
    a.observe_ttft(0.05)
    a.observe_ttft(3.0)
    snap_a = pickle.loads(pickle.dumps(metrics.snapshot()))  # what crosses Ray to the hub
    # A second process's snapshot: same families, other labels.
    b = pickle.loads(pickle.dumps(snap_a))
    for fam in b:
        fam.samples = [s._replace(labels={**s.labels, "replica": "b"}) for s in fam.samples]
    text = metrics.render([snap_a, b])
    fams = families(text)
    ttft = fams["indexcache_time_to_first_token_seconds"]
    counts = {
        s.labels["replica"]: s.value
        for s in ttft.samples
        if s.name.endswith("_count") and s.labels["model"] == "m-merge-test"
    }
    assert counts == {"a": 2.0, "b": 2.0}
    assert text.count(b"# TYPE indexcache_time_to_first_token_seconds histogram") == 1
    buckets = [
        s
        for s in ttft.samples
        if s.name.endswith("_bucket")
        and s.labels["replica"] == "a"
        and s.labels["model"] == "m-merge-test"
    ]
    assert [float(s.labels["le"]) for s in buckets][:3] == [0.001, 0.005, 0.01]
