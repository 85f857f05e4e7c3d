"""Asyncio front of the engine: one background thread owns the LLMEngine and steps it; requests
and aborts reach it as commands, results come back to each caller's event loop through
`loop.call_soon_threadsafe`: one callback per event loop per step carrying that step's outputs of
all its requests (not one per token per request), and a stream that fell behind takes what has
queued up as one merged delta.

Only the engine thread touches engine state, so the engine needs no locks. Requests are validated
in the caller first, so bad input raises ValueError there and never reaches the thread. A caller
that stops iterating (client disconnect, task cancelled) aborts its request, which frees its pages
in whatever phase it is.

KV handoffs (disaggregated serving): `prefill(..., hold_s)` keeps the prompt's pages after the
payload is returned until `release_export` (the decode side has it) or `hold_s` passes. On the
decode side `reserve` streams a `HandoffReserved` first, once pages are held for the payload
(waiting for them if need be, bounded); only then does the caller pull the bytes and `fill` them
in, and the tokens follow. Pulled payloads are pinned off the engine thread (CUDA), so the
engine's host-to-device copy is asynchronous.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from serving.engine.llm_engine import LLMEngine
from serving.engine.outputs import (
    EngineStats,
    HandoffReserved,
    PrefillResult,
    StepOutput,
    TokenDelta,
)
from serving.engine.params import SamplingParams
from serving.engine.payload import KVHeader, KVPayload, check_header
from serving.engine.resume import Resume

log = logging.getLogger(__name__)


@dataclass
class _Request:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue | None = None  # streamed requests
    future: asyncio.Future | None = None  # prefill requests
    done: bool = False
    started: float = 0.0  # time.monotonic() of the call (handoff wait)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._requests: dict[str, _Request] = {}
        self._lock = threading.Lock()  # guards _requests and the command list
        self._commands: list[tuple] = []
        self._wake = threading.Event()
        self._stopping = False
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> AsyncLLMEngine:
        return cls(LLMEngine.from_pretrained(path, **kwargs))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # -- public API -------------------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int] | str,
        params: SamplingParams,
        resume: Resume | None = None,
    ) -> AsyncIterator[TokenDelta]:
        """Unified role (or decode, prefilling locally): stream a request's tokens (after
        `resume`'s, see resume.py)."""
        self._need_role("generate", ("unified", "decode"))
        ids = self.engine.tokenize(prompt_token_ids)
        self.engine.validate(ids, params, request_id)
        if resume is not None:
            resume.check(len(ids), params, self.engine.max_len)
        req = self._register(request_id, stream=True)
        self._submit(("add", request_id, ids, params, resume, None))
        async with aclosing(self._stream(request_id, req)) as deltas:
            async for delta in deltas:
                yield delta

    async def prefill(
        self,
        request_id: str,
        prompt_token_ids: list[int] | str,
        params: SamplingParams,
        resume: Resume | None = None,
        *,
        hold_s: float | None = None,
    ) -> PrefillResult:
        """Prefill role: compute the prompt (and `resume`'s tokens), sample the next token,
        return the KV payload. `hold_s`: keep the pages until `release_export` or that long."""
        self._need_role("prefill", ("prefill",))
        ids = self.engine.tokenize(prompt_token_ids)
        self.engine.validate(ids, params, request_id)
        if resume is not None:
            resume.check(len(ids), params, self.engine.max_len)
        req = self._register(request_id, stream=False)
        self._submit(("add", request_id, ids, params, resume, hold_s))
        try:
            return await req.future
        except BaseException:
            # Whatever phase (a result that came as the caller was cancelled included: its
            # pages would be held for hold_s for nobody): free it.
            self.abort(request_id)
            raise
        finally:
            self._unregister(request_id)

    def release_export(self, request_id: str) -> None:
        """Prefill role: the decode side has the payload; free its pages (idempotent)."""
        self._submit(("release", request_id))

    async def reserve(
        self,
        request_id: str,
        header: KVHeader,
        params: SamplingParams,
        resume: Resume | None = None,
        timeout_s: float | None = None,
    ) -> AsyncIterator[HandoffReserved | TokenDelta]:
        """Decode role: a KV handoff. Streams `HandoffReserved` once pages are held for the
        payload the header announces (HandoffRefused when too many handoffs wait already;
        HandoffTimeout when not filled within `timeout_s`), then, after `fill`, the tokens after
        the header's first token. Closing the stream frees whatever the handoff holds."""
        self._need_role("decode", ("decode", "unified"))
        check_header(header, self.engine.layout)
        self.engine.validate(header.prompt_token_ids, params, request_id)
        req = self._register(request_id, stream=True)
        self._submit(("reserve", request_id, header, params, resume, timeout_s))
        async with aclosing(self._stream(request_id, req)) as items:
            async for item in items:
                yield item

    async def fill(self, request_id: str, payload: KVPayload) -> None:
        """The payload of a reserved handoff (errors arrive on its stream)."""
        if self.engine.config.torch_device.type == "cuda" and not payload.data.is_pinned():
            pinned = await asyncio.to_thread(payload.data.pin_memory)
            payload = KVPayload(payload.header, pinned)
        self._submit(("fill", request_id, payload))

    async def decode(
        self,
        request_id: str,
        payload: KVPayload,
        params: SamplingParams,
        resume: Resume | None = None,
    ) -> AsyncIterator[TokenDelta]:
        """Decode role, payload in hand: reserve, fill, stream the tokens after its first."""
        stream = self.reserve(request_id, payload.header, params, resume)
        async with aclosing(stream) as items:
            async for item in items:
                if isinstance(item, HandoffReserved):
                    await self.fill(request_id, payload)
                else:
                    yield item

    async def cached_prefix_tokens(self, prompt_token_ids: list[int]) -> int:
        """Prompt tokens the prefix cache holds now (an estimate: it may change before the
        request is admitted). Hashing a long prompt takes milliseconds: off the event loop."""
        return await asyncio.to_thread(self.engine.cached_prefix_tokens, prompt_token_ids)

    def abort(self, request_id: str) -> None:
        """Idempotent; frees the request's pages whatever its phase (from any thread)."""
        self._submit(("abort", request_id))

    def stats(self) -> EngineStats:
        return self._stats  # a snapshot the engine thread refreshes after every step

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join)

    # -- caller side ------------------------------------------------------------------------
    def _need_role(self, what: str, roles: tuple[str, ...]) -> None:
        if self.engine.role not in roles:
            raise ValueError(
                f"role: {what} needs a {' or '.join(roles)} engine, this one is "
                f"{self.engine.role!r}"
            )
        if self._stopping:
            raise RuntimeError("engine is shut down")

    def _register(self, request_id: str, stream: bool) -> _Request:
        loop = asyncio.get_running_loop()
        req = _Request(
            loop, asyncio.Queue() if stream else None, None if stream else loop.create_future()
        )
        req.started = time.monotonic()
        with self._lock:
            if request_id in self._requests:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._requests[request_id] = req
        return req

    def _unregister(self, request_id: str) -> None:
        with self._lock:
            self._requests.pop(request_id, None)

    def _submit(self, cmd: tuple) -> None:
        with self._lock:
            self._commands.append(cmd)
        self._wake.set()

    async def _stream(self, request_id: str, req: _Request) -> AsyncIterator[TokenDelta]:
        try:
            while True:
                items = [await req.queue.get()]
                while not req.queue.empty():
                    items.append(req.queue.get_nowait())
                err = next((i for i in items if isinstance(i, BaseException)), None)
                for i in items:
                    if isinstance(i, HandoffReserved):  # always before the handoff's tokens
                        yield i
                deltas = [i for i in items if isinstance(i, TokenDelta)]
                if deltas:
                    merged = merge_deltas(deltas)
                    yield merged
                    if merged.finish_reason is not None:
                        return
                if err is not None:
                    raise err
        finally:
            if not req.done:
                self.abort(request_id)
            self._unregister(request_id)

    # -- engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            with self._lock:
                cmds, self._commands = self._commands, []
            for cmd in cmds:
                self._handle(cmd)
            try:  # handoffs move on between steps, also while nothing runs
                self._deliver_all(self.engine.poll_handoffs())
            except Exception:
                log.exception("KV handoff poll failed")
            if not self.engine.has_unfinished():
                self._stats = self.engine.stats()
                self._wake.wait(self._idle_timeout())
                continue
            try:
                outs = self.engine.step()
            except Exception as e:  # a failed forward fails its requests, not the engine
                log.exception("engine step failed")
                for rid in list(self.engine.seqs):
                    self.engine.abort(rid)
                    self._deliver_error(rid, e)
                outs = []
            self._deliver_all(outs)
            self._stats = self.engine.stats()
        # Shutdown: nothing stays allocated, queued or unanswered.
        self.engine.sampler.shutdown()
        with self._lock:
            cmds, self._commands = self._commands, []
        pending = [c[1] for c in cmds if c[0] in ("add", "reserve")]
        for rid in list(self.engine.kv.exports):
            self.engine.release_export(rid)
        for rid in [*self.engine.seqs, *pending]:
            self.engine.abort(rid)
            self._deliver(StepOutput(rid, [], "", "abort"))
        try:
            self.engine.shutdown()  # a tensor-parallel engine releases its other ranks
        except Exception:
            log.exception("engine shutdown failed (a tensor-parallel rank may be gone)")

    def _idle_timeout(self) -> float | None:
        """Seconds until the next handoff deadline (None: sleep until a command comes)."""
        deadline = self.engine.next_handoff_deadline()
        return None if deadline is None else max(deadline - time.monotonic(), 0.0) + 0.001

    def _handle(self, cmd: tuple) -> None:
        kind, rid = cmd[0], cmd[1]
        try:
            if kind == "add":
                self.engine.add_request(rid, cmd[2], cmd[3], cmd[4], export_hold_s=cmd[5])
            elif kind == "reserve":
                self.engine.reserve(cmd[2], cmd[3], rid, cmd[4], cmd[5])
            elif kind == "fill":
                self.engine.fill(rid, cmd[2])
            elif kind == "release":
                self.engine.release_export(rid)
            elif kind == "abort":
                if self.engine.abort(rid):
                    self._deliver(StepOutput(rid, [], "", "abort"))
        except Exception as e:  # validated by the caller already; report anything left
            self._deliver_error(rid, e)

    def _lookup(self, rid: str, finished: bool) -> _Request | None:
        with self._lock:
            req = self._requests.get(rid)
        if req is not None and finished:
            req.done = True
        return req

    def _deliver(self, out: StepOutput) -> None:
        self._deliver_all([out])

    def _deliver_all(self, outs: list[StepOutput]) -> None:
        """One callback per caller event loop for the whole step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outs:
            req = self._lookup(out.request_id, out.finished or out.prefill is not None)
            if req is None:
                continue  # the caller went away; its abort is queued
            if out.error is not None:
                item, setter = out.error, _fail
            elif out.reserved:
                item, setter = HandoffReserved(out.request_id, time.monotonic() - req.started), _put
            elif req.future is not None:
                if out.prefill is not None:
                    item, setter = out.prefill, _set_result
                else:  # aborted before its first token
                    item, setter = None, _cancel
            else:
                item = TokenDelta(
                    out.token_ids, out.text, out.finish_reason, out.logprobs, out.prompt_logprobs
                )
                setter = _put
            by_loop.setdefault(req.loop, []).append((setter, req, item, out.request_id))
        for loop, calls in by_loop.items():
            try:
                loop.call_soon_threadsafe(_run_all, calls)
            except RuntimeError:  # the caller's loop is closed
                for *_, rid in calls:
                    self.engine.abort(rid)

    def _deliver_error(self, rid: str, err: BaseException) -> None:
        req = self._lookup(rid, True)
        if req is None:
            return
        try:
            req.loop.call_soon_threadsafe(_fail, req, err)
        except RuntimeError:
            pass


def merge_deltas(deltas: list[TokenDelta]) -> TokenDelta:
    if len(deltas) == 1:
        return deltas[0]
    lps = [lp for d in deltas for lp in (d.logprobs or [])]
    return TokenDelta(
        [t for d in deltas for t in d.token_ids],
        "".join(d.text for d in deltas),
        deltas[-1].finish_reason,
        lps if any(d.logprobs is not None for d in deltas) else None,
        next((d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None), None),
    )


def _run_all(calls) -> None:
    for setter, req, item, _ in calls:
        setter(req, item)


def _put(req: _Request, item) -> None:
    req.queue.put_nowait(item)


def _set_result(req: _Request, item) -> None:
    if not req.future.done():
        req.future.set_result(item)


def _cancel(req: _Request, _item) -> None:
    req.future.cancel()


def _fail(req: _Request, err: BaseException) -> None:
    if req.queue is not None:
        req.queue.put_nowait(err)
    elif not req.future.done():
        req.future.set_exception(err)
