"""PlanFollower with a stand-in registry and real tiny engines: an unusable plan never stops a
replica from starting or changes its plan silently; errors are reported once, not per poll."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import pytest

from serving import plan_follower
from serving.engine import AsyncLLMEngine
from serving.engine_host import EngineHost, PlanInfo
from serving.plan_follower import PlanFollower
from serving.plan_registry import PlanRecord, Provenance


@dataclass
class Registry:
    """The plan_registry functions a follower calls; `mode` scripts its next answers."""

    record: PlanRecord | None = None
    mode: str = "ok"  # ok | hang | fail
    registered: dict | None = None

    def get(self, model, version=None):
        if self.mode == "hang":
            time.sleep(1.0)
        if self.mode == "fail":
            raise ConnectionError("GCS unreachable")
        return self.record

    def register_model(self, model, num_layers):
        self.registered = {model: num_layers}


def record(version: int, pattern: str) -> PlanRecord:
    return PlanRecord("m", version, pattern, "x", Provenance("pattern"))


@pytest.fixture
def follower(tiny_dir, monkeypatch):
    monkeypatch.setattr(plan_follower, "REGISTRY_TIMEOUT_S", 0.3)
    model = tiny_dir("glm_moe_dsa")
    builds: list = []

    def build(pattern, pool_bytes):
        builds.append(pattern)
        return AsyncLLMEngine.from_pretrained(model, index_cache=pattern, num_blocks=8)

    def make(registry: Registry, index_cache=None) -> PlanFollower:
        host = EngineHost(build, grace_s=0.05)
        f = PlanFollower(host, "m", model, index_cache, registry=registry)
        f.builds = builds
        return f

    return make


async def run(f: PlanFollower, user_config=None):
    await f.reconfigure(user_config or {"plan_version": "latest", "plan_poll_interval_s": 0})
    f.stop()


def test_follows_the_registry_and_keeps_the_plan_when_it_is_unreachable(follower, caplog):
    reg = Registry(record(1, "FSFS"))
    f = follower(reg)

    async def go():
        await run(f)
        assert f.host.plan == PlanInfo(1, "FSFS", "pattern") and f.error is None
        assert reg.registered == {"m": 4}  # the model's layer count, for publish's checks
        for mode, why in (("hang", "did not answer"), ("fail", "GCS unreachable")):
            reg.mode = mode
            with caplog.at_level(logging.ERROR, logger="serving.plan_follower"):
                caplog.clear()
                for _ in range(3):
                    await f.sync()
            assert why in f.error and f.host.plan.version == 1  # kept, and said so
            assert len(caplog.records) == 1  # once per distinct error, not per poll
        reg.mode, reg.record = "ok", None  # the registry lost its state
        await f.sync()
        assert "keeping it" in f.error and f.host.plan.version == 1  # no silent revert
        reg.record = record(2, "FFFF")
        await f.sync()
        assert f.host.plan.version == 2 and f.error is None
        await f.host.shutdown()

    asyncio.run(go())


def test_a_plan_that_fails_to_build_is_kept_out_and_not_rebuilt(follower):
    reg = Registry(record(1, "FSFS"))
    f = follower(reg)

    async def go():
        await run(f)
        reg.record = record(2, "FSF")  # slipped past publish's checks: 3 letters, 4 layers
        for _ in range(3):
            await f.sync()
        assert "could not be loaded" in f.error and "length" in f.error
        assert f.host.plan.version == 1 and f.builds.count("FSF") == 1
        await f.reconfigure({"plan_version": "latest", "plan_poll_interval_s": 0})
        assert f.builds.count("FSF") == 2  # a user_config change tries again
        f.stop()
        await f.host.shutdown()

    asyncio.run(go())


@pytest.mark.parametrize(
    "registry, expect",
    [
        (Registry(record(3, "FSF")), "length"),
        (Registry(mode="hang"), "did not answer"),
        (Registry(), "not in the plan registry"),  # a pinned version that does not exist
    ],
)
def test_a_replica_always_starts_on_its_own_plan(follower, registry, expect):
    f = follower(registry, index_cache="FFSF")
    pinned = {"plan_version": 7} if expect.startswith("not in") else None

    async def go():
        await run(f, pinned)
        assert f.host.plan == PlanInfo(0, "FFSF", "config")  # started, on the config's plan
        assert expect in f.error
        await f.host.shutdown()

    asyncio.run(go())


def test_a_model_whose_own_plan_fails_cannot_start(follower):
    f = follower(Registry(record(3, "FSF")), index_cache="FS")  # both unusable

    async def go():
        with pytest.raises(ValueError, match="length"):
            await run(f)

    asyncio.run(go())
