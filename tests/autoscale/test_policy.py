"""Autoscaling policies on synthetic signal traces: direction, hysteresis, cooldown, bounds,
and the Ray adapter on a context shaped like Serve's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from autoscale.policy import PolicyConfig, PolicyState, decide, decode_load, prefill_load
from autoscale.ray_policy import DecodePolicy, PrefillPolicy, autoscaling_config
from autoscale.signals import PoolSignals, ReplicaSignals

CFG = PolicyConfig(
    min_replicas=1,
    max_replicas=8,
    downscale_ratio=0.5,
    upscale_cooldown_s=10,
    downscale_cooldown_s=60,
    target_queued_prompt_tokens=1000,
    target_prefill_latency_s=1.0,
    target_kv_usage=0.8,
    target_running_seqs=10,
)


def pool(n, **per_replica) -> PoolSignals:
    return PoolSignals.aggregate([ReplicaSignals(**per_replica) for _ in range(n)])


def replay(trace, load_fn, start=1, dt=5.0):
    """Run the policy every dt seconds over a trace of *pool-wide* demand (queued tokens, KV in
    replica-units): each tick the demand is spread over the replicas running then."""
    n, state, out = start, PolicyState(), []
    for i, demand in enumerate(trace):
        per = {k: v / max(n, 1) for k, v in demand.items()}
        n, state = decide(load_fn(pool(n, **per), CFG), n, state, i * dt, CFG)
        out.append(n)
    return out


def test_loads():
    assert prefill_load(pool(2, queued_prompt_tokens=1000), CFG) == 1.0
    assert prefill_load(pool(1, prefill_latency_p90_s=3.0), CFG) == 3.0  # worst signal wins
    assert decode_load(pool(2, kv_usage=0.4), CFG) == 0.5
    assert decode_load(pool(2, num_running=15, num_waiting=5), CFG) == 2.0


def test_prefill_scales_up_proportionally_then_waits_for_cooldown():
    # 3x the target queued on 1 replica: one step to 3. More demand within the upscale
    # cooldown waits; after it, the pool grows again.
    trace = [{"queued_prompt_tokens": 3000}] + [{"queued_prompt_tokens": 4500}] * 3
    assert replay(trace, prefill_load) == [3, 3, 5, 5]


def test_hysteresis_band_holds_steady():
    # Load between downscale_ratio (0.5) and 1.0 never changes the count.
    trace = [{"kv_usage": 4 * u} for u in (0.45, 0.7, 0.5, 0.79, 0.41)]
    assert replay(trace, decode_load, start=4) == [4] * 5


def test_downscale_after_cooldown_to_the_smallest_safe_count():
    trace = [{"kv_usage": 0.8 * 3}] + [{"kv_usage": 0.3}] * 20  # spike, then quiet
    out = replay(trace, decode_load, start=1)
    assert out[0] == 3
    first_down = next(i for i, n in enumerate(out) if n < 3)
    assert first_down * 5.0 >= 60  # not before the downscale cooldown
    assert out[-1] == 1  # never below min_replicas


def test_flapping_signal_does_not_flap_replicas():
    trace = [{"queued_prompt_tokens": q} for q in (1500, 400, 1500, 400, 1500, 400)]
    out = replay(trace, prefill_load, start=1)
    assert out == [2, 2, 2, 2, 2, 2]


def test_bounds():
    assert decide(100.0, 2, PolicyState(), 0, CFG)[0] == 8
    assert decide(0.0, 1, PolicyState(), 1000, CFG)[0] == 1
    cfg0 = PolicyConfig(min_replicas=0, max_replicas=2, downscale_cooldown_s=0)
    assert decide(0.0, 1, PolicyState(), 0, cfg0)[0] == 0  # scale to zero when allowed
    assert decide(2.0, 0, PolicyState(), 0, cfg0)[0] == 2
    with pytest.raises(ValueError, match="min_replicas"):
        PolicyConfig(min_replicas=3, max_replicas=2)


def ctx(running, metrics, target, state=None, now=100.0):
    return SimpleNamespace(
        running_replicas=running,
        aggregated_metrics=metrics,
        target_num_replicas=target,
        policy_state=state or {},
        current_time=now,
    )


def test_ray_adapter_reads_per_replica_metrics():
    kwargs = dict(
        min_replicas=1, max_replicas=5, target_queued_prompt_tokens=100.0, upscale_cooldown_s=0.0
    )
    policy = PrefillPolicy(**kwargs)
    target, state = policy(
        ctx(["r1", "r2"], {"queued_prompt_tokens": {"r1": 300, "r2": 100}}, 2, {"keep": 1})
    )
    assert target == 4 and state["keep"] == 1  # 200/replica = 2x target -> 4 replicas
    target, _ = DecodePolicy(min_replicas=1, max_replicas=5)(
        ctx(["r1"], {"kv_usage": {"r1": 0.5}, "num_running": {"r1": 3.0}}, 1)
    )
    assert target == 1  # within the band


def test_serve_accepts_the_generated_autoscaling_config():
    from ray.serve.config import AutoscalingConfig

    from serving.config import AutoscalingArgs

    args = AutoscalingArgs(min_replicas=1, max_replicas=3, initial_replicas=2)
    cfg = AutoscalingConfig(**autoscaling_config("prefill", args))
    policy = cfg.policy.get_policy()  # Serve imports and unpickles the policy class
    assert policy.__name__ == "PrefillPolicy"
    assert policy(**cfg.policy.policy_kwargs).cfg.max_replicas == 3
    assert (cfg.min_replicas, cfg.max_replicas, cfg.initial_replicas) == (1, 3, 2)
