"""Where an application's replicas leave their metric snapshots for the ingress's GET /metrics.

Serve routes a request to one replica of a deployment, so the ingress cannot ask every engine
replica for its metrics. Instead each replica pushes `metrics.snapshot()` to a named detached
actor per application every `interval_s`, and the ingress renders the merge. A replica that
stops pushing (scaled down, crashed) drops out after `ttl_s`, so its gauges do not linger.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import ray

from serving import metrics
from serving.plan_registry import NAMESPACE

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class MetricsHubActor:
    def __init__(self):
        self._snaps: dict[str, tuple[float, float, list]] = {}  # key -> (time, ttl, families)

    def push(self, key: str, families: list, ttl_s: float) -> None:
        self._snaps[key] = (time.monotonic(), ttl_s, families)

    def drop(self, key: str) -> None:
        self._snaps.pop(key, None)

    def collect(self, exclude: str | None = None) -> list[list]:
        now = time.monotonic()
        for k in [k for k, (t, ttl, _) in self._snaps.items() if now - t > ttl]:
            del self._snaps[k]
        return [fams for k, (_, _, fams) in self._snaps.items() if k != exclude]


def hub(app_name: str):
    return MetricsHubActor.options(
        name=f"metrics_hub:{app_name}", namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


class MetricsPublisher:
    """Runs in a replica: refresh (e.g. read engine stats), snapshot, push; forever."""

    def __init__(
        self, app_name: str, key: str, interval_s: float, refresh: Callable[[], None] | None = None
    ):
        self.key, self.interval_s, self.refresh = key, interval_s, refresh
        self.ttl_s = max(15.0, 10 * interval_s)
        self._hub = hub(app_name)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def push_now(self) -> None:
        if self.refresh is not None:
            self.refresh()
        await self._hub.push.remote(self.key, metrics.snapshot(), self.ttl_s)

    async def _run(self) -> None:
        while True:
            try:
                await self.push_now()
            except asyncio.CancelledError:
                raise
            except Exception:  # metrics must never take a replica down
                log.exception("metrics push failed")
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        try:
            await self._hub.drop.remote(self.key)
        except Exception:
            pass

    async def others(self) -> list[list]:
        """Every other live replica's snapshot (the ingress adds its own, fresh)."""
        return await self._hub.collect.remote(self.key)
