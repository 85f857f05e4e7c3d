"""Plan registry: IndexCache F/S plans per served model, versioned, with provenance.

The plans live in Ray's GCS key-value store (the storage Serve keeps its own controller
checkpoints in), as JSON records under the `indexcache` namespace. No process owns them: there is
no registry actor whose death could lose them, any driver or replica of the cluster reads them,
and with KubeRay's GCS fault tolerance (an external Redis, deploy/k8s/README.md) they survive a
head restart exactly as the Serve applications do. Without it, a head restart loses the plans
together with the applications that ran them.

Versions are allocated with an atomic create (`overwrite=False`): two publishers racing for the
same version number cannot both win, the loser takes the next one.

Models: every engine replica registers the model it serves (served name -> layer count) when it
starts. `publish` refuses, before anything is stored, a plan for a model no replica has
registered (unless the caller names the layer count, e.g. read from the checkpoint), a plan whose
length is not the model's layer count, and a pattern that is not F/S letters starting with F.

    register_model("smollm2-dsa", 30)
    publish("smollm2-dsa", "FSSS...", Provenance("pattern"))        -> 1
    publish("smollm2-dsa", cfg, {"source": "calibration", "calibration_data_hash": "ab12..."})
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import ray

from model.index_cache import IndexCacheConfig, validate_pattern

NAMESPACE = "indexcache"  # Ray namespace of our named actors, and the GCS KV namespace
SOURCES = ("freq", "pattern", "calibration")
_PLAN, _MODEL = "plan:", "model:"  # key prefixes; model names are hex-encoded in keys


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

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, blob: bytes) -> PlanRecord:
        d = json.loads(blob)
        return cls(**{**d, "provenance": Provenance(**d["provenance"])})


# -- the store (GCS key-value) -------------------------------------------------------------------
def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def _plan_key(model: str, version: int) -> str:
    return f"{_PLAN}{model.encode().hex()}:{version:08d}"


def _model_key(model: str) -> str:
    return f"{_MODEL}{model.encode().hex()}"


def _versions(model: str) -> list[int]:
    prefix = f"{_PLAN}{model.encode().hex()}:".encode()
    keys = _kv()._internal_kv_list(prefix, namespace=NAMESPACE)
    return sorted(int(k[len(prefix) :]) for k in keys)


def _read(model: str, version: int) -> PlanRecord | None:
    blob = _kv()._internal_kv_get(_plan_key(model, version), namespace=NAMESPACE)
    return None if blob is None else PlanRecord.from_json(blob)


def _store(rec: PlanRecord) -> bool:
    """Create the record's key; False if that version exists already (nothing is written)."""
    existed = _kv()._internal_kv_put(
        _plan_key(rec.model, rec.version), rec.to_json(), overwrite=False, namespace=NAMESPACE
    )
    return not existed


# -- connecting ----------------------------------------------------------------------------------
def connect(address: str | None) -> None:
    if ray.is_initialized():
        return
    if not address:
        raise ValueError(
            "not connected to a Ray cluster: pass the cluster's address (`--address`, "
            "or address= in Python)"
        )
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)


# -- models --------------------------------------------------------------------------------------
def register_model(model: str, num_layers: int, *, address: str | None = None) -> None:
    """Record the layer count of a served model (engine replicas do this at start). The latest
    registration wins: a redeploy of the name with another checkpoint replaces it."""
    if not model:
        raise ValueError("model must be a non-empty served model name")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    connect(address)
    blob = json.dumps({"num_layers": num_layers, "registered_at": time.time()})
    _kv()._internal_kv_put(_model_key(model), blob, overwrite=True, namespace=NAMESPACE)


def model_layers(model: str, *, address: str | None = None) -> int | None:
    """The registered layer count of `model`, None if no replica ever registered it."""
    connect(address)
    blob = _kv()._internal_kv_get(_model_key(model), namespace=NAMESPACE)
    return None if blob is None else int(json.loads(blob)["num_layers"])


def known_models(*, address: str | None = None) -> list[str]:
    connect(address)
    keys = _kv()._internal_kv_list(_MODEL.encode(), namespace=NAMESPACE)
    return sorted(bytes.fromhex(k[len(_MODEL) :].decode()).decode() for k in keys)


# -- plans ---------------------------------------------------------------------------------------
def _pattern(plan: IndexCacheConfig | str) -> str:
    if isinstance(plan, IndexCacheConfig):
        return plan.pattern
    if isinstance(plan, str):
        validate_pattern(plan)
        return plan
    raise ValueError(
        f"plan must be an IndexCacheConfig or an F/S pattern string, got {type(plan).__name__}"
    )


def check_plan(
    model: str, pattern: str, num_layers: int | None = None, *, address: str | None = None
) -> None:
    """Raise ValueError naming what is wrong if `pattern` cannot run on `model`."""
    validate_pattern(pattern)
    known = model_layers(model, address=address)
    if known is None and num_layers is None:
        others = ", ".join(known_models()) or "none"
        raise ValueError(
            f"model {model!r} is not served on this cluster (no engine replica registered it; "
            f"known models: {others}); check the served model name, or pass its checkpoint "
            "so the layer count is known"
        )
    if known is not None and num_layers is not None and known != num_layers:
        raise ValueError(
            f"model {model!r} is served with {known} layers, but the plan was made for a "
            f"{num_layers}-layer checkpoint"
        )
    n = known if known is not None else num_layers
    if len(pattern) != n:
        raise ValueError(
            f"plan {pattern!r} has {len(pattern)} letters, but model {model!r} has {n} layers "
            "(one F/S letter per layer)"
        )


def publish(
    model: str,
    plan: IndexCacheConfig | str,
    provenance: Provenance | dict,
    *,
    address: str | None = None,
    num_layers: int | None = None,
) -> int:
    """Store a new plan version for `model` (the served model name); returns the version.
    Validated first (check_plan): a plan that cannot run is refused and nothing changes.
    `num_layers` (e.g. from the checkpoint) lets a not-yet-served model be published for."""
    if not model:
        raise ValueError("model must be a non-empty served model name")
    pattern, prov = _pattern(plan), Provenance.coerce(provenance)
    check_plan(model, pattern, num_layers, address=address)
    if model_layers(model) is None:
        register_model(model, num_layers)
    version = (_versions(model) or [0])[-1] + 1
    while True:
        rec = PlanRecord(model, version, pattern, IndexCacheConfig(pattern).plan_id, prov)
        if _store(rec):
            return version
        version += 1  # another publisher took this version first


def latest(model: str, *, address: str | None = None) -> PlanRecord | None:
    connect(address)
    versions = _versions(model)
    return _read(model, versions[-1]) if versions else None


def get(model: str, version: int | None = None, *, address: str | None = None):
    """The record of `version` (default: the latest), None if there is none."""
    if version is None:
        return latest(model, address=address)
    connect(address)
    return _read(model, version)


def list_plans(model: str | None = None, *, address: str | None = None) -> list[PlanRecord]:
    connect(address)
    models = [model] if model is not None else known_models()
    return [r for m in models for v in _versions(m) if (r := _read(m, v)) is not None]


def show(model: str, version: int | None = None, *, address: str | None = None) -> PlanRecord:
    rec = get(model, version, address=address)
    if rec is None:
        what = "any plan" if version is None else f"version {version}"
        raise ValueError(f"the registry has no {what} for model {model!r}")
    return rec
