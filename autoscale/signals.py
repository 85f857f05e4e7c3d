"""What replicas report for autoscaling, and the pool-wide view the policies read.

Prefill replicas report queued prompt tokens and their recent p90 time to first token; decode
replicas their KV-cache usage and running sequences (serving/deployments.py,
`record_autoscaling_stats`). Missing values count as zero: a replica that has not reported yet
adds capacity, not load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ReplicaSignals:
    queued_prompt_tokens: float = 0.0
    prefill_latency_p90_s: float = 0.0
    num_running: float = 0.0
    num_waiting: float = 0.0
    kv_usage: float = 0.0

    @classmethod
    def from_mapping(cls, values: Mapping[str, float]) -> ReplicaSignals:
        return cls(**{k: float(v) for k, v in values.items() if k in cls.__slots__})


@dataclass(frozen=True, slots=True)
class PoolSignals:
    replicas: int  # replicas running now
    queued_prompt_tokens: float  # summed over replicas
    prefill_latency_p90_s: float  # worst replica
    running_seqs: float  # summed (running + waiting: both need decode capacity)
    kv_usage: float  # mean over replicas

    @classmethod
    def aggregate(cls, replicas: list[ReplicaSignals]) -> PoolSignals:
        n = len(replicas)
        return cls(
            replicas=n,
            queued_prompt_tokens=sum(r.queued_prompt_tokens for r in replicas),
            prefill_latency_p90_s=max((r.prefill_latency_p90_s for r in replicas), default=0.0),
            running_seqs=sum(r.num_running + r.num_waiting for r in replicas),
            kv_usage=sum(r.kv_usage for r in replicas) / n if n else 0.0,
        )
