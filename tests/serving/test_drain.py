"""Drain: refuses new work at once, lets streams finish until the deadline, then ends the
ones still open with ShuttingDown (also one waiting for its next item), runs their cleanup, and
never keeps a dropped stream alive."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref

import pytest

from serving.drain import Drain
from serving.errors import ShuttingDown


class Source:
    """An engine stream: `n` items `gap_s` apart; records whether its cleanup ran. `rewrap`: a
    cancellation comes out as a fresh CancelledError, as through Serve's response generator."""

    def __init__(self, n: int, gap_s: float, rewrap: bool = False):
        self.n, self.gap_s, self.closed, self.rewrap = n, gap_s, False, rewrap

    async def __call__(self):
        try:
            for i in range(self.n):
                try:
                    await asyncio.sleep(self.gap_s)
                except asyncio.CancelledError:
                    if self.rewrap:
                        raise asyncio.CancelledError() from None
                    raise
                yield i
        finally:
            self.closed = True


async def consume(stream) -> tuple[list, BaseException | None]:
    items = []
    try:
        async for x in stream:
            items.append(x)
    except Exception as e:
        return items, e
    return items, None


def test_refuse_only_while_draining():
    async def go():
        d = Drain()
        d.refuse()  # not draining: nothing happens
        d.start(5)
        with pytest.raises(ShuttingDown) as e:
            d.refuse()
        assert e.value.status == 503 and e.value.code == "shutting_down"
        assert e.value.retry_after_s > 0  # the ingress sends it as Retry-After

    asyncio.run(go())


def test_streams_finish_until_the_deadline_then_end_with_an_error():
    async def go():
        d = Drain()
        short, long_, stuck = Source(3, 0.01), Source(1000, 0.01, True), Source(2, 30.0)
        tasks = [asyncio.ensure_future(consume(d.wrap(s()))) for s in (short, long_, stuck)]
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        d.start(0.3)
        (a, ea), (b, eb), (c, ec) = await asyncio.gather(*tasks)
        took = time.monotonic() - t0
        assert a == [0, 1, 2] and ea is None  # finished within the grace
        assert isinstance(eb, ShuttingDown) and 10 < len(b) < 1000
        assert isinstance(ec, ShuttingDown) and c == []  # ended while waiting for an item
        assert "graceful shutdown timeout" in str(eb)
        assert 0.25 < took < 2.0
        assert short.closed and long_.closed and stuck.closed  # every stream's cleanup ran

    asyncio.run(go())


def test_a_client_cancel_stays_a_cancel():
    async def go():
        d = Drain()
        src = Source(1000, 0.01)
        task = asyncio.ensure_future(consume(d.wrap(src())))
        await asyncio.sleep(0.05)
        d.start(10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert src.closed

    asyncio.run(go())


def test_a_dropped_stream_is_not_kept_alive():
    """The ingress counts requests in flight with a weak set: a response dropped without
    being closed must leave it (and not keep its engine stream running)."""

    async def go():
        d = Drain()
        live = weakref.WeakSet()
        w = d.wrap(Source(1000, 0.01)())
        live.add(w)
        await anext(w)
        task = asyncio.ensure_future(anext(w))
        await asyncio.sleep(0.02)
        task.cancel()
        del w, task
        await asyncio.sleep(0.02)
        gc.collect()
        assert len(live) == 0

    asyncio.run(go())


def test_a_cancelled_stream_leaves_the_live_set_without_the_collector():
    """A stream consumed in a task of its own (the ingress pumps each choice in one) that is
    cancelled leaves the weak set at once: the task keeps its CancelledError, whose traceback
    holds the wrapper's frame, and that frame must not hold the task (a cycle only the
    garbage collector would free, leaving the request counted as in flight meanwhile)."""

    async def go():
        d = Drain()
        live = weakref.WeakSet()
        src = Source(1000, 0.01)
        w = d.wrap(src())
        live.add(w)

        async def pump(stream):
            async for _ in stream:
                pass

        task = asyncio.ensure_future(pump(w))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.wait([task])
        del w, task
        assert src.closed and len(live) == 0

    gc.disable()
    try:
        asyncio.run(go())
    finally:
        gc.enable()
