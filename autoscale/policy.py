"""Replica-count policies for the prefill and decode pools: pure functions, no Ray.

Each pool turns its signals into a *load*: 1.0 means the pool runs exactly at its target
(prefill: queued prompt tokens per replica, p90 time to first token; decode: KV-cache usage,
running sequences per replica), taking the worst signal. Then:

- scale up when load > 1: to ceil(replicas * load), so one step absorbs the excess;
- scale down only when load < `downscale_ratio` (hysteresis: a pool hovering near its target
  never flaps), to the smallest count that keeps load under 1 after the change;
- cooldown: no move up within `upscale_cooldown_s` of the last change, no move down within
  `downscale_cooldown_s` (new replicas need time to warm up and to show in the signals);
- clamp to [min_replicas, max_replicas].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from autoscale.signals import PoolSignals


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    min_replicas: int = 1
    max_replicas: int = 1
    downscale_ratio: float = 0.5
    upscale_cooldown_s: float = 10.0
    downscale_cooldown_s: float = 120.0
    # prefill targets
    target_queued_prompt_tokens: float = 4096.0
    target_prefill_latency_s: float = 2.0
    # decode targets
    target_kv_usage: float = 0.8
    target_running_seqs: float = 48.0

    def __post_init__(self):
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(
                f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                f"{self.min_replicas}, {self.max_replicas}"
            )
        if not 0 < self.downscale_ratio < 1:
            raise ValueError(f"downscale_ratio must be in (0, 1), got {self.downscale_ratio}")


@dataclass(frozen=True, slots=True)
class PolicyState:
    last_change_s: float | None = None  # time of the last scale decision that changed the count


def prefill_load(s: PoolSignals, cfg: PolicyConfig) -> float:
    per_replica = s.queued_prompt_tokens / max(s.replicas, 1)
    return max(
        per_replica / cfg.target_queued_prompt_tokens,
        s.prefill_latency_p90_s / cfg.target_prefill_latency_s,
    )


def decode_load(s: PoolSignals, cfg: PolicyConfig) -> float:
    per_replica = s.running_seqs / max(s.replicas, 1)
    return max(s.kv_usage / cfg.target_kv_usage, per_replica / cfg.target_running_seqs)


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)  # 0.8 * 3 / 0.8 is 3.0000000000000004: still 3 replicas


def unified_load(s: PoolSignals, cfg: PolicyConfig) -> float:
    return max(prefill_load(s, cfg), decode_load(s, cfg))


def decide(
    load: float, current: int, state: PolicyState, now: float, cfg: PolicyConfig
) -> tuple[int, PolicyState]:
    """Target replica count for a pool of `current` replicas running at `load`."""
    base = max(current, 1)
    want = current
    if load > 1.0:
        want = _ceil(base * load)
    elif load < cfg.downscale_ratio and current > cfg.min_replicas:
        # Smallest count that keeps the pool's load under 1 (load scales as 1/replicas).
        want = _ceil(base * load)
    want = min(max(want, cfg.min_replicas), cfg.max_replicas)
    if current < cfg.min_replicas:  # bounds win over cooldown
        return want, replace(state, last_change_s=now)
    since = math.inf if state.last_change_s is None else now - state.last_change_s
    if want > current and since < cfg.upscale_cooldown_s:
        return current, state
    if want < current and since < cfg.downscale_cooldown_s:
        return current, state
    if want != current:
        return want, replace(state, last_change_s=now)
    return current, state
