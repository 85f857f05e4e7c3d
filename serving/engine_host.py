"""The engine a replica runs, and swapping it for a new IndexCache plan without a restart.

S layers hold no indexer weights, so a new plan means a new model instance: the host builds the
new engine off the event loop, switches new requests to it at once, and lets the old engine
drain: its running requests finish, and a decode replica keeps accepting KV payloads made under
the old plan for `grace_s` (prefill replicas may switch a moment later or earlier than decode
replicas). Then the old engine shuts down and its counters are folded into the totals, so the
exported counters never go backwards. During a swap a replica briefly holds two KV pools.

No Ray here: the deployments (serving/deployments.py) drive it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from serving.errors import Unavailable

log = logging.getLogger(__name__)

# EngineStats fields that are cumulative counters (summed over engines, kept after a swap).
COUNTERS = (
    "prompt_tokens_total",
    "generation_tokens_total",
    "num_preemptions",
    "indexer_layers_run_total",
    "indexer_layers_skipped_total",
    "prefix_cache_queries_total",
    "prefix_cache_hits_total",
    "prefix_cache_evictions_total",
)


@dataclass(frozen=True)
class PlanInfo:
    version: int  # registry version; 0 = the checkpoint's or the config's own plan
    pattern: str | None  # None: the checkpoint decides
    source: str = "checkpoint"


@dataclass
class _Slot:
    engine: Any  # AsyncLLMEngine
    plan: PlanInfo
    plan_id: str
    inflight: int = 0
    retired_at: float | None = None  # when a newer engine replaced it
    idle: asyncio.Event = field(default_factory=asyncio.Event)


class EngineHost:
    def __init__(self, build: Callable[[str | None], Any], *, grace_s: float = 30.0):
        self._build = build  # pattern (or None) -> AsyncLLMEngine; blocking, run in a thread
        self.grace_s = grace_s
        self._slots: list[_Slot] = []  # [-1] is current; earlier ones are draining
        self._retired_totals = dict.fromkeys(COUNTERS, 0)
        self._lock = asyncio.Lock()
        self._reapers: set[asyncio.Task] = set()

    # -- plans ----------------------------------------------------------------------------------
    @property
    def current(self) -> _Slot:
        if not self._slots:
            raise Unavailable("the engine is still loading")
        return self._slots[-1]

    @property
    def plan(self) -> PlanInfo:
        return self.current.plan

    @property
    def plan_ids(self) -> list[str]:
        return [s.plan_id for s in self._slots]

    async def load(self, plan: PlanInfo) -> bool:
        """Run `plan` from now on; returns whether a new engine was built."""
        async with self._lock:
            if self._slots and self._slots[-1].plan.pattern == plan.pattern:
                self._slots[-1].plan = plan  # same layers (e.g. republished): no rebuild
                return False
            engine = await asyncio.to_thread(self._build, plan.pattern)
            slot = _Slot(engine, plan, engine.stats().plan_id)
            if self._slots:
                old = self._slots[-1]
                old.retired_at = time.monotonic()
                task = asyncio.get_running_loop().create_task(self._reap(old))
                self._reapers.add(task)
                task.add_done_callback(self._reapers.discard)
            self._slots.append(slot)
            log.info("engine plan %s (v%d, %s) loaded", slot.plan_id, plan.version, plan.source)
            return True

    async def _reap(self, slot: _Slot) -> None:
        await asyncio.sleep(self.grace_s)
        while slot.inflight:
            slot.idle.clear()
            await slot.idle.wait()
        self._slots.remove(slot)
        final = slot.engine.stats()
        for k in COUNTERS:
            self._retired_totals[k] += getattr(final, k)
        await slot.engine.shutdown()
        log.info("engine plan %s drained and shut down", slot.plan_id)

    # -- requests -------------------------------------------------------------------------------
    @asynccontextmanager
    async def acquire(self, plan_id: str | None = None) -> AsyncIterator[Any]:
        """The engine for a request: the current one, or (decode) the one whose plan made the
        payload while it still drains."""
        slot = self.current if plan_id is None else self._find(plan_id)
        slot.inflight += 1
        try:
            yield slot.engine
        finally:
            slot.inflight -= 1
            if not slot.inflight:
                slot.idle.set()

    def _find(self, plan_id: str) -> _Slot:
        for slot in reversed(self._slots):
            if slot.plan_id == plan_id:
                return slot
        raise Unavailable(
            f"KV payload was made under plan {plan_id}, this decode replica runs "
            f"{self.plan_ids}; a plan rollout is in progress, retry",
            code="plan_mismatch",
        )

    def has_plan(self, plan_id: str) -> bool:
        return any(s.plan_id == plan_id for s in self._slots)

    # -- health and statistics ------------------------------------------------------------------
    def healthy(self) -> bool:
        return self.problem() is None

    def problem(self) -> str | None:
        """None when every engine runs; else what is wrong (a dead engine thread, or a
        tensor-parallel engine's rank that stopped)."""
        for s in self._slots:
            if not getattr(getattr(s.engine, "_thread", None), "is_alive", lambda: True)():
                return "engine thread died"
            alive = getattr(s.engine, "alive", None)
            err = alive() if alive is not None else None
            if err is not None:
                return err
        return None

    def stats(self) -> dict[str, float]:
        """Replica-wide values for metrics and autoscaling: counters summed over live and retired
        engines, request and KV gauges over live engines, the plan of the current engine."""
        live = [s.engine.stats() for s in self._slots]
        out: dict[str, float] = {
            k: self._retired_totals[k] + sum(getattr(s, k) for s in live) for k in COUNTERS
        }
        out["num_running"] = sum(s.num_running for s in live)
        out["num_waiting"] = sum(s.num_waiting for s in live)
        total = sum(s.kv_blocks_total for s in live)
        out["kv_usage"] = sum(s.kv_blocks_used for s in live) / total if total else 0.0
        out["kv_cached"] = sum(s.kv_blocks_cached_free for s in live) / total if total else 0.0
        out["prefix_cache_pages"] = sum(s.prefix_cache_pages for s in live)
        out["kv_capacity_tokens"] = sum(s.kv_capacity_tokens for s in live)
        if live:
            out["f_layer_ratio"] = live[-1].f_layer_ratio
            out["plan_version"] = self._slots[-1].plan.version
        return out

    async def shutdown(self) -> None:
        for task in list(self._reapers):
            task.cancel()
        for slot in self._slots:
            await slot.engine.shutdown()
        self._slots.clear()
