"""Ray Serve custom autoscaling policies wrapping autoscale/policy.py (Ray 2.60 API).

Serve instantiates the class once per deployment with `policy_kwargs` and calls it every control
tick with an `AutoscalingContext`; `ctx.aggregated_metrics` holds, per metric, each replica's
value from `record_autoscaling_stats` averaged over the look-back window. Our cooldown and
hysteresis replace Serve's delays, so the config sets `upscale_delay_s = downscale_delay_s = 0`.
"""

from __future__ import annotations

import time
from typing import Any

from autoscale.policy import (
    PolicyConfig,
    PolicyState,
    decide,
    decode_load,
    prefill_load,
    unified_load,
)
from autoscale.signals import PoolSignals, ReplicaSignals

_STATE_KEY = "indexcache_last_change_s"


class _PoolPolicy:
    load_fn = staticmethod(prefill_load)

    def __init__(self, **kwargs: Any):
        self.cfg = PolicyConfig(**kwargs)

    def signals(self, ctx) -> PoolSignals:
        metrics = ctx.aggregated_metrics or {}
        per_replica: dict[Any, dict[str, float]] = {}
        for name, by_replica in metrics.items():
            for rid, value in by_replica.items():
                per_replica.setdefault(rid, {})[name] = value
        running = list(ctx.running_replicas or [])
        reps = [ReplicaSignals.from_mapping(per_replica.get(r, {})) for r in running]
        return PoolSignals.aggregate(reps)

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        state = PolicyState(ctx.policy_state.get(_STATE_KEY))
        current = ctx.target_num_replicas
        load = type(self).load_fn(self.signals(ctx), self.cfg)
        target, state = decide(load, current, state, ctx.current_time or time.time(), self.cfg)
        return target, {**ctx.policy_state, _STATE_KEY: state.last_change_s}


class PrefillPolicy(_PoolPolicy):
    load_fn = staticmethod(prefill_load)


class DecodePolicy(_PoolPolicy):
    load_fn = staticmethod(decode_load)


class UnifiedPolicy(_PoolPolicy):
    load_fn = staticmethod(unified_load)


def autoscaling_config(role: str, args) -> dict[str, Any]:
    """Serve `autoscaling_config` for a pool from `serving.config.AutoscalingArgs`."""
    policy = {"prefill": "PrefillPolicy", "decode": "DecodePolicy", "unified": "UnifiedPolicy"}[
        role
    ]
    kwargs = {k: getattr(args, k) for k in PolicyConfig.__dataclass_fields__}
    out = {
        "min_replicas": args.min_replicas,
        "max_replicas": args.max_replicas,
        # Deprecated in 2.60 but still the replica's push interval for custom stats.
        "metrics_interval_s": args.metrics_interval_s,
        "look_back_period_s": args.look_back_period_s,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "policy": {"policy_function": f"autoscale.ray_policy:{policy}", "policy_kwargs": kwargs},
    }
    if args.initial_replicas is not None:
        out["initial_replicas"] = args.initial_replicas
    return out
