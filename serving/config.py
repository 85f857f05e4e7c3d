"""ServingConfig: the deployment YAML (pydantic, unknown fields rejected).

One file describes a whole application: the model, the mode (unified: one engine deployment;
disaggregated: prefill and decode deployments that scale apart), replica resources and engine
knobs per role, ingress limits, the KV transport and how deployments follow the plan registry.
The pydantic objects stop at the deployments: engines get plain keyword arguments.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from serving.engine.config import EngineConfig
from serving.env import env

# The model `indexcache serve` uses when given none: SmolLM2-135M-Instruct with trained indexers
# and its searched 1/4 plan (model/smollm2.py), built on first use under INDEXCACHE_HOME. The one
# place that names it (the CLI reads it from here).
DEFAULT_MODEL_SUBDIR = "models/smollm2-dsa"


def default_model_path() -> Path:
    return env().home / DEFAULT_MODEL_SUBDIR


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _EngineArgsBase(_Strict):
    def engine_kwargs(self) -> dict[str, Any]:
        """EngineConfig fields for LLMEngine.from_pretrained (the role is added by the caller)."""
        return self.model_dump()


def _engine_args_model() -> type[BaseModel]:
    """EngineArgs: the pydantic face of serving/engine's EngineConfig, field for field (defaults and
    descriptions come from there; the role comes from the replica group, not the YAML). The
    dataclass's own checks run too, so the YAML and the engine refuse exactly the same values."""
    hints = typing.get_type_hints(EngineConfig)
    fields = {
        f.name: (hints[f.name], Field(f.default, description=f.metadata["help"]))
        for f in dataclasses.fields(EngineConfig)
        if f.name != "role"
    }

    def check(self):
        EngineConfig.from_kwargs(**self.model_dump())
        return self

    return create_model(
        "EngineArgs",
        __base__=_EngineArgsBase,
        __validators__={"_check": model_validator(mode="after")(check)},
        **fields,
    )


EngineArgs = _engine_args_model()


class AutoscalingArgs(_Strict):
    """Bounds and targets of one pool; autoscale/policy.py turns signals into replica counts."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    # Prefill pool targets (per replica).
    target_queued_prompt_tokens: float = Field(
        4096, gt=0, description="prefill: prompt tokens waiting per replica at which to scale up"
    )
    target_prefill_latency_s: float = Field(
        2.0, gt=0, description="prefill: p90 replica time to first token to hold"
    )
    # Decode pool targets (per replica).
    target_kv_usage: float = Field(0.8, gt=0, le=1, description="decode: KV-cache usage to hold")
    target_running_seqs: float = Field(
        48, gt=0, description="decode: running sequences per replica to hold"
    )
    downscale_ratio: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="hysteresis: scale down only when load falls below this share of the target",
    )
    upscale_cooldown_s: float = Field(10.0, ge=0)
    downscale_cooldown_s: float = Field(120.0, ge=0)
    metrics_interval_s: float = Field(2.0, gt=0, description="how often replicas report signals")
    look_back_period_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})"
            )
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must lie within [min_replicas, max_replicas]")
        return self


class ReplicaGroupConfig(_Strict):
    num_replicas: int = Field(1, ge=1, description="fixed replica count (without autoscaling)")
    autoscaling: AutoscalingArgs | None = Field(
        None, description="scale this pool with the IndexCache policy instead of a fixed count"
    )
    num_cpus: float = Field(
        1.0,
        ge=0,
        description="Ray CPUs per replica (fractions allowed); per rank when "
        "engine.tensor_parallel_size > 1 (one placement-group bundle each)",
    )
    num_gpus: float = Field(
        0.0, ge=0, description="Ray GPUs per replica; per rank with tensor parallelism"
    )
    max_ongoing_requests: int = Field(
        256,
        ge=1,
        description="requests a replica accepts at once; the engine's scheduler queues the rest",
    )
    engine: EngineArgs = Field(default_factory=EngineArgs)

    @model_validator(mode="after")
    def _bundles(self):
        if self.engine.tensor_parallel_size > 1 and self.num_cpus + self.num_gpus <= 0:
            raise ValueError(
                "num_cpus or num_gpus must be > 0 with engine.tensor_parallel_size > 1: each "
                "rank gets a placement-group bundle of these resources"
            )
        return self


class IngressConfig(_Strict):
    host: str = Field("127.0.0.1", description="HTTP bind address of the Serve proxy")
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = Field("/", description="URL prefix of the application")
    api_keys: tuple[str, ...] = Field((), description="accepted Bearer keys; empty = no auth")
    max_body_bytes: int = Field(4 << 20, ge=1024, description="request body limit (413 above)")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="prompt token limit; None = max_model_len - 1"
    )
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request omits it")
    max_choices: int = Field(
        16, ge=1, description="choices per request (n x prompts) a request may ask; 400 above"
    )
    tool_call_parser: Literal["auto", "hermes", "glm", "dsml"] = Field(
        "auto",
        description="tool-call format of the model: auto picks by model_type (deepseek_v32: "
        "dsml, glm_moe_dsa: glm, others: hermes)",
    )
    max_concurrent_requests: int = Field(
        512, ge=1, description="in-flight requests per ingress replica; 429 above"
    )
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, ge=0)

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {v!r}")
        return v


class KVTransferConfig(_Strict):
    backend: Literal["object_store", "direct"] = Field(
        "object_store",
        description="object_store: ray.put into the Ray object store; direct: "
        "Ray Direct Transport, tensors stay on the prefill replica until decode pulls them",
    )
    tensor_transport: str = Field("nixl", description="direct only: the RDT transport (nixl)")
    timeout_s: float = Field(
        30.0,
        gt=0,
        description="the whole KV handoff: a decode replica that has not reserved pages for the "
        "payload and pulled it by then gives the request a 503 and both replicas free what "
        "they hold for it",
    )

    @field_validator("tensor_transport")
    @classmethod
    def _transport(cls, v: str) -> str:
        v = v.lower()
        if v in ("gloo", "nccl"):
            # Ray 2.60 refuses ray.put(_tensor_transport=...) for two-sided (collective)
            # transports; they only work for actor-method returns inside a collective group.
            raise ValueError(
                f"tensor_transport {v!r} is two-sided: Ray's ray.put() supports only "
                "one-sided transports; use 'nixl' (CPU or GPU)"
            )
        if v == "cuda_ipc":
            raise ValueError(
                "tensor_transport 'cuda_ipc' is not supported: it shares CUDA tensors only, and a "
                "KV payload is host memory; use 'nixl'"
            )
        if v != "nixl":
            raise ValueError(f"tensor_transport must be 'nixl', got {v!r}")
        return v


class RoutingConfig(_Strict):
    """Which engine replica takes a request, and (disaggregated) whether it needs a prefill
    replica at all."""

    prefix_affinity: bool = Field(
        True,
        description="route engine calls with Ray Serve's PrefixCacheAffinityRouter over token "
        "prefixes (serving/routing.py), so requests sharing a prefix reach the replica caching it",
    )
    imbalanced_threshold: float | None = Field(
        None,
        ge=0,
        description="queue-length gap between replicas above which routing ignores prefixes "
        "and balances load; None = never",
    )
    match_rate_threshold: float = Field(
        0.1,
        ge=0,
        le=1,
        description="shortest matched share of a prompt that routes by prefix; below it the "
        "replica with the fewest cached tokens takes the request",
    )
    prefix_tree_max_tokens: int = Field(
        1_000_000, ge=1, description="router-side prefix tree size at which old prefixes go"
    )
    max_local_prefill_tokens: int = Field(
        0,
        ge=0,
        description="disaggregated: a request whose uncached prompt part is at most this many "
        "tokens is prefilled on the decode replica itself, longer ones on a prefill replica "
        "(NVIDIA Dynamo's rule); 0 = always a prefill replica",
    )

    def router_config(self) -> dict[str, Any] | None:
        """Serve's `request_router_config` of the engine deployments (None: Serve's default)."""
        if not self.prefix_affinity:
            return None
        from serving.routing import ROUTER_PATH

        return {
            "request_router_class": ROUTER_PATH,
            "request_router_kwargs": {
                "imbalanced_threshold": self.imbalanced_threshold
                if self.imbalanced_threshold is not None
                else float("inf"),
                "match_rate_threshold": self.match_rate_threshold,
                "do_eviction": True,
                "eviction_threshold_chars": self.prefix_tree_max_tokens,
                "eviction_target_chars": int(self.prefix_tree_max_tokens * 0.9),
            },
        }


class PlanConfig(_Strict):
    version: int | Literal["latest", "checkpoint"] = Field(
        "latest",
        description="registry plan to run: 'latest' follows new publications, an "
        "integer pins that version, 'checkpoint' ignores the registry",
    )
    poll_interval_s: float = Field(
        2.0,
        ge=0,
        description="how often replicas look for a newer "
        "plan under 'latest' (0 = only on reconfigure)",
    )

    def user_config(self) -> dict[str, Any]:
        """The Serve user_config of engine deployments: editing it re-plans without a restart."""
        return {"plan_version": self.version, "plan_poll_interval_s": self.poll_interval_s}


class ServingConfig(_Strict):
    model: str = Field(
        description="local checkpoint directory (config.json, safetensors, tokenizer.json)"
    )
    served_model_name: str | None = Field(
        None, description="the `model` clients send; default: the directory name"
    )
    mode: Literal["unified", "disaggregated"] = "unified"
    app_name: str = Field("indexcache", description="Ray Serve application name")
    index_cache: str | None = Field(
        None,
        description="F/S pattern used until the registry "
        "holds a plan for this model; None = the checkpoint's own",
    )
    unified: ReplicaGroupConfig = Field(default_factory=ReplicaGroupConfig)
    prefill: ReplicaGroupConfig = Field(default_factory=ReplicaGroupConfig)
    decode: ReplicaGroupConfig = Field(default_factory=ReplicaGroupConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    kv_transfer: KVTransferConfig = Field(default_factory=KVTransferConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    plans: PlanConfig = Field(default_factory=PlanConfig)
    metrics_interval_s: float = Field(
        1.0, gt=0, description="how often replicas publish metric snapshots to the app's /metrics"
    )
    graceful_shutdown_timeout_s: float = Field(
        30.0,
        gt=0,
        description="on SIGTERM or a replica scale-down, how long requests in flight may run "
        "before they are ended with an error event",
    )

    @model_validator(mode="after")
    def _pd_compatible(self):
        if self.mode == "disaggregated":
            p, d = self.prefill.engine, self.decode.engine
            for f in ("dtype", "index_fp8"):
                if getattr(p, f) != getattr(d, f):
                    raise ValueError(
                        f"prefill.engine.{f} ({getattr(p, f)!r}) must equal "
                        f"decode.engine.{f} ({getattr(d, f)!r}): the KV payload "
                        "layout depends on it"
                    )
        return self

    # -- derived values (never written back) --------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).resolve().name

    def group(self, role: str) -> ReplicaGroupConfig:
        return {"unified": self.unified, "prefill": self.prefill, "decode": self.decode}[role]

    @property
    def roles(self) -> tuple[str, ...]:
        return ("unified",) if self.mode == "unified" else ("prefill", "decode")

    def max_model_len(self) -> int:
        """Context length the ingress enforces: the smallest over the engine roles in use."""
        cfg = json.loads((Path(self.model) / "config.json").read_text())
        limits = [
            self.group(r).engine.max_model_len or cfg["max_position_embeddings"] for r in self.roles
        ]
        return min(limits)

    def max_prompt_tokens(self) -> int:
        return self.ingress.max_prompt_tokens or self.max_model_len() - 1

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> ServingConfig:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"serving config {p} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{p}: the top level must be a mapping")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)
