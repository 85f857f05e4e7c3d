"""Where an application's replicas leave their metric snapshots for the ingress's GET /metrics.

Serve routes a request to one replica of a deployment, so the ingress cannot ask every engine
replica for its metrics. Instead each replica pushes `metrics.snapshot()` to a named detached
actor per application every `interval_s`, and the ingress renders the merge. A replica that
stops pushing (scaled down, crashed) drops out after `ttl_s`, so its gauges do not linger.

The hub holds nothing that is not pushed again within one interval, so losing it loses nothing:
Ray restarts it after a crash (`max_restarts`), and a hub that is gone for good (killed, its node
lost) is created again by the next replica that fails to reach it. /metrics is complete again
after one push interval, and each replica logs one warning per outage, not one per push.
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


@ray.remote(num_cpus=0, max_restarts=-1)
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


class HubUnavailable(RuntimeError):
    """The hub could not be reached, even after looking it up again (already logged)."""


class MetricsPublisher:
    """Runs in a replica: refresh (e.g. read engine stats), snapshot, push; forever."""

    def __init__(
        self, app_name: str, key: str, interval_s: float, refresh: Callable[[], None] | None = None
    ):
        self.app_name, self.key, self.interval_s, self.refresh = app_name, key, interval_s, refresh
        self.ttl_s = max(15.0, 10 * interval_s)
        self._hub = None
        self._down_since: float | None = None  # first failure of the current outage
        self._task: asyncio.Task | None = None
        self._refresh_error: str | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _call(self, method: str, *args):
        """One hub call; a dead hub is looked up (or created) again and the call retried once."""
        for attempt in range(2):
            try:
                if self._hub is None:
                    self._hub = hub(self.app_name)
                out = await getattr(self._hub, method).remote(*args)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._hub = None
                if attempt == 0:
                    continue
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning(
                        "metrics hub of %s unreachable (%s: %s); retrying every %.1fs",
                        self.app_name,
                        type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "",
                        self.interval_s,
                    )
                raise HubUnavailable(f"metrics hub of {self.app_name} unreachable: {e}") from e
            if self._down_since is not None:
                log.warning(
                    "metrics hub of %s reachable again after %.1fs",
                    self.app_name,
                    time.monotonic() - self._down_since,
                )
                self._down_since = None
            return out

    async def push_now(self) -> None:
        if self.refresh is not None:
            self.refresh()
        await self._call("push", self.key, metrics.snapshot(), self.ttl_s)

    async def _run(self) -> None:
        while True:
            try:
                await self.push_now()
            except asyncio.CancelledError:
                raise
            except HubUnavailable:  # logged once per outage in _call
                pass
            except Exception as e:  # metrics must never take a replica down
                if repr(e) != self._refresh_error:  # once per distinct error, not per push
                    self._refresh_error = repr(e)
                    log.exception("metrics snapshot failed")
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        try:
            await self._call("drop", self.key)
        except Exception:
            pass

    async def others(self) -> list[list]:
        """Every other live replica's snapshot (the ingress adds its own, fresh)."""
        return await self._call("collect", self.key)
