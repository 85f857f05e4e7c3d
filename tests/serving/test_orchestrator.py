"""The pure request flow with fake engine clients: order, early finish, errors, timeouts and
cancellation at every step release the KV handle and close the downstream streams, the prefill
stream (which holds the payload's pages on the prefill replica) included."""

from __future__ import annotations

import asyncio

import pytest

from serving.engine import SamplingParams, TokenDelta
from serving.errors import InternalError, KVTransferError, Unavailable
from serving.orchestrator import run_disaggregated, run_selective, run_unified
from serving.protocol import GenerateRequest, KVReceived, PrefillResponse, PrefillRoute

REQ = GenerateRequest("r1", (1, 2, 3), SamplingParams(max_tokens=4, temperature=0))


class FakeKV:
    def __init__(self):
        self.released = False

    def release(self):
        self.released = True


class FakePrefill:
    """Yields the response, then holds (as a prefill replica holds the pages) until closed."""

    def __init__(self, finish=None, error=None, delay=0.0):
        self.kv, self.finish, self.error, self.delay = FakeKV(), finish, error, delay
        self.cancelled = False
        self.held = None  # True while the response is out and the stream open; then False

    def prefill(self, req):
        return self._gen(req)

    async def _gen(self, req):
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.error:
            raise self.error
        self.held = True
        try:
            yield PrefillResponse(
                req.request_id, 7, "a", self.finish, 3, None if self.finish else self.kv, "plan"
            )
            await asyncio.sleep(3600)
        finally:
            self.held = False


class FakeDecode:
    def __init__(self, items, ack_delay=0.0, per_item_delay=0.0, prefill=None):
        self.items, self.ack_delay, self.per_item_delay = items, ack_delay, per_item_delay
        self.closed = False
        self.requests = []
        self.prefill, self.held_after_ack = prefill, None  # prefill.held once decode resumes

    def decode(self, req):
        self.requests.append(req)
        return self._gen()

    async def _gen(self):
        try:
            await asyncio.sleep(self.ack_delay)
            yield KVReceived(100, 0.01, "plan")
            self.held_after_ack = self.prefill.held if self.prefill else None
            for item in self.items:
                await asyncio.sleep(self.per_item_delay)
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.closed = True


def first(resp):
    return TokenDelta([resp.first_token], resp.text, resp.finish_reason)


def run(prefill, decode, timeout=1.0, acks=None):
    return run_disaggregated(
        REQ,
        prefill,
        decode,
        kv_timeout_s=timeout,
        make_delta=first,
        on_kv_received=(acks.append if acks is not None else None),
    )


async def collect(gen):
    return [d async for d in gen]


def test_disaggregated_happy_path():
    prefill = FakePrefill()
    decode = FakeDecode([TokenDelta([8], "b"), TokenDelta([9], "c", "length")], prefill=prefill)
    acks = []
    out = asyncio.run(collect(run(prefill, decode, acks=acks)))
    assert [d.token_ids for d in out] == [[7], [8], [9]]
    assert out[-1].finish_reason == "length" and len(acks) == 1
    assert decode.requests[0].kv is prefill.kv and prefill.kv.released and decode.closed
    # The ack closes the prefill stream before decode's first token: its pages go at once.
    assert decode.held_after_ack is False and prefill.held is False


def test_first_token_finishes_without_decode():
    decode = FakeDecode([])
    prefill = FakePrefill(finish="stop")
    out = asyncio.run(collect(run(prefill, decode)))
    assert [(d.token_ids, d.finish_reason) for d in out] == [([7], "stop")]
    assert decode.requests == [] and prefill.held is False


def test_prefill_error_propagates_before_any_token():
    with pytest.raises(Unavailable):
        asyncio.run(collect(run(FakePrefill(error=Unavailable("down")), FakeDecode([]))))


def test_decode_never_takes_the_payload_times_out_and_releases():
    prefill, decode = FakePrefill(), FakeDecode([], ack_delay=5)

    async def go():
        gen = run(prefill, decode, timeout=0.2)
        assert (await anext(gen)).token_ids == [7]  # the first token is out already
        with pytest.raises(KVTransferError, match="within 0.2s"):
            await anext(gen)

    asyncio.run(go())
    assert prefill.kv.released and decode.closed and prefill.held is False


def test_decode_error_mid_stream_releases_and_closes():
    prefill = FakePrefill()
    decode = FakeDecode([TokenDelta([8], "b"), RuntimeError("engine died")])
    with pytest.raises(RuntimeError, match="engine died"):
        asyncio.run(collect(run(prefill, decode)))
    assert prefill.kv.released and decode.closed and prefill.held is False


def test_decode_lost_before_the_ack_frees_the_prefill_side():
    """The decode replica dies while the handoff is in flight: the prefill stream is closed
    (its pages freed) and the handle released, whatever the error."""
    prefill = FakePrefill()

    class Dies(FakeDecode):
        async def _gen(self):
            try:
                await asyncio.sleep(0.01)
                raise RuntimeError("decode replica died")
                yield  # an async generator
            finally:
                self.closed = True

    with pytest.raises(RuntimeError, match="died"):
        asyncio.run(collect(run(prefill, Dies([]))))
    assert prefill.kv.released and prefill.held is False


def test_decode_stream_must_start_with_the_ack():
    class NoAck(FakeDecode):
        async def _gen(self):
            yield TokenDelta([8], "b")

    with pytest.raises(InternalError, match="KVReceived"):
        asyncio.run(collect(run(FakePrefill(), NoAck([]))))


def test_client_disconnect_after_first_token_closes_decode():
    prefill = FakePrefill()
    decode = FakeDecode([TokenDelta([i], "x") for i in range(100)], per_item_delay=0.01)

    async def go():
        gen = run(prefill, decode)
        await anext(gen)
        await anext(gen)
        await gen.aclose()  # what the ingress does when the client goes away

    asyncio.run(go())
    assert prefill.kv.released and decode.closed and prefill.held is False


def test_client_disconnect_while_decode_waits_for_pages_frees_both_sides():
    prefill = FakePrefill()
    decode = FakeDecode([], ack_delay=5)  # a decode replica queueing the handoff for pages

    async def go():
        gen = run(prefill, decode, timeout=10)
        await anext(gen)
        task = asyncio.ensure_future(anext(gen))
        await asyncio.sleep(0.05)
        assert prefill.held and not decode.closed
        task.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        await gen.aclose()

    asyncio.run(go())
    assert prefill.kv.released and decode.closed and prefill.held is False


def test_cancel_during_prefill_cancels_the_prefill_call():
    prefill = FakePrefill(delay=5)

    async def go():
        task = asyncio.ensure_future(collect(run(prefill, FakeDecode([]))))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert prefill.cancelled


def test_unified_closes_its_stream():
    closed = []

    class Engine:
        async def generate(self, req):
            try:
                for i in range(10):
                    yield TokenDelta([i], "x")
            finally:
                closed.append(True)

    async def go():
        gen = run_unified(REQ, Engine())
        assert (await anext(gen)).token_ids == [0]
        await gen.aclose()

    asyncio.run(go())
    assert closed == [True]


class FakeLocalDecode(FakeDecode):
    """A decode replica that prefills locally (`local`) or defers to a prefill replica."""

    def __init__(self, local: bool, items, route=None):
        super().__init__(items)
        self.local, self.route = local, route
        self.local_closed = False

    def generate_or_defer(self, req):
        return self._local(req)

    async def _local(self, req):
        try:
            yield self.route or PrefillRoute(self.local, 64, len(req.prompt_token_ids))
            if self.local:
                for item in self.items:
                    yield item
        finally:
            self.local_closed = True


def selective(prefill, decode):
    return run_selective(REQ, prefill, decode, kv_timeout_s=1.0, make_delta=first)


def test_selective_local_prefill_skips_the_prefill_replica():
    prefill = FakePrefill()
    decode = FakeLocalDecode(True, [TokenDelta([7], "a"), TokenDelta([8], "b", "length")])
    out = asyncio.run(collect(selective(prefill, decode)))
    assert [d.token_ids for d in out] == [[7], [8]]
    assert decode.local_closed and not decode.requests  # never asked to import a payload
    assert not prefill.kv.released  # no prefill happened: no handle was made


def test_selective_remote_prefill_takes_the_full_pd_path():
    prefill = FakePrefill()
    decode = FakeLocalDecode(False, [TokenDelta([8], "b", "length")])
    out = asyncio.run(collect(selective(prefill, decode)))
    assert [d.token_ids for d in out] == [[7], [8]]
    assert decode.local_closed and decode.closed and prefill.kv.released
    # the decode call carries the prompt: the router sends it to the replica caching it
    assert decode.requests[0].prompt_token_ids == REQ.prompt_token_ids


def test_selective_bad_first_item_is_an_internal_error():
    decode = FakeLocalDecode(True, [], route=TokenDelta([1], "x"))
    with pytest.raises(InternalError, match="PrefillRoute"):
        asyncio.run(collect(selective(FakePrefill(), decode)))
    assert decode.local_closed
