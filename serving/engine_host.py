"""The engine a replica runs, and swapping it for a new IndexCache plan without a restart.

S layers hold no indexer weights, so a new plan means a new model instance: the host builds the
new engine off the event loop, switches new requests to it at once, and lets the old engine
drain: its running requests finish, and a decode replica keeps accepting KV payloads made under
the old plan. Then the old engine shuts down and its counters are folded into the totals, so the
exported counters never go backwards. During a swap a replica briefly holds two KV pools; the
new pool gets the old pool's byte budget (a pool sized from the memory left free would shrink
at every swap and stay small).

A decode replica also accepts a payload of a plan it does not run (prefill replicas roll a plan
out a moment before or after it, or one could not load it): `acquire_plan` builds an engine for
the payload's plan next to the current one. Engines other than the current one shut down once
they have been idle for `grace_s`.

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
    last_used: float = field(default_factory=time.monotonic)
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pool_bytes(self) -> int:
        s = self.engine.stats()
        return s.kv_capacity_tokens * s.bytes_per_token


class EngineHost:
    def __init__(self, build: Callable[[str | None, int | None], Any], *, grace_s: float = 30.0):
        # (pattern or None, KV pool bytes or None for the configured size) -> AsyncLLMEngine;
        # blocking, run in a thread.
        self._build = build
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
            slot = self._find_pattern(plan.pattern)
            if slot is not None:  # an engine for these layers is already here (decode)
                self._slots.remove(slot)
                slot.plan = plan
            else:
                slot = await self._new_slot(plan)
            if self._slots:
                self._retire(self._slots[-1])
            self._slots.append(slot)
            log.info("engine plan %s (v%d, %s) loaded", slot.plan_id, plan.version, plan.source)
            return True

    async def _new_slot(self, plan: PlanInfo) -> _Slot:
        budget = self._slots[-1].pool_bytes if self._slots else None
        engine = await asyncio.to_thread(self._build, plan.pattern, budget)
        return _Slot(engine, plan, engine.stats().plan_id)

    def _find_pattern(self, pattern: str | None) -> _Slot | None:
        for slot in self._slots:
            if pattern is not None and slot.plan.pattern == pattern:
                return slot
        return None

    def _retire(self, slot: _Slot) -> None:
        slot.last_used = time.monotonic()  # payloads of its plan may still be on their way
        task = asyncio.get_running_loop().create_task(self._reap(slot))
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)

    async def _reap(self, slot: _Slot) -> None:
        """Shut a non-current engine down once it has been idle for grace_s."""
        while True:
            while slot.inflight:
                slot.idle.clear()
                await slot.idle.wait()
            wait = slot.last_used + self.grace_s - time.monotonic()
            if wait <= 0 and not slot.inflight:
                break
            await asyncio.sleep(max(wait, 0.01))
        if self._slots and self._slots[-1] is slot:
            return  # made current again (load of the same layers)
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
        async with self._use(slot) as engine:
            yield engine

    @asynccontextmanager
    async def acquire_plan(self, plan_id: str, pattern: str) -> AsyncIterator[Any]:
        """Decode: the engine of a payload's plan, built next to the current one if this
        replica has none (it is shut down once idle for grace_s)."""
        slot = self._lookup(plan_id)
        if slot is None:
            async with self._lock:
                slot = self._lookup(plan_id)
                if slot is None:
                    current = self.current
                    slot = await self._new_slot(PlanInfo(-1, pattern, "payload"))
                    if slot.plan_id != plan_id:
                        await slot.engine.shutdown()
                        raise Unavailable(
                            f"payload plan {plan_id} does not match its own layout "
                            f"({slot.plan_id})",
                            code="plan_mismatch",
                        )
                    self._slots.insert(self._slots.index(current), slot)
                    self._retire(slot)
                    log.info("engine plan %s built for payloads of that plan", plan_id)
        async with self._use(slot) as engine:
            yield engine

    @asynccontextmanager
    async def _use(self, slot: _Slot) -> AsyncIterator[Any]:
        slot.inflight += 1
        try:
            yield slot.engine
        finally:
            slot.inflight -= 1
            slot.last_used = time.monotonic()
            if not slot.inflight:
                slot.idle.set()

    def _lookup(self, plan_id: str) -> _Slot | None:
        for slot in reversed(self._slots):
            if slot.plan_id == plan_id:
                return slot
        return None

    def _find(self, plan_id: str) -> _Slot:
        slot = self._lookup(plan_id)
        if slot is None:
            raise Unavailable(
                f"KV payload was made under plan {plan_id}, this decode replica runs "
                f"{self.plan_ids}; a plan rollout is in progress, retry",
                code="plan_mismatch",
            )
        return slot

    def has_plan(self, plan_id: str) -> bool:
        return self._lookup(plan_id) is not None

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
        out["num_exporting"] = sum(s.num_exporting for s in live)
        out["handoffs_waiting"] = sum(s.num_handoffs_waiting for s in live)
        out["handoffs_reserved"] = sum(s.num_handoffs_reserved for s in live)
        out["kv_blocks_handoff"] = sum(s.kv_blocks_handoff for s in live)
        out["kv_blocks_used"] = sum(s.kv_blocks_used for s in live)
        out["kv_blocks_total"] = sum(s.kv_blocks_total for s in live)
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


def layout_pattern(layout: dict) -> str:
    """The F/S pattern of a KV payload's layout (`KVLayout.to_dict()`): F where the layer holds
    indexer keys."""
    full = set(layout["index_layers"])
    return "".join("F" if i in full else "S" for i in range(layout["num_layers"]))
