"""Moving a prefilled prompt's KV payload from a prefill replica to a decode replica.

One interface, two transports:
- `ObjectStoreTransport` (default): `ray.put(payload)` into the Ray object store; the decode
  replica awaits the ref. Works everywhere Ray runs; the payload is copied through shared memory
  (and the network between nodes).
- `DirectTransport`: Ray Direct Transport, `ray.put(payload, _tensor_transport=...)`. Tensors stay
  in the prefill replica (NIXL-registered CPU or GPU memory, or a CUDA IPC handle) and the
  decode replica pulls them directly. Ray 2.60 allows only one-sided transports for ray.put:
  `nixl` (UCX; also on CPU, which is how CPU tests exercise this path) and `cuda_ipc`.

The object lives while a reference to it does: the handle keeps the ref in a one-item list (so Ray
does not resolve it when the handle travels through a Serve handle), `release()` drops the
holder's ref. The orchestrator releases on every path (decode took it, timeout, failure,
disconnect), so a payload nobody consumes is freed once the timeout passes. A decode replica that
finds the payload already freed (`kv_released`) knows the request was given up before it could
take it (the client went away, the transfer timed out): nobody waits for its answer.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import ray

from serving.errors import KVTransferError

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
    transport: str  # "object_store" | "nixl" | "cuda_ipc"
    nbytes: int
    plan_id: str
    created_at: float
    box: list = field(default_factory=list, compare=False)  # [ObjectRef] until released

    @property
    def released(self) -> bool:
        return not self.box

    def release(self) -> None:
        """Drop this holder's reference; the object is freed when no holder is left."""
        self.box.clear()


class KVTransport(Protocol):
    name: str

    def put(self, payload: Any) -> KVHandle: ...

    async def get(self, handle: KVHandle, timeout_s: float) -> Any: ...


class ObjectStoreTransport:
    name = "object_store"

    def put(self, payload: Any) -> KVHandle:
        return KVHandle(self.name, payload.nbytes, payload.plan_id, time.time(), [ray.put(payload)])

    async def get(self, handle: KVHandle, timeout_s: float) -> Any:
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

    def put(self, payload: Any) -> KVHandle:
        ref = ray.put(payload, _tensor_transport=self.name)
        return KVHandle(self.name, payload.nbytes, payload.plan_id, time.time(), [ref])

    async def get(self, handle: KVHandle, timeout_s: float) -> Any:
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
