"""Acceptance (issue 17, CPU): the KV handoff under decode-side backpressure, on real Ray Serve
with one prefill and one decode replica of the real engine.

A long greedy stream ("the blocker") fills the decode replica's pool, so a handoff whose prompt
needs most of that pool cannot get pages while it runs. Then:
- the handoff waits: the decode replica queues it holding no pages and having pulled no payload
  bytes, while the prefill replica keeps the prompt's pages; once the blocker goes, it is
  reserved, pulled and decoded, greedy text equal to the offline engine's;
- nobody frees pages in time: the request gets a 503 naming the KV handoff after the transfer
  timeout, and both replicas' page counts return to their start values;
- the client goes away mid-handoff, or the decode replica is killed under it: both sides free
  the handoff's pages (the killed replica's with it; the prefill replica's explicitly).

Page and byte counts come from the replicas' own `check()` (engine statistics), not from status
codes. Prompts are token ids so their page counts are exact.
"""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from tests.serving.faults import checks, kill_replica, replica_ids, wait_healthy

pytestmark = pytest.mark.ray

APP, MODEL, PREFIX = "app-handoff", "tiny-handoff", "/handoff"
TIMEOUT_S = 4.0  # kv_transfer.timeout_s of this app
POOL = 64  # pages (64 tokens each) on each replica: 4096 tokens, the tiny model's context
BIG = 3600  # the handoff's prompt: 57 pages with its first token
BLOCKER_TOKENS = 4000  # the blocker's max_tokens: it grows through the whole pool
# With the blocker holding more than POOL - 57 - 1 (watermark) pages, the handoff cannot fit.
BLOCKING_TOKENS = 8 * 64


@pytest.fixture(scope="module")
def base(ray_cluster, tiny_model):
    from ray import serve

    from serving.app import build_app
    from serving.cli.serve import wait_running
    from serving.config import ServingConfig

    group = {"num_cpus": 0.25, "engine": {"num_blocks": POOL, "max_num_batched_tokens": 512}}
    cfg = ServingConfig(
        model=tiny_model,
        served_model_name=MODEL,
        mode="disaggregated",
        app_name=APP,
        prefill=group,
        decode=group,
        ingress={"route_prefix": PREFIX, "num_cpus": 0.1, "max_tokens_limit": BLOCKER_TOKENS},
        kv_transfer={"timeout_s": TIMEOUT_S},
        plans={"version": "checkpoint"},
        metrics_interval_s=0.5,
    )
    serve.run(build_app(cfg), name=APP, route_prefix=PREFIX, blocking=False)
    try:
        wait_running(APP, 180)
        yield f"http://127.0.0.1:{ray_cluster}{PREFIX}"
    finally:
        serve.delete(APP)


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 256) for _ in range(n)]  # byte-level ids (the tokenizer has 261)


def body(prompt: list[int], n: int, stream: bool) -> dict:
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def state(role: str) -> dict:
    """The one replica's check() of `role` (PrefillServer / DecodeServer)."""
    [c] = checks(APP, role)
    assert isinstance(c, dict), c
    return c


async def astate(role: str) -> dict:
    return await asyncio.to_thread(state, role)


async def until(pred, timeout_s: float, what: str, interval_s: float = 0.1):
    loop = asyncio.get_running_loop()
    deadline, last = loop.time() + timeout_s, None
    while loop.time() < deadline:
        last = await pred()
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what} (last: {last!r})")


class Blocker:
    """A greedy stream that fills the decode pool; `stop()` disconnects it."""

    def __init__(self, http: httpx.AsyncClient, base: str, seed: int):
        self.tokens, self.done = 0, False
        self._task = asyncio.ensure_future(self._run(http, base, seed))

    async def _run(self, http, base, seed):
        req = body(ids(seed, 20), BLOCKER_TOKENS, True)
        async with http.stream("POST", base + "/v1/completions", json=req) as r:
            if r.status_code != 200:
                raise AssertionError(f"blocker: {r.status_code} {(await r.aread()).decode()}")
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    self.done = True
                    return
                if line.startswith("data: "):
                    assert "error" not in json.loads(line[6:]), line
                    self.tokens += 1

    async def blocking(self) -> None:
        """Until it holds enough pages that the big handoff cannot fit."""

        async def grown():
            assert not self._task.done() or self._task.exception() is None
            return self.tokens > BLOCKING_TOKENS

        await until(grown, 60, "the blocker to fill the decode pool", 0.05)

    async def abandon(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def stop(self) -> None:
        assert not self.done, "the blocker ended on its own: the test lost its premise"
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task


async def idle() -> tuple[dict, dict]:
    """Both replicas back at their start: no page referenced, nothing held or queued."""

    async def clean():
        p, d = await astate("PrefillServer"), await astate("DecodeServer")
        quiet = all(
            s["kv_blocks_used"] == 0
            and s["num_exporting"] == s["handoffs_waiting"] == s["handoffs_reserved"] == 0
            and s["num_running"] == s["num_waiting"] == 0
            for s in (p, d)
        )
        return (p, d) if quiet else None

    return await until(clean, 30, "both replicas to free every page")


def run(coro):
    async def bounded():
        try:
            return await asyncio.wait_for(coro, 240)
        finally:  # a failed check leaves streams running: end them here, not at interpreter exit
            me = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not me]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

    return asyncio.run(bounded())


def test_full_decode_pool_makes_the_handoff_wait_without_pulling(base, offline_engine):
    from serving.engine import SamplingParams

    prompt = ids(1, BIG)
    want = offline_engine.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    )[0].text

    async def main():
        await idle()
        async with httpx.AsyncClient(timeout=120) as http:
            blocker = Blocker(http, base, seed=100)
            await blocker.blocking()
            received0 = (await astate("DecodeServer"))["kv_bytes_received"]  # the blocker's
            req = asyncio.ensure_future(
                http.post(base + "/v1/completions", json=body(prompt, 6, False))
            )

            async def queued():
                d = await astate("DecodeServer")
                return d if d["handoffs_waiting"] == 1 else None

            d = await until(queued, 20, "the handoff queued on the decode replica")
            p = await astate("PrefillServer")
            # Waiting costs the decode replica nothing: no pages, no payload bytes pulled.
            assert d["kv_blocks_handoff"] == 0 and d["handoffs_reserved"] == 0
            assert d["kv_bytes_received"] == received0
            assert d["kv_blocks_used"] < POOL
            # The prefill replica holds the prompt's pages for it meanwhile.
            assert p["num_exporting"] == 1 and p["kv_blocks_used"] == -(-BIG // 64)
            await blocker.stop()
            r = await req
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want  # greedy through PD equals offline
        d = await astate("DecodeServer")
        assert d["kv_bytes_received"] > received0  # pulled once it had pages
        await idle()

    run(main())


def test_no_pages_in_time_is_a_503_and_both_sides_free(base):
    async def main():
        await idle()
        async with httpx.AsyncClient(timeout=120) as http:
            blocker = Blocker(http, base, seed=101)
            await blocker.blocking()
            r = await http.post(base + "/v1/completions", json=body(ids(2, BIG), 6, False))
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["code"] == "kv_transfer_timeout" and "KV handoff" in err["message"]
            assert f"{TIMEOUT_S:.1f}s" in err["message"]

            async def released():
                p, d = await astate("PrefillServer"), await astate("DecodeServer")
                ok = p["num_exporting"] == 0 and p["kv_blocks_used"] == 0
                ok = ok and d["handoffs_waiting"] == d["kv_blocks_handoff"] == 0
                return (p, d) if ok else None

            await until(released, 20, "the handoff's pages freed on both sides")
            await blocker.stop()
        await idle()

    run(main())


def test_client_gone_mid_handoff_frees_both_sides(base):
    async def main():
        await idle()
        async with httpx.AsyncClient(timeout=120) as http:
            blocker = Blocker(http, base, seed=102)
            await blocker.blocking()
            req = asyncio.ensure_future(
                http.post(base + "/v1/completions", json=body(ids(3, BIG), 6, False))
            )

            async def queued():
                d, p = await astate("DecodeServer"), await astate("PrefillServer")
                return d["handoffs_waiting"] == 1 and p["num_exporting"] == 1

            await until(queued, 20, "the handoff in flight")
            req.cancel()  # the client disconnects
            with pytest.raises(asyncio.CancelledError):
                await req

            async def released():
                p, d = await astate("PrefillServer"), await astate("DecodeServer")
                return p["kv_blocks_used"] == p["num_exporting"] == d["handoffs_waiting"] == 0

            await until(released, 20, "the handoff's pages freed on both sides")
            await blocker.stop()
        await idle()

    run(main())


def test_decode_replica_killed_mid_handoff_frees_the_prefill_side(base):
    async def main():
        await idle()
        async with httpx.AsyncClient(timeout=120) as http:
            blocker = Blocker(http, base, seed=103)
            await blocker.blocking()
            req = asyncio.ensure_future(
                http.post(base + "/v1/completions", json=body(ids(4, BIG), 6, False))
            )

            async def queued():
                d, p = await astate("DecodeServer"), await astate("PrefillServer")
                return d["handoffs_waiting"] == 1 and p["num_exporting"] == 1

            await until(queued, 20, "the handoff in flight")
            [victim] = replica_ids(APP, "DecodeServer")
            kill_replica(APP, "DecodeServer", victim)
            await blocker.abandon()  # it died with the replica (or migrates): let it go

            async def prefill_free():
                p = await astate("PrefillServer")
                return p if p["num_exporting"] == 0 and p["kv_blocks_used"] == 0 else None

            # The retry re-prefills on the same replica, so wait for the request to end first.
            r = await req
            assert r.status_code in (200, 503), r.text  # completed elsewhere, or cleanly refused
            await until(prefill_free, 20, "the prefill replica to free the handoff's pages")
        await asyncio.to_thread(wait_healthy, APP, {"PrefillServer": 1, "DecodeServer": 1})
        await idle()

    run(main())
