"""The disaggregated KV handoff between a prefill and a decode replica: one connector, both
sides, as Ray Serve LLM's and vLLM's KV connectors own it. The engine's half (pages, copies,
deadlines) is serving/engine/kv_connector.py; the bytes travel over a transport
(serving/kv_transfer.py); the orchestrator only passes the handle on and says when to let go.

Prefill side, `send`: the engine prefills the prompt and stages its payload, keeping the pages;
the payload goes into the transport, and the stream yields the `PrefillResponse` (the first token
and a `KVHandle` carrying the payload's header) and then stays open. While it is open the prefill
replica holds the pages and the payload; the caller closes it once the decode side has
acknowledged the payload (`KVReceived`), or when it gives up or goes away, and after `timeout_s`
it ends by itself. However it ends, pages and payload are freed.

Decode side, `receive`: admission first. The engine reserves pages for the payload from the
handle's header alone (waiting in its bounded queue while the pool is full); only then are the
bytes pulled, acknowledged (`KVReceived`, the stream's first item) and filled into the reserved
pages, and the tokens follow. A decode replica with no free pages therefore holds no payload
bytes for the handoffs it queues. Closing the stream at any point (the caller went away, the
orchestrator's timeout) frees the reservation; a handoff the engine refuses (queue full) or that
times out is a 503 (`KVTransferError`) naming why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from serving.errors import KVTransferError
from serving.kv_transfer import make_transport
from serving.protocol import DecodeRequest, GenerateRequest, KVReceived, PrefillResponse

log = logging.getLogger(__name__)


class KVConnector:
    def __init__(
        self,
        backend: str,
        tensor_transport: str,
        timeout_s: float,
        recorder: Any = None,  # serving.metrics.Recorder
    ):
        self.transport = make_transport(backend, tensor_transport)
        self.timeout_s = timeout_s
        self.recorder = recorder
        self.bytes_received = 0  # payload bytes pulled into this replica (decode side)

    # -- prefill side ----------------------------------------------------------------------------
    async def send(
        self,
        engine: Any,  # AsyncLLMEngine, prefill role
        req: GenerateRequest,
        on_prefilled: Callable[[float], None] | None = None,
    ) -> AsyncIterator[PrefillResponse]:
        """Prefill `req`, yield its response, hold its KV until the stream is closed or
        `timeout_s` passes. `on_prefilled(seconds)`: arrival to first token."""
        start, rid = time.monotonic(), req.request_id
        res = await engine.prefill(
            rid, list(req.prompt_token_ids), req.params, req.resume, hold_s=self.timeout_s
        )
        elapsed = time.monotonic() - start
        if on_prefilled is not None:
            on_prefilled(elapsed)
        kv = None
        try:
            if res.finish_reason is None:
                t0 = time.monotonic()
                kv = self.transport.put(res.payload)
                if self.recorder is not None:  # put side: time only
                    self.recorder.observe_kv_transfer(time.monotonic() - t0, 0)
            resp = PrefillResponse(
                rid,
                res.first_token,
                res.text,
                res.finish_reason,
                res.num_prompt_tokens,
                kv,
                res.payload.plan_id,
                res.logprobs,
                elapsed,
                res.prompt_logprobs,
            )
            del res  # the transport holds the payload now
            if kv is None:
                engine.release_export(rid)  # the first token ended it: nobody pulls
            yield resp
            if kv is not None:
                await asyncio.sleep(self.timeout_s)  # normally closed long before
        finally:
            engine.release_export(rid)
            if kv is not None:
                kv.release()

    # -- decode side -----------------------------------------------------------------------------
    async def receive(
        self,
        engine: Any,  # AsyncLLMEngine, decode role, of the payload's plan
        req: DecodeRequest,
    ) -> AsyncIterator[Any]:
        """KVReceived, then the request's TokenDeltas; nothing (a quiet end) when the payload
        was given up before it could be taken."""
        from serving.engine import HandoffRefused, HandoffReserved, HandoffTimeout

        start, rid, kv = time.monotonic(), req.request_id, req.kv
        stream = engine.reserve(rid, kv.header, req.params, req.resume, self.timeout_s)
        try:
            first = await anext(stream)  # pages held: only now may bytes move
            if not isinstance(first, HandoffReserved):  # its first token ended it: no rows
                yield KVReceived(0, 0.0, kv.plan_id, time.monotonic() - start)
                yield first
            else:
                t0 = time.monotonic()
                left = max(start + self.timeout_s - t0, 0.001)
                try:
                    payload = await self.transport.get(kv, left)
                except KVTransferError as e:
                    if e.code != "kv_released":
                        raise
                    # Given up before we could take it (client gone, transfer timed out): nobody
                    # waits for this stream, and an error here would only be a traceback.
                    log.info("request %s: %s", rid, e.message)
                    return
                kv.release()
                seconds = time.monotonic() - t0
                self.bytes_received += payload.nbytes
                if self.recorder is not None:
                    self.recorder.observe_kv_transfer(seconds, payload.nbytes)
                yield KVReceived(payload.nbytes, seconds, payload.plan_id, first.wait_s)
                await engine.fill(rid, payload)
                del payload  # the engine holds it until imported
            async for delta in stream:
                yield delta
        except HandoffRefused as e:
            raise KVTransferError(str(e), code="kv_handoff_refused") from e
        except HandoffTimeout as e:
            raise KVTransferError(str(e), code="kv_transfer_timeout") from e
        finally:
            await stream.aclose()
