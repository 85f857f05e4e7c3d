"""EngineHost swaps the engine for a new plan without dropping requests (real tiny engine)."""

from __future__ import annotations

import asyncio

import pytest

from serving.engine import AsyncLLMEngine, SamplingParams
from serving.engine_host import EngineHost, PlanInfo
from serving.errors import Unavailable


def host_for(model: str, role: str = "unified", grace_s: float = 0.05) -> EngineHost:
    return EngineHost(
        lambda pattern: AsyncLLMEngine.from_pretrained(model, index_cache=pattern, role=role),
        grace_s=grace_s,
    )


async def generate(host: EngineHost, rid: str, n: int) -> list[int]:
    ids = []
    async with host.acquire() as eng:
        async for d in eng.generate(rid, [5, 6, 7, 8], SamplingParams(max_tokens=n, temperature=0)):
            ids += d.token_ids
    return ids


def test_swap_keeps_running_requests_and_counters(tiny_dir):
    model = tiny_dir("glm_moe_dsa")

    async def go():
        host = host_for(model)
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
        # Both pools are live during the swap; the 1/4 plan's pool holds more tokens.
        caps = [s.engine.engine.kv_capacity_tokens for s in host._slots]
        assert stats["kv_capacity_tokens"] == sum(caps) and caps[1] >= caps[0] > 0
        await asyncio.sleep(0.3)  # grace passes, the old engine drains and shuts down
        assert host.plan_ids == [host.plan_ids[-1]] and first_id not in host.plan_ids
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
