"""Which IndexCache plan an engine replica runs, and following the plan registry.

A replica takes its plan from the registry (serving/plan_registry.py) at start, on every Serve
`user_config` change, and (under `plan_version: latest`) every `plan_poll_interval_s`. Rules:

- a plan it cannot resolve (registry unreachable, a pinned version missing, the registry's state
  lost) or cannot build (wrong length, memory, missing indexer weights) leaves it on its current
  plan, with `error` set: GET /health shows it, the indexcache_plan_error gauge is 1, and it is
  logged once per distinct error, not at every poll; a plan that failed to build is not built
  again until the user_config changes;
- at start, with nothing to keep, it runs the config's or the checkpoint's own plan and reports
  why: an unusable plan never stops a replica from starting (it only fails to start if the
  model's own plan cannot be built);
- it never reverts silently: a registry with no plan for a model the replica runs a registry
  plan of is reported, and the plan kept;
- registry calls run in a thread and are bounded by REGISTRY_TIMEOUT_S (with the GCS down they
  would block for a minute); a call still stuck is awaited again, not piled up.

No Ray Serve here (the deployments own one PlanFollower each); the registry is reached through
serving/plan_registry.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from serving.engine_host import EngineHost, PlanInfo

log = logging.getLogger(__name__)

REGISTRY_TIMEOUT_S = 5.0  # longest a replica waits on the plan registry before keeping its plan


class PlanFollower:
    def __init__(
        self,
        host: EngineHost,
        model_name: str,
        model_path: str,
        index_cache: str | None,
        role: str = "unified",
        registry: Any = None,  # the plan_registry module (a stand-in in tests)
    ):
        self.host, self.model_name, self.model_path = host, model_name, model_path
        self.index_cache, self.role = index_cache, role
        self._registry = registry
        self.version: int | str = "latest"
        self.poll_s = 0.0
        self.error: str | None = None
        self._registered = False
        self._calls: dict[str, asyncio.Future] = {}
        self._failed: dict[str | None, str] = {}  # pattern -> why its engine did not build
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    @property
    def registry(self):
        if self._registry is None:
            from serving import plan_registry

            self._registry = plan_registry
        return self._registry

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.version = user_config.get("plan_version", "latest")
        self.poll_s = float(user_config.get("plan_poll_interval_s", 0))
        self._failed.clear()  # a new user_config retries plans that failed to build
        if not self._registered:
            self._registered = await self._register_model()
        await self.sync()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._follow())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    # -- the registry ----------------------------------------------------------------------------
    async def _register_model(self) -> bool:
        """Tell the registry this model's layer count, so a plan of another length is refused
        at publish time."""
        from model.config import ModelConfig

        n = ModelConfig.from_pretrained(self.model_path).num_hidden_layers
        try:
            await self._bounded(self.registry.register_model, self.model_name, n)
            return True
        except Exception as e:
            self._set_error(f"could not register the model in the plan registry: {e}")
            return False

    def default_plan(self) -> PlanInfo:
        ic = self.index_cache
        return PlanInfo(0, ic, "config" if ic else "checkpoint")

    def _resolve(self) -> PlanInfo:
        """The plan the user_config asks for (blocking: reads the registry's store)."""
        if self.version == "checkpoint":
            return self.default_plan()
        version = None if self.version == "latest" else int(self.version)
        rec = self.registry.get(self.model_name, version)
        if rec is not None:
            return PlanInfo(rec.version, rec.pattern, rec.provenance.source)
        if version is not None:
            raise LookupError(
                f"plan_version {version} of model {self.model_name!r} is not in the plan registry"
            )
        running = self.host.plan if self.host.plan_ids else None
        if running is not None and running.version > 0:
            raise LookupError(
                f"the plan registry has no plan for {self.model_name!r} but this replica runs "
                f"v{running.version} from it: keeping it (was the registry's state lost, e.g. "
                "a head restart without GCS fault tolerance?)"
            )
        return self.default_plan()

    async def _bounded(self, fn, *args):
        call = self._calls.get(fn.__name__)
        if call is None or call.done():
            call = self._calls[fn.__name__] = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        try:
            async with asyncio.timeout(REGISTRY_TIMEOUT_S):
                return await asyncio.shield(call)
        except TimeoutError:
            raise TimeoutError(
                f"the plan registry (Ray GCS) did not answer within {REGISTRY_TIMEOUT_S:.0f}s"
            ) from None

    # -- applying --------------------------------------------------------------------------------
    def _set_error(self, error: str | None) -> None:
        if error != self.error:
            if error is None:
                log.info("%s replica: plan error cleared, running %s", self.role, self.host.plan)
            else:
                log.error("%s replica: plan not applied: %s", self.role, error)
        self.error = error

    async def sync(self) -> None:
        """Load the plan the user_config asks for; never raises while an engine runs."""
        async with self._lock:
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
                self._set_error(None)
            except Exception as e:
                self._set_error(f"{type(e).__name__}: {e}")
                if not self.host.plan_ids:
                    # Start-up: an unusable plan must never keep the replica from starting.
                    # If the model's own plan fails too, the replica cannot run at all.
                    await self.host.load(self.default_plan())

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s or 1.0)
            if not self._registered:
                self._registered = await self._register_model()
            if self.poll_s and self.version == "latest":
                await self.sync()
