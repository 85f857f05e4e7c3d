"""Plan registry: IndexCache F/S plans per model, versioned, with provenance.

A named detached Ray actor (`plan_registry` in namespace `indexcache`) owns the plans; each
published plan is `ray.put` by the actor itself, so it lives in the object store as long as the
cluster does (a plan put by a short-lived CLI driver would die with it). Engine deployments read
their plan at start and whenever their Serve `user_config` changes or, under `version: latest`,
when a newer version appears, so publishing a plan rolls it out without a code change.

    publish("smollm2-dsa", "FSFS", Provenance("pattern"))      -> 1
    publish("smollm2-dsa", cfg, {"source": "calibration", "calibration_data_hash": "ab12..."})
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import ray

from model.index_cache import IndexCacheConfig, validate_pattern

NAMESPACE = "indexcache"
ACTOR_NAME = "plan_registry"
SOURCES = ("freq", "pattern", "calibration")


@dataclass(frozen=True)
class Provenance:
    source: str  # freq | pattern | calibration
    calibration_data_hash: str | None = None
    created_at: float = field(default_factory=time.time)
    details: dict[str, Any] = field(default_factory=dict)  # e.g. {"freq": 4} or search settings

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"provenance source must be one of {SOURCES}, got {self.source!r}")
        if self.source == "calibration" and not self.calibration_data_hash:
            raise ValueError("a calibration plan needs its calibration_data_hash")

    @classmethod
    def coerce(cls, value: Provenance | dict) -> Provenance:
        if isinstance(value, Provenance):
            return value
        if not isinstance(value, dict):
            raise ValueError(
                f"provenance must be a Provenance or a dict, got {type(value).__name__}"
            )
        known = {"source", "calibration_data_hash", "created_at", "details"}
        extra = {k: v for k, v in value.items() if k not in known}
        base = {k: v for k, v in value.items() if k in known}
        if extra:
            base["details"] = {**base.get("details", {}), **extra}
        return cls(**base)


@dataclass(frozen=True)
class PlanRecord:
    model: str
    version: int
    pattern: str
    plan_id: str
    provenance: Provenance

    def index_cache(self) -> IndexCacheConfig:
        src = "calibration" if self.provenance.source == "calibration" else "pattern"
        return IndexCacheConfig(self.pattern, src)

    def summary(self) -> dict[str, Any]:
        p = self.pattern
        return {
            "model": self.model,
            "version": self.version,
            "plan_id": self.plan_id,
            "pattern": p,
            "full_layers": p.count("F"),
            "num_layers": len(p),
            "provenance": asdict(self.provenance),
        }


@ray.remote(num_cpus=0)
class PlanRegistryActor:
    def __init__(self):
        self._plans: dict[str, list[PlanRecord]] = {}
        self._refs: dict[tuple[str, int], ray.ObjectRef] = {}

    def publish(self, model: str, pattern: str, provenance: Provenance) -> int:
        validate_pattern(pattern)
        versions = self._plans.setdefault(model, [])
        rec = PlanRecord(
            model, len(versions) + 1, pattern, IndexCacheConfig(pattern).plan_id, provenance
        )
        self._refs[(model, rec.version)] = ray.put(rec)  # owned by this detached actor
        versions.append(rec)
        return rec.version

    def latest_version(self, model: str) -> int:
        return len(self._plans.get(model, []))

    def get(self, model: str, version: int | None = None) -> PlanRecord | None:
        versions = self._plans.get(model, [])
        if not versions:
            return None
        v = len(versions) if version is None else version
        ref = self._refs.get((model, v))
        return None if ref is None else ray.get(ref)

    def list(self, model: str | None = None) -> list[PlanRecord]:
        models = [model] if model is not None else sorted(self._plans)
        return [r for m in models for r in self._plans.get(m, [])]


def _connect(address: str | None) -> None:
    if not ray.is_initialized():
        ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False)


def registry(*, address: str | None = None, create: bool = True):
    """The registry actor handle, created on first use (detached: it outlives its creator)."""
    _connect(address)
    if not create:
        return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
    return PlanRegistryActor.options(
        name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


def _pattern(plan: IndexCacheConfig | str) -> str:
    if isinstance(plan, IndexCacheConfig):
        return plan.pattern
    if isinstance(plan, str):
        validate_pattern(plan)
        return plan
    raise ValueError(
        f"plan must be an IndexCacheConfig or an F/S pattern string, got {type(plan).__name__}"
    )


def publish(
    model: str,
    plan: IndexCacheConfig | str,
    provenance: Provenance | dict,
    *,
    address: str | None = None,
) -> int:
    """Store a new plan version for `model` (the served model name); returns the version."""
    if not model:
        raise ValueError("model must be a non-empty served model name")
    pattern, prov = _pattern(plan), Provenance.coerce(provenance)
    return ray.get(registry(address=address).publish.remote(model, pattern, prov))


def list_plans(model: str | None = None, *, address: str | None = None) -> list[PlanRecord]:
    return ray.get(registry(address=address).list.remote(model))


def show(model: str, version: int | None = None, *, address: str | None = None) -> PlanRecord:
    rec = ray.get(registry(address=address).get.remote(model, version))
    if rec is None:
        what = "any plan" if version is None else f"version {version}"
        raise ValueError(f"the registry has no {what} for model {model!r}")
    return rec
