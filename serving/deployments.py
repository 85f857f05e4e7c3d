"""Engine deployments: UnifiedServer, PrefillServer, DecodeServer, each an AsyncLLMEngine in a role.

They never call each other (the ingress orchestrates), so each deployment's load measures its own
phase. All three:
- take their IndexCache plan from the plan registry, at start and whenever the Serve
  `user_config` changes (`reconfigure`) or, under `plan_version: latest`, a newer version is
  published: the EngineHost swaps engines without dropping requests;
- publish metrics snapshots to the app's hub, and autoscaling signals to Serve
  (`record_autoscaling_stats`, read by autoscale/ray_policy.py);
- abort a request when its caller goes away (Serve cancels the call; the engine's stream closes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve

from serving import metrics
from serving.engine_host import EngineHost, PlanInfo
from serving.metrics_hub import MetricsPublisher
from serving.protocol import (
    DecodeRequest,
    GenerateRequest,
    KVReceived,
    PrefillResponse,
    PrefillRoute,
)

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
        replica = self.replica = serve.get_replica_context().replica_id.unique_id
        self.recorder = metrics.Recorder(spec.model_name, spec.role, replica)
        self.host = EngineHost(self._build, grace_s=spec.kv_timeout_s)
        self.publisher = MetricsPublisher(
            spec.app_name, f"{spec.role}:{replica}", spec.metrics_interval_s, refresh=self._refresh
        )
        self._plan_version: int | str = "latest"
        self._poll_s = 0.0
        self._plan_error: str | None = None
        self._follower: asyncio.Task | None = None
        self._sync_lock = asyncio.Lock()

    def _build(self, pattern: str | None):
        from serving.engine import AsyncLLMEngine

        if self.spec.engine_kwargs.get("tensor_parallel_size", 1) > 1:
            from serving.tp_replica import TPAsyncEngine

            settings = {**self.spec.engine_kwargs, "role": self.spec.role}
            return TPAsyncEngine.start(
                self.spec.model_path,
                pattern,
                settings,
                self.spec.rank_num_cpus,
                self.spec.rank_num_gpus,
                f"{self.spec.app_name}-{self.spec.role}-{self.replica}",
            )
        return AsyncLLMEngine.from_pretrained(
            self.spec.model_path,
            index_cache=pattern,
            role=self.spec.role,
            **self.spec.engine_kwargs,
        )

    # -- plans ---------------------------------------------------------------------------------
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this after __init__ and on every user_config change."""
        self._plan_version = user_config.get("plan_version", "latest")
        self._poll_s = float(user_config.get("plan_poll_interval_s", 0))
        await self.sync_plan()  # raises only while no engine runs (a replica has nothing to keep)
        self.publisher.start()
        if self._follower is None:
            self._follower = asyncio.get_running_loop().create_task(self._follow())

    def _resolve(self) -> PlanInfo:
        from serving.plan_registry import registry

        default = PlanInfo(
            0, self.spec.index_cache, "config" if self.spec.index_cache else "checkpoint"
        )
        if self._plan_version == "checkpoint":
            return default
        version = None if self._plan_version == "latest" else int(self._plan_version)
        rec = ray.get(registry().get.remote(self.spec.model_name, version))
        if rec is None:
            if version is not None:
                raise ValueError(
                    f"plan_version {version} of model {self.spec.model_name!r} is "
                    "not in the plan registry"
                )
            return default
        return PlanInfo(rec.version, rec.pattern, rec.provenance.source)

    async def sync_plan(self) -> None:
        """Load the plan the user_config asks for. A bad plan (unknown version, wrong layer
        count) keeps the running engine and is reported by check() and the logs; at start it
        fails the replica, as there is nothing to keep."""
        async with self._sync_lock:
            try:
                plan = await asyncio.to_thread(self._resolve)
                await self.host.load(plan)
                self._plan_error = None
            except Exception as e:
                self._plan_error = f"{type(e).__name__}: {e}"
                log.error("plan update failed: %s", self._plan_error)
                if not self.host.plan_ids:
                    raise

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s or 1.0)
            if self._poll_s and self._plan_version == "latest":
                try:
                    await self.sync_plan()
                except Exception:
                    pass  # logged in sync_plan; retried next tick

    # -- health, metrics, autoscaling ------------------------------------------------------------
    def _refresh(self) -> None:
        self.recorder.update_engine(self.host.stats())

    async def check(self) -> dict[str, Any]:
        problem = self.host.problem()
        if problem is not None:
            raise RuntimeError(problem)
        plan = self.host.plan
        return {
            "role": self.spec.role,
            "plan_version": plan.version,
            "plan_source": plan.source,
            "plan_ids": self.host.plan_ids,
            "plan_error": self._plan_error,
            # prompt + output tokens one request can have here (model limit and KV pool)
            "max_model_len": plan_max_len(self.host),
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
                req.request_id, list(req.prompt_token_ids), req.params
            ):
                yield delta


@serve.deployment
class PrefillServer(_EngineServer):
    def __init__(self, spec: EngineSpec):
        super().__init__(spec)
        from serving.kv_transfer import make_transport

        self.transport = make_transport(spec.kv_backend, spec.tensor_transport)
        self._queued_tokens = 0  # prompt tokens accepted and not yet prefilled
        self._latency = deque(maxlen=128)  # recent arrival -> first token seconds

    async def prefill(self, req: GenerateRequest) -> PrefillResponse:
        start, n = time.monotonic(), len(req.prompt_token_ids)
        self._queued_tokens += n
        try:
            async with self.host.acquire() as engine:
                res = await engine.prefill(req.request_id, list(req.prompt_token_ids), req.params)
        finally:
            self._queued_tokens -= n
        elapsed = time.monotonic() - start
        self._latency.append(elapsed)
        kv = None
        if res.finish_reason is None:
            t0 = time.monotonic()
            kv = self.transport.put(res.payload)
            self.recorder.observe_kv_transfer(time.monotonic() - t0, 0)  # put side: time only
        return PrefillResponse(
            req.request_id,
            res.first_token,
            res.text,
            res.finish_reason,
            res.num_prompt_tokens,
            kv,
            res.payload.plan_id,
            res.logprobs,
            elapsed,
        )

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
        from serving.kv_transfer import make_transport

        self.transport = make_transport(spec.kv_backend, spec.tensor_transport)
        for local in (True, False):  # exported from the start, at 0
            self.recorder.count_prefill_route(local, 0)

    async def generate_or_defer(self, req: GenerateRequest):
        """Selective disaggregation (NVIDIA Dynamo's rule): prefill here when the part of the
        prompt this replica's prefix cache lacks is at most `max_local_prefill_tokens`
        (typically a conversation's next turn, routed here by prefix); otherwise yield only
        the route and end, and the ingress goes through a prefill replica."""
        ids = list(req.prompt_token_ids)
        async with self.host.acquire() as engine:
            cached = await engine.cached_prefix_tokens(ids)
            local = len(ids) - cached <= self.spec.max_local_prefill_tokens
            self.recorder.count_prefill_route(local)
            yield PrefillRoute(local, cached, len(ids))
            if local:
                async for delta in engine.generate(req.request_id, ids, req.params):
                    yield delta

    async def decode(self, req: DecodeRequest):
        start = time.monotonic()
        payload = await self.transport.get(req.kv, self.spec.kv_timeout_s)
        req.kv.release()
        seconds = time.monotonic() - start
        self.recorder.observe_kv_transfer(seconds, payload.nbytes)
        yield KVReceived(payload.nbytes, seconds, payload.plan_id)
        if not self.host.has_plan(payload.plan_id):
            await self.sync_plan()  # the prefill side may have rolled out a newer plan first
        async with self.host.acquire(payload.plan_id) as engine:
            stream = engine.decode(req.request_id, payload, req.params)
            del payload  # the engine holds it until imported
            async for delta in stream:
                yield delta
