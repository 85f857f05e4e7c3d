"""EngineHost swaps the engine for a new plan without dropping requests (real tiny engine)."""

from __future__ import annotations

import asyncio

import pytest

from serving.engine import AsyncLLMEngine, SamplingParams
from serving.engine_host import EngineHost, PlanInfo
from serving.errors import Unavailable


def host_for(
    model: str, role: str = "unified", grace_s: float = 0.05, kv_memory_bytes: int | None = None
) -> EngineHost:
    def build(pattern, pool_bytes):
        budget = pool_bytes if pool_bytes is not None else kv_memory_bytes
        return AsyncLLMEngine.from_pretrained(
            model, index_cache=pattern, role=role, kv_memory_bytes=budget
        )

    return EngineHost(build, grace_s=grace_s)


async def until(predicate, timeout_s: float = 30.0, what: str = "state") -> None:
    """Wait for the state a test asserts, bounded (a fixed sleep races on a busy machine)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


async def generate(host: EngineHost, rid: str, n: int) -> list[int]:
    ids = []
    async with host.acquire() as eng:
        async for d in eng.generate(rid, [5, 6, 7, 8], SamplingParams(max_tokens=n, temperature=0)):
            ids += d.token_ids
    return ids


def test_swap_keeps_running_requests_and_counters(tiny_dir):
    model = tiny_dir("glm_moe_dsa")

    async def go():
        host = host_for(model, kv_memory_bytes=1 << 20)
        with pytest.raises(Unavailable, match="loading"):
            host.current  # noqa: B018
        assert await host.load(PlanInfo(0, None))
        first_id = host.plan_ids[0]
        before = await generate(host, "a", 6)
        # Swap while a long request runs on the old engine: it finishes there.
        running = asyncio.ensure_future(generate(host, "b", 40))
        await asyncio.sleep(0.05)
        assert await host.load(PlanInfo(1, "FSSS", "pattern"))
        assert not await host.load(PlanInfo(2, "FSSS", "pattern"))  # same layers: no rebuild
        assert host.plan.version == 2 and len(host.plan_ids) == 2
        assert len(await running) == 40
        stats = host.stats()
        assert stats["f_layer_ratio"] == 0.25 and stats["plan_version"] == 2
        # Both pools are live during the swap; the new pool has the old pool's byte budget,
        # which holds more tokens under the 1/4 plan.
        engines = [s.engine.engine for s in host._slots]
        caps = [e.kv_capacity_tokens for e in engines]
        pool = [e.kv_capacity_tokens * e.layout.bytes_per_token for e in engines]
        assert stats["kv_capacity_tokens"] == sum(caps) and caps[1] > caps[0] > 0
        assert pool[0] - engines[1].layout.bytes_per_block < pool[1] <= pool[0]
        # Grace passes, the old engine drains and shuts down.
        await until(lambda: len(host.plan_ids) == 1, what="the old engine to be reaped")
        assert first_id not in host.plan_ids
        after = host.stats()
        assert after["generation_tokens_total"] == 6 + 40  # the retired engine's count is kept
        assert after["kv_usage"] == 0.0
        assert after["kv_capacity_tokens"] == caps[1]
        assert len(before) == 6 and len(await generate(host, "c", 3)) == 3
        await host.shutdown()

    asyncio.run(go())


def test_decode_finds_the_engine_of_the_payload_plan(tiny_dir):
    model = tiny_dir("glm_moe_dsa")

    async def go():
        host = host_for(model, role="decode", grace_s=10)
        await host.load(PlanInfo(0, None))
        old = host.plan_ids[0]
        await host.load(PlanInfo(1, "FSFS", "pattern"))
        async with host.acquire(old) as eng:  # still draining: accepted
            assert eng.stats().plan_id == old
        with pytest.raises(Unavailable, match="plan rollout") as e:
            async with host.acquire("0123456789ab"):
                pass
        assert e.value.code == "plan_mismatch"
        await host.shutdown()

    asyncio.run(go())


def test_a_bad_plan_raises_and_keeps_the_engine(tiny_dir):
    model = tiny_dir("glm_moe_dsa")

    async def go():
        host = host_for(model)
        await host.load(PlanInfo(0, None))
        with pytest.raises(ValueError, match="length"):
            await host.load(PlanInfo(1, "FSF", "pattern"))  # 3 letters for a 4-layer model
        assert host.plan.version == 0 and len(await generate(host, "x", 2)) == 2
        await host.shutdown()

    asyncio.run(go())


def test_decode_builds_the_engine_of_a_payload_plan_it_does_not_run(tiny_dir):
    """A prefill replica on another plan (mid-rollout, or one that could not load the new plan):
    the decode replica builds that plan's engine beside its own and decodes the payload exactly,
    then drops the extra engine once idle."""
    from serving.engine import LLMEngine
    from serving.engine_host import layout_pattern

    model = tiny_dir("glm_moe_dsa")
    params = SamplingParams(max_tokens=6, temperature=0)
    prefill = LLMEngine.from_pretrained(model, index_cache="FSFS", role="prefill")
    [res] = prefill.prefill([[5, 6, 7, 8]], params)
    [ref] = LLMEngine.from_pretrained(model, index_cache="FSFS").generate([[5, 6, 7, 8]], params)

    async def go():
        host = host_for(model, role="decode", grace_s=0.2)
        await host.load(PlanInfo(0, None))
        own = host.plan_ids[0]
        assert not host.has_plan(res.payload.plan_id)
        assert layout_pattern(res.payload.header.layout) == "FSFS"
        ids = [res.first_token]
        async with host.acquire_plan(res.payload.plan_id, "FSFS") as eng:
            async for d in eng.decode("p", res.payload, params):
                ids += d.token_ids
        assert ids == ref.token_ids
        assert host.plan == PlanInfo(0, None) and host.plan_ids[-1] == own  # still current
        await until(lambda: host.plan_ids == [own], what="the payload-plan engine to be dropped")
        assert host.stats()["generation_tokens_total"] == 5  # its counters are kept
        await host.shutdown()

    asyncio.run(go())
