"""The engine's half of the disaggregated KV handoff, as vLLM's KV connectors split it: the
scheduler-facing state of every handoff and the copies (kv_copy.py). The transport and the
protocol between replicas are serving/kv_connector.py's; nothing here knows how bytes travel.

Prefill side: a request whose prompt is done leaves the running batch with its pages (`export`):
its rows are staged into one host tensor (a side-stream copy on CUDA) and, once staged, its
`PrefillResult` goes out. Its pages stay until the decode side has the payload (`release`) or
`hold_s` passes; with no hold (offline `prefill()`) they go once the payload is staged.

Decode side: `reserve` queues a handoff from its header alone (tokens, layout; no rows) and the
scheduler gives it pages when the pool can take it; a `reserved` output tells the caller, who only
then pulls the bytes and `fill`s them in. The rows are imported into the reserved pages (side
stream on CUDA) and the sequence joins the running batch when the copy is done, never before. A
handoff not filled within its timeout fails with `HandoffTimeout` and its pages go back; at most
`max_queued` handoffs wait for pages (more are refused with `HandoffRefused`).

`poll` advances all of this between steps; the engine thread is the only caller.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from model.kv_cache import KVCache
from serving.engine.kv_copy import Copy, KVCopier
from serving.engine.outputs import StepOutput
from serving.engine.payload import KVHeader, KVPayload, check_payload, make_header
from serving.engine.scheduler import Scheduler
from serving.engine.sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)


class HandoffTimeout(TimeoutError):
    """A KV handoff did not complete in time: nothing arrived for a reservation."""


class HandoffRefused(RuntimeError):
    """The decode engine has as many handoffs waiting for pages as it queues."""


@dataclass
class _Export:
    seq: Sequence
    copy: Copy
    out: StepOutput  # the request's PrefillResult, delivered once the rows are staged
    deadline: float | None = None  # set on delivery when held


@dataclass
class _Import:
    seq: Sequence
    header: KVHeader
    deadline: float | None
    timeout_s: float | None
    queued_at: float
    payload: KVPayload | None = None
    copy: Copy | None = None


class EngineKVConnector:
    def __init__(
        self,
        cache: KVCache,
        scheduler: Scheduler,
        max_queued: int,
        clock: Callable[[], float] = time.monotonic,
        mirror: Callable[[list[int], KVPayload, int], None] | None = None,
    ):
        self.copier = KVCopier(cache)
        # tensor parallelism: the other ranks' caches take the same rows (ModelRunner)
        self.mirror = mirror
        self.layout = cache.layout
        self.sched = scheduler
        self.max_queued = max_queued
        self.clock = clock
        self.exports: dict[str, _Export] = {}
        self.imports: dict[str, _Import] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.exports or request_id in self.imports

    # -- prefill side --------------------------------------------------------------------------
    def export(self, seq: Sequence, out: StepOutput) -> None:
        """Stage a finished prompt's rows (every cached token; the last token is the first
        sampled one). `out.prefill` gets the payload; it is delivered by `poll` once staged."""
        seq.status = SequenceStatus.EXPORTING
        header = make_header(self.layout, seq.token_ids[:-1], seq.token_ids[-1], seq.generator)
        payload, copy = self.copier.export(seq.pages, header)
        out.prefill = dataclasses.replace(out.prefill, payload=payload)
        self.exports[seq.request_id] = _Export(seq, copy, out)

    def release(self, request_id: str) -> bool:
        """The decode side has the payload (or the request is gone): free the pages."""
        exp = self.exports.pop(request_id, None)
        if exp is None:
            return False
        exp.copy.wait()  # never free pages a copy still reads
        self.sched.bm.free(exp.seq)
        exp.seq.status = SequenceStatus.FINISHED
        return True

    # -- decode side ---------------------------------------------------------------------------
    def reserve(
        self,
        seq: Sequence,
        header: KVHeader,
        timeout_s: float | None,
        payload: KVPayload | None = None,
    ) -> None:
        """Queue a checked handoff for pages; with `payload` it is filled as soon as reserved."""
        if len(self.sched.reserving) >= self.max_queued:
            raise HandoffRefused(
                f"{len(self.sched.reserving)} KV handoffs already wait for pages on this decode "
                f"engine (max_queued_handoffs {self.max_queued}); retry later"
            )
        if payload is not None:
            check_payload(payload, header)
        now = self.clock()
        deadline = None if timeout_s is None else now + timeout_s
        self.imports[seq.request_id] = _Import(seq, header, deadline, timeout_s, now, payload)
        self.sched.reserve(seq)

    def fill(self, request_id: str, payload: KVPayload) -> None:
        """The rows of a reserved handoff: import them into its pages."""
        imp = self.imports.get(request_id)
        if imp is None or imp.seq.status is not SequenceStatus.RESERVED:
            raise ValueError(f"request {request_id!r} has no KV page reservation to fill")
        if imp.payload is not None:
            raise ValueError(f"request {request_id!r} was filled already")
        check_payload(payload, imp.header)
        imp.payload = payload
        self._start_import(imp)

    def _start_import(self, imp: _Import) -> None:
        if self.mirror is not None:
            self.mirror(imp.seq.pages, imp.payload, imp.seq.num_cached)
        imp.copy = self.copier.import_(imp.seq.pages, imp.payload, start=imp.seq.num_cached)

    def discard(self, request_id: str) -> None:
        """The request is leaving (aborted, failed): forget its handoff; the caller frees the
        pages, after any copy into them has landed."""
        imp = self.imports.pop(request_id, None)
        if imp is not None and imp.copy is not None:
            imp.copy.wait()

    # -- between steps -------------------------------------------------------------------------
    def poll(self, fail: Callable[[Sequence, BaseException], StepOutput]) -> list[StepOutput]:
        """Deliver staged exports, free expired holds, reserve pages for queued handoffs, start
        the runs of imported ones, fail those past their deadline. -> outputs for callers."""
        now, outs = self.clock(), []
        for rid, exp in list(self.exports.items()):
            if exp.deadline is None and exp.copy.done():
                outs.append(exp.out)
                hold = exp.seq.export_hold_s
                if hold is None:
                    self.release(rid)
                else:
                    exp.deadline = now + hold
            elif exp.deadline is not None and now >= exp.deadline:
                log.warning("request %s: KV payload not acknowledged in time, pages freed", rid)
                self.release(rid)
        for seq in self.sched.admit_reservations():
            imp = self.imports[seq.request_id]
            outs.append(StepOutput(seq.request_id, [], "", None, reserved=True))
            if imp.payload is not None:
                self._start_import(imp)
        for rid, imp in list(self.imports.items()):
            if imp.copy is not None and imp.copy.done():
                del self.imports[rid]
                imp.seq.num_cached = imp.header.num_tokens
                self.sched.activate(imp.seq)  # the payload's host copy goes with `imp`
            elif imp.copy is None and imp.deadline is not None and now >= imp.deadline:
                waiting = imp.seq.status is SequenceStatus.RESERVING
                what = "no KV pages came free" if waiting else "the payload did not arrive"
                err = HandoffTimeout(
                    f"KV handoff not completed within {imp.timeout_s:.1f}s: {what}"
                )
                outs.append(fail(imp.seq, err))  # fail() discards the import and frees pages
        return outs

    # -- waiting and statistics ----------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Copies in flight, or handoffs with their rows in hand waiting only for pages
        (`import_payload`): the engine keeps stepping until they are done."""
        return any(e.deadline is None for e in self.exports.values()) or any(
            i.copy is not None or i.payload is not None for i in self.imports.values()
        )

    def wait_copies(self, timeout_s: float) -> None:
        """Block briefly on the oldest copy in flight (nothing else to do)."""
        for c in [e.copy for e in self.exports.values() if e.deadline is None] + [
            i.copy for i in self.imports.values() if i.copy is not None
        ]:
            if not c.done():
                t0 = self.clock()
                while not c.done() and self.clock() - t0 < timeout_s:
                    time.sleep(0.0005)
                return

    def next_deadline(self) -> float | None:
        ds = [e.deadline for e in self.exports.values() if e.deadline is not None]
        ds += [i.deadline for i in self.imports.values() if i.deadline is not None]
        return min(ds) if ds else None

    def pages_held(self) -> int:
        """Pages held by handoffs: exports awaiting acknowledgement, reservations not yet run."""
        return sum(len(e.seq.pages) for e in self.exports.values()) + sum(
            len(s.pages) for s in self.sched.reserved
        )
