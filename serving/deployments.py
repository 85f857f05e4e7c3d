"""Engine deployments: UnifiedServer, PrefillServer, DecodeServer, each an AsyncLLMEngine in a role.

They never call each other (the ingress orchestrates), so each deployment's load measures its own
phase. All three:
- take their IndexCache plan from the plan registry, at start and whenever the Serve
  `user_config` changes (`reconfigure`) or, under `plan_version: latest`, a newer version is
  published: the EngineHost swaps engines without dropping requests; a plan that cannot be used
  never stops a replica or silently changes its plan (serving/plan_follower.py);
- publish metrics snapshots to the app's hub, and autoscaling signals to Serve
  (`record_autoscaling_stats`, read by autoscale/ray_policy.py);
- abort a request when its caller goes away (Serve cancels the call; the engine's stream closes).

The prefill and decode sides of the KV handoff are serving/kv_connector.py's; these classes only
bind it to the replica's engine.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from ray import serve

from serving import metrics
from serving.engine_host import EngineHost, layout_pattern
from serving.kv_connector import KVConnector
from serving.metrics_hub import MetricsPublisher
from serving.plan_follower import PlanFollower
from serving.protocol import DecodeRequest, GenerateRequest, PrefillRoute

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSpec:
    """What an engine deployment is built from (plain values; made by app.build_app)."""

    app_name: str
    model_path: str
    model_name: str
    role: str
    engine_kwargs: dict
    index_cache: str | None  # config plan, used while the registry has none ('checkpoint' mode)
    kv_backend: str = "object_store"
    tensor_transport: str = "nixl"
    kv_timeout_s: float = 30.0
    metrics_interval_s: float = 1.0
    max_local_prefill_tokens: int = 0  # decode: prefill locally when this few tokens are uncached
    # per rank of a tensor-parallel replica (engine_kwargs' tensor_parallel_size > 1)
    rank_num_cpus: float = 1.0
    rank_num_gpus: float = 0.0


class _EngineServer:
    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.replica = replica = serve.get_replica_context().replica_id.unique_id
        self.recorder = metrics.Recorder(spec.model_name, spec.role, replica)
        self.host = EngineHost(self._build, grace_s=spec.kv_timeout_s)
        self.publisher = MetricsPublisher(
            spec.app_name, f"{spec.role}:{replica}", spec.metrics_interval_s, refresh=self._refresh
        )
        self.plans = PlanFollower(
            self.host, spec.model_name, spec.model_path, spec.index_cache, spec.role
        )
        self.kv: KVConnector | None = None  # disaggregated roles: their side of the handoff

    def _connector(self) -> KVConnector:
        s = self.spec
        return KVConnector(s.kv_backend, s.tensor_transport, s.kv_timeout_s, self.recorder)

    def _build(self, pattern: str | None, kv_pool_bytes: int | None):
        from serving.engine import AsyncLLMEngine

        kw = dict(self.spec.engine_kwargs)
        if kv_pool_bytes is not None and kw.get("num_blocks") is None:
            # A plan swap: the new pool gets the old one's bytes, not a share of what is free
            # while the old engine still holds its pool.
            kw["kv_memory_bytes"] = kv_pool_bytes
        if kw.get("tensor_parallel_size", 1) > 1:
            from serving.tp_replica import TPAsyncEngine

            return TPAsyncEngine.start(
                self.spec.model_path,
                pattern,
                {**kw, "role": self.spec.role},
                self.spec.rank_num_cpus,
                self.spec.rank_num_gpus,
                f"{self.spec.app_name}-{self.spec.role}-{self.replica}",
            )
        return AsyncLLMEngine.from_pretrained(
            self.spec.model_path,
            index_cache=pattern,
            role=self.spec.role,
            **kw,
        )

    # -- plans (serving/plan_follower.py) -------------------------------------------------------
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this after __init__ and on every user_config change."""
        await self.plans.reconfigure(user_config)
        self.publisher.start()

    async def sync_plan(self) -> None:
        await self.plans.sync()

    # -- health, metrics, autoscaling ------------------------------------------------------------
    def _refresh(self) -> None:
        stats = self.host.stats() if self.host.plan_ids else {}
        self.recorder.update_engine({**stats, "plan_error": float(self.plans.error is not None)})

    async def check(self) -> dict[str, Any]:
        problem = self.host.problem()
        if problem is not None:
            raise RuntimeError(problem)
        plan, stats = self.host.plan, self.host.stats()
        return {
            "role": self.spec.role,
            "replica": self.replica,
            "num_running": int(stats.get("num_running", 0)),
            "num_waiting": int(stats.get("num_waiting", 0)),
            "plan_version": plan.version,
            "plan_source": plan.source,
            "plan_ids": self.host.plan_ids,
            "plan_error": self.plans.error,
            # prompt + output tokens one request can have here (model limit and KV pool)
            "max_model_len": plan_max_len(self.host),
            # KV pages and handoffs (disaggregated: what the handoff holds on this replica)
            "kv_blocks_total": int(stats.get("kv_blocks_total", 0)),
            "kv_blocks_used": int(stats.get("kv_blocks_used", 0)),
            "kv_blocks_handoff": int(stats.get("kv_blocks_handoff", 0)),
            "num_exporting": int(stats.get("num_exporting", 0)),
            "handoffs_waiting": int(stats.get("handoffs_waiting", 0)),
            "handoffs_reserved": int(stats.get("handoffs_reserved", 0)),
            "kv_bytes_received": self.kv.bytes_received if self.kv is not None else 0,
            # the other ranks' actors of a tensor-parallel engine (empty: one rank)
            "tp_ranks": list(getattr(self.host.current.engine, "ranks", [])),
        }

    def check_health(self) -> None:
        problem = self.host.problem()
        if problem is not None:
            raise RuntimeError(problem)

    def record_autoscaling_stats(self) -> dict[str, float]:
        s = self.host.stats()
        return {
            "num_running": float(s.get("num_running", 0)),
            "num_waiting": float(s.get("num_waiting", 0)),
            "kv_usage": float(s.get("kv_usage", 0.0)),
        }

    async def __del__(self):
        self.plans.stop()
        await self.publisher.stop()
        await self.host.shutdown()


def plan_max_len(host: EngineHost) -> int | None:
    try:
        return int(host.current.engine.engine.max_len)
    except Exception:  # still loading
        return None


@serve.deployment
class UnifiedServer(_EngineServer):
    async def generate(self, req: GenerateRequest):
        async with self.host.acquire() as engine:
            async for delta in engine.generate(
                req.request_id, list(req.prompt_token_ids), req.params, req.resume
            ):
                yield delta


@serve.deployment
class PrefillServer(_EngineServer):
    def __init__(self, spec: EngineSpec):
        super().__init__(spec)
        self.kv = self._connector()
        self._queued_tokens = 0  # prompt tokens accepted and not yet prefilled
        self._latency = deque(maxlen=128)  # recent arrival -> first token seconds

    async def prefill(self, req: GenerateRequest):
        """Streams the PrefillResponse, then holds the KV payload's pages until the caller
        closes the stream (the decode side has it) or the transfer timeout passes."""
        n = len(req.prompt_token_ids)
        self._queued_tokens += n
        prefilled = False

        def done(seconds: float) -> None:
            nonlocal prefilled
            prefilled = True
            self._queued_tokens -= n
            self._latency.append(seconds)

        try:
            async with self.host.acquire() as engine:
                async for resp in self.kv.send(engine, req, done):
                    yield resp
        finally:
            if not prefilled:
                self._queued_tokens -= n

    def record_autoscaling_stats(self) -> dict[str, float]:
        lat = sorted(self._latency)
        p90 = lat[min(len(lat) - 1, int(0.9 * len(lat)))] if lat else 0.0
        return {
            **super().record_autoscaling_stats(),
            "queued_prompt_tokens": float(self._queued_tokens),
            "prefill_latency_p90_s": p90,
        }


@serve.deployment
class DecodeServer(_EngineServer):
    def __init__(self, spec: EngineSpec):
        super().__init__(spec)
        self.kv = self._connector()
        for local in (True, False):  # exported from the start, at 0
            self.recorder.count_prefill_route(local, 0)

    async def generate_or_defer(self, req: GenerateRequest):
        """Selective disaggregation (NVIDIA Dynamo's rule): prefill here when the part of the
        prompt this replica's prefix cache lacks is at most `max_local_prefill_tokens`
        (typically a conversation's next turn, routed here by prefix); otherwise yield only
        the route and end, and the ingress goes through a prefill replica. A resumed request
        (failover) prefills its resumed tokens too, so they count as prompt here."""
        ids = list(req.prompt_token_ids)
        full = ids + list(req.resume.token_ids) if req.resume is not None else ids
        async with self.host.acquire() as engine:
            cached = await engine.cached_prefix_tokens(full)
            local = len(full) - cached <= self.spec.max_local_prefill_tokens
            self.recorder.count_prefill_route(local)
            yield PrefillRoute(local, cached, len(full))
            if local:
                async for delta in engine.generate(req.request_id, ids, req.params, req.resume):
                    yield delta

    async def decode(self, req: DecodeRequest):
        """KVReceived once pages are reserved and the payload pulled, then the tokens."""
        plan_id = req.kv.plan_id
        if not self.host.has_plan(plan_id):
            await self.sync_plan()  # the prefill side may have rolled out a newer plan first
        # Still another plan (a prefill replica behind or ahead, or one that could not load
        # the new plan): decode it with an engine of that plan rather than fail the request.
        pattern = layout_pattern(req.kv.header.layout)
        async with self.host.acquire_plan(plan_id, pattern) as engine:
            async for item in self.kv.receive(engine, req):
                yield item
