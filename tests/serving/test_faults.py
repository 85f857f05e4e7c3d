"""Acceptance (issue 14): the disaggregated app under faults, on real Ray Serve. One app of its
own (2 prefill + 2 decode replicas) in the session's cluster; replicas and actors are killed
with ray.kill, as an operator or a crash would.

- a decode replica killed mid-stream: the stream goes on on the other one, greedy text equal to
  a run without the fault; a prefill replica killed under load: its requests are retried;
- a storm of streams cut at random points: nothing left running, KV usage back to 0, no ERROR;
- the metrics hub killed: /metrics complete again within seconds, no log flood;
- the registry's state lost: replicas keep their plan and say so; a stored plan that cannot run
  does not stop a new replica from starting, and a decode replica on another plan still decodes;
- both decode replicas down: /health answers within a second, 503 naming the decode role.

The tiny model has 16 indexer heads: its top-k has no exact ties, so a resumed request (prompt
and generated tokens re-prefilled) picks the same keys as the uninterrupted run.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

from tests.serving.faults import (
    LogWatch,
    busy_replica,
    checks,
    kill_replica,
    replica_ids,
    wait_healthy,
)
from tests.serving.harness import metric_sum, scrape, wait_for

pytestmark = pytest.mark.ray

APP, MODEL = "app-faults", "tiny-faults"
FULL = {"PrefillServer": 2, "DecodeServer": 2}


@pytest.fixture(scope="module")
def model(tiny_dir):
    return tiny_dir("glm_moe_dsa", index_n_heads=16)


@pytest.fixture(scope="module")
def base(ray_cluster, model):
    from ray import serve

    from serving.app import build_app
    from serving.cli.serve import wait_running
    from serving.config import ServingConfig

    group = {
        "num_cpus": 0.25,
        "num_replicas": 2,
        "engine": {"max_num_seqs": 16, "max_num_batched_tokens": 64},
    }
    cfg = ServingConfig(
        model=model,
        served_model_name=MODEL,
        mode="disaggregated",
        app_name=APP,
        prefill=group,
        decode=group,
        ingress={
            "route_prefix": "/faults",
            "num_cpus": 0.1,
            "max_prompt_tokens": 3000,
            "max_tokens_limit": 4000,
        },
        kv_transfer={"timeout_s": 20},
        plans={"version": "latest", "poll_interval_s": 0.5},
        metrics_interval_s=0.5,
    )
    serve.run(build_app(cfg), name=APP, route_prefix="/faults", blocking=False)
    try:
        wait_running(APP, 180)
        wait_healthy(APP, FULL)
        yield f"http://127.0.0.1:{ray_cluster}/faults"
    finally:
        serve.delete(APP)


@pytest.fixture(scope="module")
def reference(model):
    """Greedy text of a prompt by the offline engine: what an undisturbed request returns."""
    from serving.engine import LLMEngine, SamplingParams

    engine = LLMEngine.from_pretrained(model)

    def get(prompt: str, n: int, plan: str | None = None) -> str:
        eng = engine if plan is None else LLMEngine.from_pretrained(model, index_cache=plan)
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        return eng.generate([prompt], params)[0].text

    return get


def body(prompt: str, n: int, stream: bool) -> dict:
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def counter(base: str, name: str) -> float:
    return metric_sum(scrape(base + "/metrics"), name)


def test_decode_replica_killed_mid_stream_continues_on_another(base, reference):
    prompt, n = "Once upon a time", 400
    expected = reference(prompt, n)
    migrations = counter(base, "indexcache_request_migrations_total")
    text, events, killed, done = "", 0, None, False
    with httpx.stream(
        "POST", base + "/v1/completions", json=body(prompt, n, True), timeout=120
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[len("data: ") :])
            assert "error" not in chunk, chunk  # the client never sees the fault
            text += chunk["choices"][0]["text"]
            events += 1
            if events == 8:
                killed = busy_replica(APP, "DecodeServer")
                kill_replica(APP, "DecodeServer", killed)
    assert done and killed is not None
    assert text == expected  # greedy output as without the fault
    wait_for(
        lambda: counter(base, "indexcache_request_migrations_total") == migrations + 1,
        10,
        "the migration in the ingress's counter",
    )
    assert killed not in replica_ids(APP, "DecodeServer")
    wait_healthy(APP, FULL)


def test_prefill_replica_killed_under_load_requests_are_retried(base, reference):
    prompt = "The quick brown fox jumps over the lazy dog. " * 45  # ~2000 tokens: long prefills
    expected = reference(prompt, 4)
    retries = counter(base, "indexcache_request_retries_total")

    async def load():
        async with httpx.AsyncClient(timeout=120) as http:
            reqs = [
                asyncio.ensure_future(
                    http.post(base + "/v1/completions", json=body(prompt, 4, False))
                )
                for _ in range(6)
            ]
            victim = await asyncio.to_thread(busy_replica, APP, "PrefillServer")
            kill_replica(APP, "PrefillServer", victim)
            return victim, await asyncio.gather(*reqs)

    victim, responses = asyncio.run(load())
    for r in responses:
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected
    assert counter(base, "indexcache_request_retries_total") >= retries + 1
    assert victim not in replica_ids(APP, "PrefillServer")
    wait_healthy(APP, FULL)


def test_disconnect_storm_leaves_nothing_running(base):
    """Streams cut at random points (before the first token, right at it, later), hundreds of
    them: no decode left running for nobody, every KV page back, no ERROR logged."""
    watch = LogWatch()
    watch.mark()
    rng = random.Random(14)
    cuts = [rng.choice([None, 0, 0, 1, 2, 3, 5, 8, 13]) for _ in range(240)]
    delays = [rng.uniform(0.0, 0.3) for _ in cuts]

    async def one(http, sem, cut, delay):
        async with sem:
            req = http.stream("POST", base + "/v1/completions", json=body("storm", 3000, True))
            if cut is None:  # cut on a timer: often before the first token arrives
                try:
                    async with asyncio.timeout(delay):
                        async with req as r:
                            async for _ in r.aiter_lines():
                                pass
                except TimeoutError:
                    pass
                return
            async with req as r:
                assert r.status_code == 200
                seen = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        assert "error" not in line, line
                        if seen == cut:  # cut == 0: right after the first token
                            break
                        seen += 1

    async def storm():
        sem = asyncio.Semaphore(48)
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            await asyncio.gather(*(one(http, sem, c, d) for c, d in zip(cuts, delays, strict=True)))

    asyncio.run(storm())

    def idle():
        cs = [c for d in FULL for c in checks(APP, d)]
        usage = metric_sum(scrape(base + "/metrics"), "indexcache_kv_cache_usage_ratio")
        return all(c["num_running"] == 0 and c["num_waiting"] == 0 for c in cs) and usage == 0

    wait_for(idle, 60, "no request running or waiting and KV usage 0 after the storm")
    gen = counter(base, "indexcache_generation_tokens_total")
    time.sleep(2)
    assert counter(base, "indexcache_generation_tokens_total") == gen  # nothing decodes
    errors = watch.errors()
    kinds = sorted({e.splitlines()[-1][:200] for e in errors})
    assert not errors, f"{len(errors)} errors logged: {kinds}; the first:\n{errors[0]}"


def test_metrics_hub_killed_metrics_stay_complete(base):
    import ray

    def engine_replicas() -> set[str]:
        samples = scrape(base + "/metrics")
        return {lab["replica"] for n, lab, _ in samples if n == "indexcache_plan_version"}

    before = engine_replicas()
    assert len(before) == 4
    watch = LogWatch()
    watch.mark()
    ray.kill(ray.get_actor(f"metrics_hub:{APP}", namespace="indexcache"))
    t0 = time.monotonic()
    wait_for(lambda: engine_replicas() == before, 10, "every engine replica back in /metrics")
    assert time.monotonic() - t0 < 10
    time.sleep(3)  # several push intervals more
    assert engine_replicas() == before
    assert watch.count("unreachable") <= 5  # at most once per process, not once per push
    errors = watch.errors()
    kinds = sorted({e.splitlines()[-1][:200] for e in errors})
    assert not errors, f"{len(errors)} errors logged: {kinds}; the first:\n{errors[0]}"


def _plans(role: str) -> list[dict]:
    return [c for c in checks(APP, role) if isinstance(c, dict)]


def _all_on(version: int) -> bool:
    cs = _plans("PrefillServer") + _plans("DecodeServer")
    return len(cs) == 4 and all(c["plan_version"] == version and not c["plan_error"] for c in cs)


def test_registry_state_lost_replicas_keep_their_plan_and_say_so(base):
    from ray.experimental import internal_kv

    from serving import plan_registry

    v = plan_registry.publish(MODEL, "FSFS", {"source": "pattern"})
    wait_for(lambda: _all_on(v), 30, f"all replicas on plan v{v}")
    # A head restart without GCS fault tolerance: every record gone.
    key = plan_registry._plan_key(MODEL, 0)[: -len("00000000")]
    internal_kv._internal_kv_del(key, del_by_prefix=True, namespace=plan_registry.NAMESPACE)
    assert plan_registry.latest(MODEL) is None

    def kept_and_reported():
        cs = _plans("PrefillServer") + _plans("DecodeServer")
        return len(cs) == 4 and all(
            c["plan_version"] == v and "keeping it" in (c["plan_error"] or "") for c in cs
        )

    wait_for(kept_and_reported, 30, "replicas to keep their plan and report the lost state")
    wait_for(
        lambda: metric_sum(scrape(base + "/metrics"), "indexcache_plan_error") == 4,
        10,
        "indexcache_plan_error 1 on every engine replica",
    )
    r = httpx.post(base + "/v1/completions", json=body("still serving", 4, False), timeout=60)
    assert r.status_code == 200, r.text
    again = plan_registry.publish(MODEL, "FSFS", {"source": "pattern"})
    wait_for(lambda: _all_on(again), 30, "the error to clear once a plan is published again")


def test_a_stored_plan_that_cannot_run_never_stops_a_new_replica(base, reference):
    from serving import plan_registry

    good = plan_registry.latest(MODEL)
    assert good.pattern == "FSFS"
    bad = plan_registry.PlanRecord(
        MODEL, good.version + 1, "FSF", "0badbadbad00", plan_registry.Provenance("pattern")
    )
    assert plan_registry._store(bad)  # as an older registry without publish's checks did

    def reported(role, n):
        cs = _plans(role)
        return len(cs) == n and all("length" in (c["plan_error"] or "") for c in cs)

    wait_for(lambda: reported("DecodeServer", 2), 30, "the replicas to report the bad plan")
    old = replica_ids(APP, "DecodeServer")
    kill_replica(APP, "DecodeServer", old[0])
    wait_healthy(APP, FULL, timeout_s=90)  # the replacement starts, on the checkpoint's plan
    new = [c for c in _plans("DecodeServer") if c["replica"] not in old]
    assert len(new) == 1 and new[0]["plan_version"] == 0 and "length" in new[0]["plan_error"]
    # Prefill replicas still run FSFS, the new decoder the checkpoint's all-F plan: it builds
    # an FSFS engine for those payloads instead of failing them.
    expected = reference("mixed plans", 8, plan="FSFS")
    for _ in range(4):  # both decoders get some
        r = httpx.post(base + "/v1/completions", json=body("mixed plans", 8, False), timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected
    back = plan_registry.publish(MODEL, "FFFF", {"source": "pattern"})
    wait_for(lambda: _all_on(back), 60, "every replica on a valid plan again")


def test_health_answers_fast_and_names_the_missing_role(base):
    samples = []
    for rid in replica_ids(APP, "DecodeServer"):
        kill_replica(APP, "DecodeServer", rid)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        r = httpx.get(base + "/health", timeout=10)
        samples.append((r.status_code, time.monotonic() - t0, r.text))
        if r.status_code == 200 and any(s == 503 for s, _, _ in samples):
            break
        time.sleep(0.1)
    slow = [(s, round(t, 2)) for s, t, _ in samples if t >= 1.0]
    assert not slow, f"/health took a second or more: {slow}"
    down = [json.loads(b)["error"] for s, _, b in samples if s == 503]
    assert down and all("decode" in e["message"] and e["code"] == "unhealthy" for e in down)
    assert not any("prefill" in e["message"] for e in down)  # only the missing role is named
    assert samples[-1][0] == 200
    wait_healthy(APP, FULL)


def test_chaos_load_test_loses_no_request(base, tmp_path):
    """`indexcache loadtest --scenario chaos`: Locust keeps more requests in flight than the
    engines run at once while a decode and a prefill replica are killed and a plan is rolled
    out; the report counts completed, migrated, cleanly failed and lost, and lost is 0."""
    from serving.cli import main

    out = tmp_path / "chaos"
    args = ["loadtest", "--host", base, "--scenario", "chaos", "--duration", "30"]
    rc = main([*args, "--users", "40", "--out", str(out), "--app", APP, "--quiet"])
    summary = json.loads((out / "summary.json").read_text())
    fo = summary["failover"]
    assert rc == 0, (out / "report.md").read_text()
    assert fo["lost"] == 0 and fo["completed"] > 40
    assert [(a["action"], a["ok"]) for a in fo["actions"]] == [
        ("kill", True),
        ("publish", True),
        ("kill", True),
    ]
    assert fo["migrated"] >= 1  # the killed decode replica had streams: they went on
    report = (out / "report.md").read_text()
    assert "migrated mid-stream" in report and "lost" in report
    wait_healthy(APP, FULL)
