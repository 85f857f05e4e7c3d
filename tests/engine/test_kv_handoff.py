"""The engine's half of the KV handoff (serving/engine/kv_connector.py): the decode side reserves
pages from a header before any rows exist, queues (bounded) while the pool is full, never
schedules a reservation before its rows are in, and frees a reservation nobody fills when its
timeout passes; the prefill side holds its pages until released or the hold expires. Page counts
are checked against their start values, and greedy tokens through the handoff equal the
reference."""

from __future__ import annotations

import asyncio
import time

import pytest

from serving.engine import (
    AsyncLLMEngine,
    HandoffRefused,
    HandoffReserved,
    HandoffTimeout,
    LLMEngine,
    SamplingParams,
)
from tests.engine.conftest import GREEDY

SP = SamplingParams(**GREEDY)


@pytest.fixture(scope="module")
def results(model_dir, prompts):
    """Prefill results (first token + payload) of every prompt."""
    pre = LLMEngine.from_pretrained(model_dir(), role="prefill", num_blocks=8)
    return pre.prefill(prompts, SP)


def decoder(model_dir, **kw) -> LLMEngine:
    return LLMEngine.from_pretrained(model_dir(), role="decode", **kw)


def run_all(eng: LLMEngine, timeout_s: float = 60) -> dict[str, list[int]]:
    toks: dict[str, list[int]] = {}
    deadline = time.monotonic() + timeout_s
    while eng.has_unfinished():
        assert time.monotonic() < deadline, "engine did not finish"
        for o in eng.step():
            assert o.error is None, o.error
            toks.setdefault(o.request_id, []).extend(o.token_ids)
    return toks


def reserved_ids(outs) -> list[str]:
    return [o.request_id for o in outs if o.reserved]


def test_reservation_never_filled_is_released_on_timeout(model_dir, results):
    dec = decoder(model_dir, num_blocks=4)
    free0 = dec.block_manager.num_free
    h = results[2].payload.header  # 126 rows + the first token: 2 pages
    dec.reserve(h, SP, "r", timeout_s=0.3)
    assert reserved_ids(dec.poll_handoffs()) == ["r"]
    assert dec.block_manager.num_free == free0 - 2
    assert dec.stats().num_handoffs_reserved == 1 and dec.stats().kv_blocks_handoff == 2
    dec.step()
    assert not dec.last_batch  # reserved, not filled: never scheduled
    assert dec.next_handoff_deadline() is not None
    time.sleep(0.35)
    [out] = dec.poll_handoffs()
    assert isinstance(out.error, HandoffTimeout) and "did not arrive" in str(out.error)
    assert dec.block_manager.num_free == free0 and not dec.seqs and "r" not in dec.kv
    assert dec.stats().kv_blocks_handoff == 0
    dec.block_manager.check()


def test_full_pool_queues_the_handoff_holding_nothing(model_dir, prompts, results, reference):
    """No free pages: the handoff waits without pages (nothing to fill them with has been asked
    for); once pages free up it is reserved, filled and decodes the reference tokens."""
    dec = decoder(model_dir, num_blocks=3, kv_watermark=0)
    dec.add_request("blocker", prompts[2], SamplingParams(**{**GREEDY, "max_tokens": 200}))
    dec.step()  # the blocker's prompt: 2 of 3 pages
    used = dec.block_manager.num_used
    dec.reserve(results[1].payload.header, SP, "h", timeout_s=30)  # needs 2 pages
    for _ in range(3):
        assert reserved_ids(dec.step()) == []
    st = dec.stats()
    assert st.num_handoffs_waiting == 1 and st.num_handoffs_reserved == 0
    assert dec.block_manager.num_used >= used and st.kv_blocks_handoff == 0
    assert "h" not in {s.request_id for s in dec.last_batch.seqs}
    dec.abort("blocker")
    assert reserved_ids(dec.poll_handoffs()) == ["h"]
    dec.fill("h", results[1].payload)
    toks = run_all(dec)
    assert [results[1].first_token] + toks["h"] == reference()[1]
    assert dec.block_manager.num_used == 0
    dec.block_manager.check()


def test_queued_handoff_times_out_when_no_pages_come_free(model_dir, prompts, results):
    dec = decoder(model_dir, num_blocks=3, kv_watermark=0)
    dec.add_request("blocker", prompts[2], SamplingParams(**{**GREEDY, "max_tokens": 200}))
    dec.step()
    dec.reserve(results[1].payload.header, SP, "h", timeout_s=0.2)
    time.sleep(0.25)
    outs = dec.step()
    [err] = [o.error for o in outs if o.request_id == "h"]
    assert isinstance(err, HandoffTimeout) and "no KV pages came free" in str(err)
    assert "h" not in dec.seqs and not dec.scheduler.reserving
    dec.abort("blocker")
    assert dec.block_manager.num_used == 0


def test_the_queue_is_bounded_and_a_refusal_allocates_nothing(model_dir, prompts, results):
    dec = decoder(model_dir, num_blocks=3, kv_watermark=0, max_queued_handoffs=1)
    dec.add_request("blocker", prompts[2], SamplingParams(**{**GREEDY, "max_tokens": 200}))
    dec.step()
    used = dec.block_manager.num_used
    dec.reserve(results[0].payload.header, SP, "a")
    with pytest.raises(HandoffRefused, match="max_queued_handoffs 1"):
        dec.reserve(results[1].payload.header, SP, "b")
    assert set(dec.seqs) == {"blocker", "a"} and "b" not in dec.kv
    assert dec.block_manager.num_used == used
    for rid in ("a", "blocker"):
        assert dec.abort(rid)
    assert dec.block_manager.num_used == 0
    dec.block_manager.check()


def test_a_reservation_takes_a_seat_but_runs_only_once_filled(model_dir, prompts, results):
    dec = decoder(model_dir, num_blocks=8, max_num_seqs=1)
    dec.reserve(results[0].payload.header, SP, "h")
    dec.poll_handoffs()
    dec.add_request("local", prompts[0], SP)
    dec.step()
    assert not dec.last_batch  # the one seat is the reservation's; it is not filled yet
    dec.fill("h", results[0].payload)
    dec.step()
    assert [s.request_id for s in dec.last_batch.seqs] == ["h"]
    run_all(dec)
    assert dec.block_manager.num_used == 0


def test_prefill_holds_its_pages_until_released_or_the_hold_expires(model_dir, prompts):
    pre = LLMEngine.from_pretrained(model_dir(), role="prefill", num_blocks=8)
    pre.add_request("a", prompts[1], SP, export_hold_s=30)
    pre.add_request("b", prompts[2], SP, export_hold_s=0.2)
    got = {}
    while len(got) < 2:
        got.update({o.request_id: o.prefill for o in pre.step() if o.prefill})
    assert got["a"].payload.num_tokens == len(prompts[1])
    assert pre.stats().num_exporting == 2 and pre.block_manager.num_used == 4
    assert not pre.has_unfinished()  # held pages are not work: nothing spins
    time.sleep(0.25)
    pre.poll_handoffs()  # b's hold expired
    assert pre.stats().num_exporting == 1 and pre.block_manager.num_used == 2
    assert pre.release_export("a") and not pre.release_export("a")
    assert pre.block_manager.num_used == 0 and pre.stats().kv_blocks_handoff == 0
    pre.block_manager.check()


def test_abort_frees_a_handoff_in_every_phase(model_dir, prompts, results):
    pre = LLMEngine.from_pretrained(model_dir(), role="prefill", num_blocks=8)
    pre.add_request("e", prompts[0], SP, export_hold_s=30)
    while not any(o.prefill for o in pre.step()):
        pass
    assert pre.block_manager.num_used == 1 and pre.abort("e")
    assert pre.block_manager.num_used == 0
    dec = decoder(model_dir, num_blocks=3, kv_watermark=0)
    dec.reserve(results[2].payload.header, SP, "reserved")
    dec.reserve(results[1].payload.header, SP, "queued")  # 2 + 2 pages > 3: waits
    assert reserved_ids(dec.poll_handoffs()) == ["reserved"]
    assert dec.stats().num_handoffs_waiting == 1
    assert dec.abort("queued") and dec.abort("reserved")
    assert dec.block_manager.num_used == 0 and not dec.seqs and not dec.kv.imports
    dec.block_manager.check()


def test_async_handoff_reserves_then_fills_and_cancelling_frees_pages(
    model_dir, results, reference
):
    async def main():
        dec = AsyncLLMEngine(decoder(model_dir, num_blocks=4))
        p = results[1].payload
        stream = dec.reserve("h", p.header, SP, timeout_s=30)
        first = await anext(stream)
        assert isinstance(first, HandoffReserved) and first.request_id == "h"
        await asyncio.sleep(0.05)
        assert dec.stats().kv_blocks_used == 2 and dec.stats().num_handoffs_reserved == 1
        await dec.fill("h", p)
        toks = [t async for d in stream for t in d.token_ids]
        # A second handoff cancelled while reserved: its pages go back.
        stream = dec.reserve("c", p.header, SP, timeout_s=30)
        assert isinstance(await anext(stream), HandoffReserved)
        await stream.aclose()
        for _ in range(200):
            if dec.stats().kv_blocks_used == 0:
                break
            await asyncio.sleep(0.01)
        stats = dec.stats()
        await dec.shutdown()
        return toks, stats

    toks, stats = asyncio.run(asyncio.wait_for(main(), 60))
    assert [results[1].first_token] + toks == reference()[1]
    assert stats.kv_blocks_used == 0 and stats.num_handoffs_reserved == 0
