"""Acceptance: publishing a plan to the registry changes the indexer layers run per token
(seen in the app's metrics) without restarting the app."""

from __future__ import annotations

import httpx
import pytest

from serving import plan_registry
from tests.serving.harness import API_KEY, metric_sum, scrape, wait_for

pytestmark = pytest.mark.ray


def _run_ratio(app, n_requests: int = 3) -> float:
    """Share of layer-token pairs that ran the indexer over `n_requests` fresh requests."""

    def totals():
        s = scrape(app.metrics_url)
        return (
            metric_sum(s, "indexcache_indexer_layers_run_total"),
            metric_sum(s, "indexcache_indexer_layers_skipped_total"),
            metric_sum(s, "indexcache_generation_tokens_total"),
        )

    run0, skip0, gen0 = totals()
    for i in range(n_requests):
        r = httpx.post(
            app.v1 + "/completions",
            headers={"Authorization": f"Bearer {API_KEY}"},
            json={
                "model": app.model,
                "prompt": f"plan {i}",
                "max_tokens": 4,
                "ignore_eos": True,
            },  # exactly 4 tokens: no early EOS
            timeout=60,
        )
        assert r.status_code == 200, r.text
    wait_for(lambda: totals()[2] >= gen0 + 4 * n_requests, 20, "engine counters to update")
    run1, skip1, _ = totals()
    return (run1 - run0) / ((run1 - run0) + (skip1 - skip0))


def _replicas(app) -> set[str]:
    return {
        lab["replica"] for n, lab, _ in scrape(app.metrics_url) if n == "indexcache_plan_version"
    }


def _plan_versions(app) -> set[float]:
    return {v for n, _, v in scrape(app.metrics_url) if n == "indexcache_plan_version"}


def test_publish_plan_changes_indexer_work_without_restart(apps):
    app = apps["disaggregated"]  # both pools (prefill and decode) must follow
    replicas = _replicas(app)
    assert len(replicas) == 2
    assert _run_ratio(app) == pytest.approx(1.0)  # the tiny checkpoint's plan: all F

    version = plan_registry.publish(app.model, "FSSS", {"source": "pattern"})
    try:
        wait_for(lambda: _plan_versions(app) == {version}, 30, f"replicas on plan v{version}")
        assert _run_ratio(app) == pytest.approx(0.25)  # 1 of 4 layers runs its indexer
        assert _replicas(app) == replicas  # the same replicas: reconfigured, not restarted
        health = httpx.get(app.base_url + "/health", timeout=30).json()
        assert {e["plan_version"] for e in health["engines"]} == {version}
    finally:  # leave the all-F plan for the other tests
        back = plan_registry.publish(app.model, "FFFF", {"source": "pattern"})
        wait_for(lambda: _plan_versions(app) == {back}, 30, "replicas back on the all-F plan")
    assert _run_ratio(app) == pytest.approx(1.0)


def test_pinning_a_plan_through_user_config_reconfigures_in_place(apps):
    """The Serve-native path: a new `plans.version` in the app config reaches the replicas as a
    user_config update (`reconfigure`), on the same replicas."""
    from ray import serve

    from serving.app import build_app
    from serving.cli.serve import wait_running

    app = apps["unified"]
    cfg = app.config
    replicas = _replicas(app)
    pinned = plan_registry.publish(app.model, "FSFS", {"source": "pattern"})

    def deploy(version):
        new = cfg.model_copy(update={"plans": cfg.plans.model_copy(update={"version": version})})
        serve.run(
            build_app(new), name=cfg.app_name, route_prefix=cfg.ingress.route_prefix, blocking=False
        )
        wait_running(cfg.app_name, 120)

    back = None
    try:
        deploy(pinned)
        wait_for(lambda: _plan_versions(app) == {pinned}, 30, f"unified replica on v{pinned}")
        assert _run_ratio(app) == pytest.approx(0.5)
        back = plan_registry.publish(app.model, "FFFF", {"source": "pattern"})
        assert _plan_versions(app) == {pinned}  # pinned: a newer version does not move it
        assert _replicas(app) == replicas
    finally:
        back = back or plan_registry.publish(app.model, "FFFF", {"source": "pattern"})
        deploy("latest")
        wait_for(lambda: _plan_versions(app) == {back}, 30, "unified replica back on all-F")
    assert _replicas(app) == replicas and _run_ratio(app) == pytest.approx(1.0)


def test_a_plan_that_does_not_fit_is_refused_and_a_stored_one_is_not_applied(apps):
    app = apps["unified"]
    before, latest = _plan_versions(app), plan_registry.latest(app.model)
    with pytest.raises(ValueError, match="3 letters, but model .* has 4 layers"):
        plan_registry.publish(app.model, "FSF", {"source": "pattern"})
    assert plan_registry.latest(app.model) == latest  # refused before anything changed
    # A record that never went through publish's checks (written by an older registry, or
    # straight into the store): the replica keeps serving its plan and says why.
    bad = plan_registry.PlanRecord(
        app.model, latest.version + 1, "FSF", "0badbadbad00", plan_registry.Provenance("pattern")
    )
    assert plan_registry._store(bad)

    def reported():
        engines = httpx.get(app.base_url + "/health", timeout=30).json()["engines"]
        flagged = metric_sum(scrape(app.metrics_url), "indexcache_plan_error", role="unified")
        errors = [e["plan_error"] or "" for e in engines]
        return flagged == 1 and all("length" in e for e in errors)

    try:
        wait_for(reported, 30, "the replica to report the unusable plan on /health and /metrics")
        assert _plan_versions(app) == before and bad.version not in _plan_versions(app)
        assert _run_ratio(app, 1) == pytest.approx(1.0)  # still serving, on the old plan
    finally:
        back = plan_registry.publish(app.model, "FFFF", {"source": "pattern"})
        wait_for(lambda: _plan_versions(app) == {back}, 30, "replica on a valid plan again")
    assert metric_sum(scrape(app.metrics_url), "indexcache_plan_error") == 0
