"""The async front: streaming equals the sync engine, prefill -> decode over the async API,
aborts and cancellations free pages in any phase, errors reach the caller only."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from serving.engine import AsyncLLMEngine, LLMEngine, SamplingParams
from tests.engine.conftest import GREEDY, N_GEN


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


async def _collect(agen):
    deltas = [d async for d in agen]
    return [t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas), deltas


async def _until_idle(aeng: AsyncLLMEngine):
    for _ in range(500):
        s = aeng.stats()
        if s.num_running == s.num_waiting == 0 and s.kv_blocks_used == 0:
            return s
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine not idle: {aeng.stats()}")


def test_streams_match_sync_and_reference(model_dir, prompts, reference):
    async def main():
        aeng = AsyncLLMEngine(
            LLMEngine.from_pretrained(model_dir(), "FSSF", num_blocks=8, max_num_batched_tokens=64)
        )
        sp = SamplingParams(**GREEDY)
        got = await asyncio.gather(
            *[_collect(aeng.generate(f"r{i}", p, sp)) for i, p in enumerate(prompts)]
        )
        stats = await _until_idle(aeng)
        await aeng.shutdown()
        return got, stats

    got, stats = _run(main())
    assert [g[0] for g in got] == reference("glm_moe_dsa", "FSSF")
    sync = LLMEngine.from_pretrained(model_dir(), "FSSF", num_blocks=8).generate(
        prompts, SamplingParams(**GREEDY)
    )
    for (_, text, deltas), out in zip(got, sync, strict=True):
        assert text == out.text  # streamed text pieces add up to the final text
        assert deltas[-1].finish_reason == "length"
        assert all(d.finish_reason is None for d in deltas[:-1])
    assert stats.generation_tokens_total == N_GEN * len(prompts)


def test_async_prefill_then_decode(model_dir, prompts, reference):
    async def main():
        pre = AsyncLLMEngine.from_pretrained(model_dir(), role="prefill", num_blocks=8)
        dec = AsyncLLMEngine.from_pretrained(model_dir(), role="decode", num_blocks=8)
        sp = SamplingParams(**GREEDY)
        results = await asyncio.gather(
            *[pre.prefill(f"p{i}", p, sp) for i, p in enumerate(prompts)]
        )
        streams = await asyncio.gather(
            *[_collect(dec.decode(r.request_id, r.payload, sp)) for r in results]
        )
        with pytest.raises(ValueError, match="role"):
            await _collect(pre.generate("x", prompts[0], sp))
        await _until_idle(pre)
        await _until_idle(dec)
        await pre.shutdown()
        await dec.shutdown()
        return results, streams

    results, streams = _run(main())
    tokens = [[r.first_token] + s[0] for r, s in zip(results, streams, strict=True)]
    assert tokens == reference()  # the first token is not re-emitted by decode


def test_abort_and_cancel_free_pages_in_every_phase(model_dir, prompts):
    async def main():
        eng = LLMEngine.from_pretrained(
            model_dir(), num_blocks=3, max_num_batched_tokens=16, max_num_seqs=1
        )
        aeng = AsyncLLMEngine(eng)
        long = SamplingParams(**{**GREEDY, "max_tokens": 200})
        # running: abort from outside, the stream ends with "abort"
        stream = aeng.generate("run", prompts[0], long)
        first = await anext(stream)
        assert first.token_ids
        aeng.abort("run")
        rest = [d async for d in stream]
        assert rest[-1].finish_reason == "abort"
        # waiting (max_num_seqs=1 keeps it queued behind "busy") and mid-prefill: cancel tasks
        busy = asyncio.create_task(_collect(aeng.generate("busy", prompts[1], long)))
        queued = asyncio.create_task(_collect(aeng.generate("queued", prompts[2], long)))
        await asyncio.sleep(0.05)
        queued.cancel()
        busy.cancel()
        await asyncio.gather(busy, queued, return_exceptions=True)
        # consumer stops iterating after one delta
        agen = aeng.generate("early", prompts[0], long)
        await anext(agen)
        await agen.aclose()
        aeng.abort("early")  # idempotent
        aeng.abort("never-existed")
        stats = await _until_idle(aeng)
        ok = await _collect(aeng.generate("after", prompts[0], SamplingParams(**GREEDY)))
        await aeng.shutdown()
        return stats, ok, eng

    stats, ok, eng = _run(main())
    assert stats.kv_blocks_used == 0 and not eng.seqs
    assert len(ok[0]) == N_GEN  # still serving
    assert eng.block_manager.num_free == 3


def test_async_errors_reach_only_the_caller(model_dir, prompts):
    async def main():
        aeng = AsyncLLMEngine.from_pretrained(model_dir(), num_blocks=4)
        sp = SamplingParams(**GREEDY)
        with pytest.raises(ValueError, match="max_model_len"):
            await _collect(aeng.generate("long", [5] * 5000, sp))
        with pytest.raises(ValueError, match="role"):
            await aeng.prefill("p", prompts[0], sp)
        task = asyncio.create_task(_collect(aeng.generate("dup", prompts[0], sp)))
        await asyncio.sleep(0)
        with pytest.raises(ValueError, match="request_id"):
            await _collect(aeng.generate("dup", prompts[1], sp))
        good = await task
        text = await _collect(aeng.generate("text", "Hello there", sp))
        await aeng.shutdown()
        return good, text

    good, text = _run(main())
    assert len(good[0]) == N_GEN and len(text[0]) == N_GEN


def test_prefill_aborted_before_its_first_token_is_cancelled(model_dir, prompts):
    async def main():
        aeng = AsyncLLMEngine.from_pretrained(
            model_dir(), role="prefill", num_blocks=4, max_num_batched_tokens=1
        )
        sp = SamplingParams(**GREEDY)
        task = asyncio.create_task(aeng.prefill("slow", prompts[2], sp))
        while aeng.stats().num_running == 0:  # one token per step: 126 forwards to go
            await asyncio.sleep(0.001)
        aeng.abort("slow")
        with pytest.raises(asyncio.CancelledError):
            await task
        stats = await _until_idle(aeng)
        one = dataclasses.replace(sp, max_tokens=1)
        res = await aeng.prefill("next", prompts[0][:20], one)
        await aeng.shutdown()
        return stats, res

    stats, res = _run(main())
    assert stats.kv_blocks_used == 0 and res.finish_reason == "length"


def test_shutdown_ends_open_streams_and_refuses_new_requests(model_dir, prompts):
    async def main():
        eng = LLMEngine.from_pretrained(model_dir(), num_blocks=4)
        aeng = AsyncLLMEngine(eng)
        long = SamplingParams(**{**GREEDY, "max_tokens": 150})
        stream = aeng.generate("open", prompts[0], long)
        await anext(stream)
        await aeng.shutdown()
        rest = [d async for d in stream]
        with pytest.raises(RuntimeError, match="shut down"):
            await _collect(aeng.generate("late", prompts[0], long))
        return rest, eng

    rest, eng = _run(main())
    assert rest[-1].finish_reason == "abort"
    assert not eng.seqs and eng.block_manager.num_free == 4
