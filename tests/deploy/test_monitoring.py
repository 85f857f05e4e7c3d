"""The dashboard and alerts query only series that exist: the app's, as its real /metrics
exposition names them, and (alerts only) Ray Serve's own, as the installed Ray declares them."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy import k8s, promql
from tests.deploy.conftest import one
from tests.deploy.ray_metrics import serve_series

DASHBOARD = k8s.K8S / "base" / "monitoring" / "grafana-dashboard.json"


@pytest.fixture(scope="module")
def app_series() -> set[str]:
    """Sample names in the app's GET /metrics text after one of everything was recorded."""
    from serving import metrics

    rec = metrics.Recorder("deploy-test", "decode", "r0")
    rec.observe_ttft(0.1)
    rec.observe_itl(0.01)
    rec.observe_e2e(1.0)
    rec.observe_kv_transfer(0.01, 1024)
    rec.count_prefill_route(True)
    rec.count_prefill_route(False)
    rec.update_engine(
        {
            "prompt_tokens_total": 5,
            "generation_tokens_total": 3,
            "num_preemptions": 1,
            "indexer_layers_run_total": 2,
            "indexer_layers_skipped_total": 6,
            "num_running": 1,
            "num_waiting": 0,
            "kv_usage": 0.5,
            "kv_cached": 0.25,
            "prefix_cache_pages": 4,
            "handoffs_waiting": 1,
            "num_exporting": 2,
            "prefix_cache_queries_total": 100,
            "prefix_cache_hits_total": 64,
            "prefix_cache_evictions_total": 1,
            "kv_capacity_tokens": 1024,
            "f_layer_ratio": 0.25,
            "plan_version": 1,
            "plan_error": 0,
        }
    )
    rec.count_failover(migrated=False)
    rec.count_failover(migrated=True)
    text = metrics.render([metrics.snapshot()]).decode()
    families = list(text_string_to_metric_families(text))
    exposed = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    assert exposed == set(metrics.METRIC_NAMES)  # METRIC_NAMES is what /metrics serves
    return {s.name for f in families for s in f.samples}


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]
    out += [
        (f"variable {v['name']}", v["definition"])
        for v in dash["templating"]["list"]
        if v["type"] == "query"
    ]
    return out


def _label_values_metric(expr: str) -> str:
    # label_values(metric, label) is Grafana's, not PromQL: check the metric inside it.
    return expr[len("label_values(") :].split(",")[0].strip()


def test_dashboard_queries_name_only_exported_series(app_series):
    from serving import metrics

    allowed_labels = set(metrics.LABELS) | {"le"}
    for title, expr in dashboard_exprs():
        if expr.startswith("label_values("):
            assert _label_values_metric(expr) in app_series, title
            continue
        refs = promql.refs(promql.interpolate_grafana(expr))
        assert refs.metrics, f"{title}: no metric in {expr}"
        assert refs.metrics <= app_series, f"{title}: {refs.metrics - app_series} not exported"
        assert refs.labels <= allowed_labels, f"{title}: unknown labels {refs.labels}"


def test_dashboard_covers_the_serving_signals():
    dash = json.loads(DASHBOARD.read_text())
    by_title = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dash["panels"]}
    wanted = {
        "Time to first token": "indexcache_time_to_first_token_seconds_bucket",
        "Inter-token latency": "indexcache_inter_token_latency_seconds_bucket",
        "Tokens per second": "indexcache_generation_tokens_total",
        "KV cache usage": "indexcache_kv_cache_usage_ratio",
        "Queue": "indexcache_num_requests_waiting",
        "Indexer layers skipped": "indexcache_indexer_layers_skipped_total",
        "Replicas per role": "count by (role)",
        "Prefix cache": "indexcache_prefix_cache_hits_total",
        "Selective disaggregation": "indexcache_local_prefill_requests_total",
    }
    for title, needle in wanted.items():
        assert needle in by_title.get(title, ""), title
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_checker_rejects_a_metric_the_app_does_not_export(app_series):
    refs = promql.refs(
        promql.interpolate_grafana(
            'sum(rate(indexcache_tokens_generated_total{model=~"$model"}[$__rate_interval]))'
        )
    )
    assert refs.metrics - app_series == {"indexcache_tokens_generated_total"}


def test_dashboard_ships_in_the_configmap(rendered):
    cm = one(rendered["prod"], "ConfigMap", "indexcache-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["indexcache.json"]) == json.loads(DASHBOARD.read_text())


def test_alert_rules_name_only_existing_series(rendered, app_series):
    from serving import metrics

    rule = one(rendered["prod"], "PrometheusRule", "indexcache")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {
        "IndexCacheTTFTHigh",
        "IndexCacheKVCacheNearlyFull",
        "IndexCacheHighErrorRate",
        "IndexCacheNoHealthyReplicas",
    } <= set(alerts)
    ray = serve_series()
    assert "ray_serve_num_http_requests_total" in ray  # the extraction itself works
    for name, r in alerts.items():
        refs = promql.refs(r["expr"])
        unknown = refs.metrics - app_series - ray
        assert not unknown, f"{name}: {unknown} exported by neither the app nor Ray Serve"
        if refs.metrics <= app_series:
            assert refs.labels <= set(metrics.LABELS) | {"le"}, name
        assert r["labels"]["severity"] in ("warning", "critical")
    assert "indexcache_time_to_first_token_seconds_bucket" in alerts["IndexCacheTTFTHigh"]["expr"]


def test_alerts_select_the_rendered_application(rendered):
    """Ray Serve series carry the Serve application name; it must be the one deployed."""
    import yaml

    rs = one(rendered["prod"], "RayService", "indexcache")
    app_name = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["name"]
    rule = one(rendered["prod"], "PrometheusRule", "indexcache")
    for g in rule["spec"]["groups"]:
        for r in g["rules"]:
            if "ray_serve_" in r["expr"]:
                assert f'application="{app_name}"' in r["expr"], r["alert"]
