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

from ray import serve

from serving import metrics
from serving.engine_host import EngineHost, PlanInfo, layout_pattern
from serving.metrics_hub import MetricsPublisher
from serving.protocol import DecodeRequest, GenerateRequest, KVReceived, PrefillResponse

log = logging.getLogger(__name__)

REGISTRY_TIMEOUT_S = 5.0  # longest a replica waits on the plan registry before keeping its plan


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


class _EngineServer:
    def __init__(self, spec: EngineSpec):
        self.spec = spec
        replica = serve.get_replica_context().replica_id.unique_id
        self.recorder = metrics.Recorder(spec.model_name, spec.role, replica)
        self.host = EngineHost(self._build, grace_s=spec.kv_timeout_s)
        self.publisher = MetricsPublisher(
            spec.app_name, f"{spec.role}:{replica}", spec.metrics_interval_s, refresh=self._refresh
        )
        self._plan_version: int | str = "latest"
        self._poll_s = 0.0
        self._plan_error: str | None = None
        self._registered = False
        self._registry_calls: dict[str, asyncio.Future] = {}
        self._failed: dict[str | None, str] = {}  # pattern -> why its engine did not build
        self._follower: asyncio.Task | None = None
        self._sync_lock = asyncio.Lock()

    def _build(self, pattern: str | None, kv_pool_bytes: int | None):
        import torch

        from serving.engine import AsyncLLMEngine

        kw = dict(self.spec.engine_kwargs)
        kw["dtype"] = getattr(torch, kw.get("dtype", "float32"))
        if kv_pool_bytes is not None and kw.get("num_blocks") is None:
            # A plan swap: the new pool gets the old one's bytes, not a share of what is free
            # while the old engine still holds its pool.
            kw["kv_memory_bytes"] = kv_pool_bytes
        return AsyncLLMEngine.from_pretrained(
            self.spec.model_path, index_cache=pattern, role=self.spec.role, **kw
        )

    # -- plans ---------------------------------------------------------------------------------
    # A replica never stops serving, and never silently changes plan, because of the registry:
    # a plan it cannot resolve or build leaves it on its current plan with `plan_error` set
    # (GET /health, the indexcache_plan_error gauge, one log line per distinct error); at start,
    # with nothing to keep, it runs the config's or the checkpoint's own plan and says so.
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this after __init__ and on every user_config change."""
        self._plan_version = user_config.get("plan_version", "latest")
        self._poll_s = float(user_config.get("plan_poll_interval_s", 0))
        self._failed.clear()  # a new user_config retries plans that failed to build
        if not self._registered:
            self._registered = await self._register_model()
        await self.sync_plan()
        self.publisher.start()
        if self._follower is None:
            self._follower = asyncio.get_running_loop().create_task(self._follow())

    async def _register_model(self) -> bool:
        """Tell the registry this model's layer count, so a plan of another length is refused
        at publish time."""
        from model.config import ModelConfig
        from serving import plan_registry

        n = ModelConfig.from_pretrained(self.spec.model_path).num_hidden_layers
        try:
            await self._bounded(plan_registry.register_model, self.spec.model_name, n)
            return True
        except Exception as e:
            self._set_plan_error(f"could not register the model in the plan registry: {e}")
            return False

    def _default_plan(self) -> PlanInfo:
        ic = self.spec.index_cache
        return PlanInfo(0, ic, "config" if ic else "checkpoint")

    def _resolve(self) -> PlanInfo:
        """The plan the user_config asks for (blocking: reads the registry's store)."""
        from serving import plan_registry

        if self._plan_version == "checkpoint":
            return self._default_plan()
        version = None if self._plan_version == "latest" else int(self._plan_version)
        rec = plan_registry.get(self.spec.model_name, version)
        if rec is not None:
            return PlanInfo(rec.version, rec.pattern, rec.provenance.source)
        if version is not None:
            raise LookupError(
                f"plan_version {version} of model {self.spec.model_name!r} is not in the plan "
                "registry"
            )
        running = self.host.plan if self.host.plan_ids else None
        if running is not None and running.version > 0:
            raise LookupError(
                f"the plan registry has no plan for {self.spec.model_name!r} but this replica "
                f"runs v{running.version} from it: keeping it (was the registry's state lost, "
                "e.g. a head restart without GCS fault tolerance?)"
            )
        return self._default_plan()

    async def _bounded(self, fn, *args):
        """Run a blocking registry call in a thread, at most REGISTRY_TIMEOUT_S: with the GCS
        unreachable the call would block for a minute. One call at a time: a stuck one is
        awaited again rather than piled up."""
        call = self._registry_calls.get(fn.__name__)
        if call is None or call.done():
            call = self._registry_calls[fn.__name__] = asyncio.ensure_future(
                asyncio.to_thread(fn, *args)
            )
        try:
            async with asyncio.timeout(REGISTRY_TIMEOUT_S):
                return await asyncio.shield(call)
        except TimeoutError:
            raise TimeoutError(
                f"the plan registry (Ray GCS) did not answer within {REGISTRY_TIMEOUT_S:.0f}s"
            ) from None

    def _set_plan_error(self, error: str | None) -> None:
        if error != self._plan_error:
            if error is None:
                log.info("plan error cleared; running %s", self.host.plan)
            else:
                log.error("plan not applied: %s", error)
        self._plan_error = error

    async def sync_plan(self) -> None:
        """Load the plan the user_config asks for; never raises while an engine runs."""
        async with self._sync_lock:
            try:
                plan = await self._bounded(self._resolve)
                if plan.pattern in self._failed:  # building it again would fail again
                    raise RuntimeError(self._failed[plan.pattern])
                try:
                    await self.host.load(plan)
                except Exception as e:
                    self._failed[plan.pattern] = (
                        f"plan v{plan.version} {plan.pattern} could not be loaded: "
                        f"{type(e).__name__}: {e}"
                    )
                    raise RuntimeError(self._failed[plan.pattern]) from e
                self._set_plan_error(None)
            except Exception as e:
                self._set_plan_error(f"{type(e).__name__}: {e}")
                if not self.host.plan_ids:
                    # Start-up: an unusable plan must never keep the replica from starting.
                    # If the model's own plan fails too, the replica cannot run at all.
                    await self.host.load(self._default_plan())

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s or 1.0)
            if not self._registered:
                self._registered = await self._register_model()
            if self._poll_s and self._plan_version == "latest":
                await self.sync_plan()

    # -- health, metrics, autoscaling ------------------------------------------------------------
    def _refresh(self) -> None:
        stats = self.host.stats() if self.host.plan_ids else {}
        self.recorder.update_engine({**stats, "plan_error": float(self._plan_error is not None)})

    async def check(self) -> dict[str, Any]:
        plan = self.host.plan
        return {
            "role": self.spec.role,
            "plan_version": plan.version,
            "plan_source": plan.source,
            "plan_ids": self.host.plan_ids,
            "plan_error": self._plan_error,
        }

    def check_health(self) -> None:
        if not self.host.healthy():
            raise RuntimeError("engine thread died")

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
        from serving.kv_transfer import make_transport

        self.transport = make_transport(spec.kv_backend, spec.tensor_transport)
        self._queued_tokens = 0  # prompt tokens accepted and not yet prefilled
        self._latency = deque(maxlen=128)  # recent arrival -> first token seconds

    async def prefill(self, req: GenerateRequest) -> PrefillResponse:
        start, n = time.monotonic(), len(req.prompt_token_ids)
        self._queued_tokens += n
        try:
            async with self.host.acquire() as engine:
                res = await engine.prefill(
                    req.request_id, list(req.prompt_token_ids), req.params, req.resume
                )
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

    async def decode(self, req: DecodeRequest):
        start = time.monotonic()
        payload = await self.transport.get(req.kv, self.spec.kv_timeout_s)
        req.kv.release()
        seconds = time.monotonic() - start
        self.recorder.observe_kv_transfer(seconds, payload.nbytes)
        yield KVReceived(payload.nbytes, seconds, payload.plan_id)
        if not self.host.has_plan(payload.plan_id):
            await self.sync_plan()  # the prefill side may have rolled out a newer plan first
        # Still another plan (a prefill replica behind or ahead, or one that could not load
        # the new plan): decode it with an engine of that plan rather than fail the request.
        pattern = layout_pattern(payload.layout)
        async with self.host.acquire_plan(payload.plan_id, pattern) as engine:
            stream = engine.decode(req.request_id, payload, req.params, req.resume)
            del payload  # the engine holds it until imported
            async for delta in stream:
                yield delta
