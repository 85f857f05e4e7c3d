"""How a KV payload's bytes travel from a prefill replica to a decode replica: the transports
under the KV connector (serving/kv_connector.py, which owns the handoff's protocol).

Two transports, one interface:
- `ObjectStoreTransport` (default): `ray.put(payload)` into the Ray object store; the decode
  replica awaits the ref. Works everywhere Ray runs; the payload is copied through shared memory
  (and the network between nodes).
- `DirectTransport`: Ray Direct Transport over NIXL, `ray.put(payload, _tensor_transport="nixl")`.
  The payload's one flat tensor stays in the prefill replica (NIXL-registered memory) and the
  decode replica pulls it directly; NIXL runs over UCX on CPU too, which is how CPU tests exercise
  this path. Ray 2.60 allows only one-sided transports for ray.put (NIXL and CUDA IPC); CUDA IPC
  is not offered: it shares CUDA tensors only, and a payload is host memory.

A `KVHandle` carries the payload's header (tokens, layout: what the decode side needs to reserve
pages) next to the reference to its bytes, so nothing large moves before the decode side has
room. The object lives while a reference to it does: the handle keeps the ref in a one-item list
(so Ray does not resolve it when the handle travels through a Serve handle), `release()` drops
the holder's ref. The orchestrator and the prefill replica release on every path (decode took
it, timeout, failure, disconnect). A decode replica that finds the payload already freed
(`kv_released`) knows the request was given up before it could take it (the client went away,
the transfer timed out): nobody waits for its answer.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import ray

from serving.errors import KVTransferError

if TYPE_CHECKING:
    from serving.engine import KVHeader, KVPayload

# Ray's errors for "the object was freed": its holders let go of it before it was fetched.
_FREED = ("ReferenceCountingAssertionError", "ObjectFreedError")


def _failed(e: Exception, what: str) -> KVTransferError:
    if type(e).__name__ in _FREED:
        return KVTransferError(
            f"KV payload was released before it was fetched ({type(e).__name__})",
            code="kv_released",
        )
    return KVTransferError(f"{what} failed: {type(e).__name__}: {e}", code="kv_transfer_failed")


@dataclass(frozen=True)
class KVHandle:
    transport: str  # "object_store" | "nixl"
    header: KVHeader
    created_at: float
    box: list = field(default_factory=list, compare=False)  # [ObjectRef] until released

    @property
    def nbytes(self) -> int:
        return self.header.nbytes

    @property
    def plan_id(self) -> str:
        return self.header.plan_id

    @property
    def released(self) -> bool:
        return not self.box

    def release(self) -> None:
        """Drop this holder's reference; the object is freed when no holder is left."""
        self.box.clear()


class KVTransport(Protocol):
    name: str

    def put(self, payload: KVPayload) -> KVHandle: ...

    async def get(self, handle: KVHandle, timeout_s: float) -> KVPayload: ...


class ObjectStoreTransport:
    name = "object_store"

    def put(self, payload: KVPayload) -> KVHandle:
        return KVHandle(self.name, payload.header, time.time(), [ray.put(payload)])

    async def get(self, handle: KVHandle, timeout_s: float) -> KVPayload:
        if handle.released:
            raise KVTransferError("KV payload was already released")
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result when a
            # cancellation (the client went away) arrives as the payload does, and the decode
            # then runs to max_tokens for nobody.
            async with asyncio.timeout(timeout_s):
                return await handle.box[0]
        except TimeoutError as e:
            raise KVTransferError(
                f"KV payload not received within {timeout_s:.1f}s", code="kv_transfer_timeout"
            ) from e
        except ray.exceptions.RayError as e:
            raise _failed(e, "KV transfer") from e


class DirectTransport:
    def __init__(self, tensor_transport: str):
        self.name = tensor_transport

    def put(self, payload: KVPayload) -> KVHandle:
        ref = ray.put(payload, _tensor_transport=self.name)
        return KVHandle(self.name, payload.header, time.time(), [ref])

    async def get(self, handle: KVHandle, timeout_s: float) -> KVPayload:
        if handle.released:
            raise KVTransferError("KV payload was already released")
        ref = handle.box[0]
        try:
            # RDT objects must be fetched with the blocking ray.get (awaiting the ref does not
            # resolve the out-of-band tensors in Ray 2.60), so off the event loop.
            return await asyncio.to_thread(ray.get, ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise KVTransferError(
                f"KV payload not received within {timeout_s:.1f}s", code="kv_transfer_timeout"
            ) from e
        except ray.exceptions.RayError as e:
            raise _failed(e, f"KV transfer ({self.name})") from e


def make_transport(backend: str, tensor_transport: str = "nixl") -> KVTransport:
    """`backend` as in KVTransferConfig: "object_store", or "direct" over `tensor_transport`."""
    if backend == "object_store":
        return ObjectStoreTransport()
    return DirectTransport(tensor_transport)
