"""Graceful shutdown of an ingress replica: stop admitting, let streams finish, end the rest.

`indexcache serve` on SIGTERM (serving/cli/serve.py) tells every ingress replica to drain:
- from then on new requests (and /health) get 503 `shutting_down` with a Retry-After header;
- requests in flight go on until the graceful timeout;
- then every stream still open ends with an error event (`data: {"error": ...}` and
  `data: [DONE]`), not a cut connection, and its engine requests are cancelled.

Pure asyncio (no Ray): the ingress holds one `Drain` and wraps each request's deltas in it.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

from serving.errors import ShuttingDown


class Drain:
    def __init__(self):
        self.started_at: float | None = None
        self.timeout_s = 0.0
        self._stopped = False  # the deadline passed: open streams end now
        self._timer: asyncio.TimerHandle | None = None
        # Tasks waiting for a stream's next item, and those the deadline cancelled. Weak: a
        # stream whose consumer is dropped without being closed must not be kept alive from here
        # (nor keep its engine busy).
        self._waiting: weakref.WeakSet[asyncio.Task] = weakref.WeakSet()
        self._cancelled: weakref.WeakSet[asyncio.Task] = weakref.WeakSet()

    @property
    def draining(self) -> bool:
        return self.started_at is not None

    def start(self, timeout_s: float) -> None:
        """Idempotent: a second call keeps the first deadline."""
        if self.draining:
            return
        self.started_at, self.timeout_s = time.monotonic(), timeout_s
        self._timer = asyncio.get_running_loop().call_later(timeout_s, self._deadline)

    def _deadline(self) -> None:
        self._stopped = True
        for task in list(self._waiting):
            self._cancelled.add(task)
            task.cancel()

    def refuse(self) -> None:
        """Raise the 503 for work that arrives while draining."""
        if self.draining:
            raise ShuttingDown(
                "the server is shutting down and takes no new requests; retry on another "
                "replica or after a restart",
                code="shutting_down",
            )

    def _ended(self) -> ShuttingDown:
        return ShuttingDown(
            f"the server shut down: the request did not finish within the "
            f"{self.timeout_s:.0f}s graceful shutdown timeout",
            code="shutting_down",
        )

    async def wrap(self, deltas: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """`deltas`, ended with ShuttingDown once the drain deadline passes. A stream waiting
        for its next item then is interrupted too: the deadline cancels the waiting task (which
        runs the stream's own cleanup: the engine calls are cancelled), and the cancellation is
        turned into ShuttingDown here. Costs nothing per item but a set insert."""
        try:
            while True:
                if self._stopped:
                    raise self._ended()
                task = asyncio.current_task()
                self._waiting.add(task)
                try:
                    item = await anext(deltas)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    # Ours, whatever the layers below made of it (Serve re-raises a fresh
                    # CancelledError, so its message cannot tell).
                    if task not in self._cancelled:
                        raise
                    self._cancelled.discard(task)
                    task.uncancel()
                    raise self._ended() from None
                finally:
                    self._waiting.discard(task)
                    # A cancellation's traceback holds this frame and the task keeps that
                    # exception: without this the stream would live on in a reference cycle
                    # (and count as in flight) until the garbage collector runs.
                    del task
                yield item
        finally:
            await deltas.aclose()
