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
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from serving.errors import ShuttingDown


class Drain:
    def __init__(self):
        self.started_at: float | None = None
        self.timeout_s = 0.0
        self._stop = asyncio.Event()  # set at the deadline: open streams end now
        self._timer: asyncio.TimerHandle | None = None

    @property
    def draining(self) -> bool:
        return self.started_at is not None

    def start(self, timeout_s: float) -> None:
        """Idempotent: a second call keeps the first deadline."""
        if self.draining:
            return
        self.started_at, self.timeout_s = time.monotonic(), timeout_s
        self._timer = asyncio.get_running_loop().call_later(timeout_s, self._stop.set)

    def refuse(self) -> None:
        """Raise the 503 for work that arrives while draining."""
        if self.draining:
            raise ShuttingDown(
                "the server is shutting down and takes no new requests; retry on another "
                "replica or after a restart",
                code="shutting_down",
            )

    async def wrap(self, deltas: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """`deltas`, ended with ShuttingDown once the drain deadline passes. Each item is
        raced against the deadline, so a stream waiting for its next token ends on time too."""
        stop = asyncio.ensure_future(self._stop.wait())
        nxt: asyncio.Future | None = None
        try:
            while True:
                nxt = asyncio.ensure_future(anext(deltas))
                await asyncio.wait((nxt, stop), return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    raise ShuttingDown(
                        f"the server shut down: the request did not finish within the "
                        f"{self.timeout_s:.0f}s graceful shutdown timeout",
                        code="shutting_down",
                    )
                try:
                    item = nxt.result()
                except StopAsyncIteration:
                    return
                nxt = None
                yield item
        finally:
            stop.cancel()
            if nxt is not None and not nxt.done():
                nxt.cancel()  # runs the stream's own cleanup (cancels the engine calls)
                with contextlib.suppress(BaseException):
                    await nxt
            await deltas.aclose()
