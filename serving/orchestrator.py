"""The request flow between the ingress and the engine deployments, as pure async code.

Disaggregated: prefill (first token + KV handle; the prefill stream then stays open, holding
the payload's pages) -> the first token is streamed at once (TTFT ends here) -> decode reserves
pages for the payload and pulls it (acknowledged with `KVReceived`, the whole handoff under the
transfer timeout) -> the prefill stream is closed, which frees the prefill side -> decode streams
the rest (serving/kv_connector.py has both sides). Unified: one engine streams everything.
Selective (disaggregated with a local-prefill threshold): the decode replica the router picks
first looks the prompt up in its prefix cache and, when the uncached part is short, prefills it
itself and streams everything; otherwise it answers so at once and the request takes the
disaggregated path.

Whatever ends the request early (client disconnect, task cancelled, an error at any step), the
`finally` blocks close the downstream streams (the prefill one included), which cancels the
remote calls and makes the replicas abort the request and free its KV pages (a handoff's on
both sides), and release the KV handle. Clients are
typing.Protocols; the Ray-backed ones live in the ingress, fakes in the tests.

With a `FailoverPolicy`, a flow whose replica dies is run again for what the client has not
received yet (serving/failover.py: a retry before the first token, a migration after it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from serving.errors import InternalError, KVTransferError
from serving.failover import FailoverPolicy, with_failover
from serving.protocol import (
    DecodeRequest,
    GenerateRequest,
    KVReceived,
    PrefillResponse,
    PrefillRoute,
)


class EngineClient(Protocol):
    def generate(self, req: GenerateRequest) -> AsyncIterator[Any]: ...


class PrefillClient(Protocol):
    def prefill(self, req: GenerateRequest) -> AsyncIterator[PrefillResponse]: ...


class DecodeClient(Protocol):
    def decode(self, req: DecodeRequest) -> AsyncIterator[Any]: ...


class LocalDecodeClient(DecodeClient, Protocol):
    def generate_or_defer(self, req: GenerateRequest) -> AsyncIterator[Any]: ...


async def _aclose(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def run_unified(
    req: GenerateRequest,
    engine: EngineClient,
    *,
    failover: FailoverPolicy | None = None,
    on_restart: Callable[[bool], None] | None = None,
) -> AsyncIterator[Any]:
    if failover is None:
        return _unified_once(req, engine)
    return with_failover(req, lambda r: _unified_once(r, engine), failover, on_restart)


async def _unified_once(req: GenerateRequest, engine: EngineClient) -> AsyncIterator[Any]:
    stream = engine.generate(req)
    try:
        async for delta in stream:
            yield delta
    finally:
        await _aclose(stream)


def run_disaggregated(
    req: GenerateRequest,
    prefill: PrefillClient,
    decode: DecodeClient,
    *,
    kv_timeout_s: float,
    on_kv_received: Callable[[KVReceived], None] | None = None,
    make_delta: Callable[[PrefillResponse], Any],
    failover: FailoverPolicy | None = None,
    on_restart: Callable[[bool], None] | None = None,
) -> AsyncIterator[Any]:
    """Yields the first token's delta (from `make_delta(prefill_response)`), then decode's."""

    def once(r: GenerateRequest) -> AsyncIterator[Any]:
        return _disaggregated_once(r, prefill, decode, kv_timeout_s, on_kv_received, make_delta)

    if failover is None:
        return once(req)
    return with_failover(req, once, failover, on_restart)


async def _disaggregated_once(
    req: GenerateRequest,
    prefill: PrefillClient,
    decode: DecodeClient,
    kv_timeout_s: float,
    on_kv_received: Callable[[KVReceived], None] | None,
    make_delta: Callable[[PrefillResponse], Any],
) -> AsyncIterator[Any]:
    held = prefill.prefill(req)  # open while the prefill replica holds the payload
    kv = stream = None
    try:
        try:
            resp = await anext(held)
        except StopAsyncIteration as e:
            raise InternalError("the prefill replica ended the stream without a response") from e
        kv = resp.kv
        yield make_delta(resp)
        if resp.finish_reason is not None:
            return
        if kv is None:
            raise InternalError("prefill returned neither a finish reason nor a KV payload")
        stream = decode.decode(
            DecodeRequest(req.request_id, kv, req.params, req.prompt_token_ids, req.resume)
        )
        try:
            async with asyncio.timeout(kv_timeout_s):  # not wait_for: see kv_transfer.py
                ack = await anext(stream)
        except TimeoutError as e:
            raise KVTransferError(
                f"the KV handoff did not complete within {kv_timeout_s:.1f}s: no decode replica "
                "had KV pages free for it in time, or the transfer stalled; retry later",
                code="kv_transfer_timeout",
            ) from e
        except StopAsyncIteration as e:
            raise KVTransferError(
                "the decode replica ended the stream before taking the KV payload",
                code="kv_transfer_failed",
            ) from e
        if not isinstance(ack, KVReceived):
            raise InternalError(
                f"decode stream must start with KVReceived, got {type(ack).__name__}"
            )
        kv.release()  # decode holds the payload now: the prefill side may let go
        await _aclose(held)
        if on_kv_received is not None:
            on_kv_received(ack)
        async for delta in stream:
            yield delta
    finally:
        if kv is not None:
            kv.release()
        await _aclose(held)
        if stream is not None:
            await _aclose(stream)


def run_selective(
    req: GenerateRequest,
    prefill: PrefillClient,
    decode: LocalDecodeClient,
    *,
    kv_timeout_s: float,
    on_kv_received: Callable[[KVReceived], None] | None = None,
    make_delta: Callable[[PrefillResponse], Any],
    failover: FailoverPolicy | None = None,
    on_restart: Callable[[bool], None] | None = None,
) -> AsyncIterator[Any]:
    """Ask a decode replica to prefill locally; fall back to the disaggregated flow when it
    defers (keyword arguments are run_disaggregated's). With failover, a new attempt asks a
    decode replica again (the resumed tokens count as uncached prompt)."""

    def once(r: GenerateRequest) -> AsyncIterator[Any]:
        return _selective_once(r, prefill, decode, kv_timeout_s, on_kv_received, make_delta)

    if failover is None:
        return once(req)
    return with_failover(req, once, failover, on_restart)


async def _selective_once(
    req: GenerateRequest,
    prefill: PrefillClient,
    decode: LocalDecodeClient,
    kv_timeout_s: float,
    on_kv_received: Callable[[KVReceived], None] | None,
    make_delta: Callable[[PrefillResponse], Any],
) -> AsyncIterator[Any]:
    stream = decode.generate_or_defer(req)
    try:
        try:
            route = await anext(stream)
        except StopAsyncIteration as e:
            raise InternalError("the decode replica ended the stream without a route") from e
        if not isinstance(route, PrefillRoute):
            raise InternalError(
                f"decode stream must start with PrefillRoute, got {type(route).__name__}"
            )
        if route.local:
            async for delta in stream:
                yield delta
            return
    finally:
        await _aclose(stream)
    flow = _disaggregated_once(req, prefill, decode, kv_timeout_s, on_kv_received, make_delta)
    try:
        async for delta in flow:
            yield delta
    finally:
        await flow.aclose()
