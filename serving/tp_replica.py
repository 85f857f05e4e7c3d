"""A tensor-parallel engine inside one Serve replica.

The replica is deployed with `placement_group_bundles` of N bundles (serving/app.py): Serve
places the replica itself in bundle 0, and the replica starts N - 1 rank actors, one in each
other bundle. The replica is rank 0, the driver: its AsyncLLMEngine's scheduler, KV page
bookkeeping and sampling run here, and each step is broadcast to the rank actors, which run
the same forward on their shards (serving/engine/tp.py). Every rank reads only its own slices
of the checkpoint. The ranks meet over torch.distributed (NCCL on GPUs, gloo on CPU bundles) at
this node's address, so a replica's bundles are packed on one node (STRICT_PACK).

A rank that dies is seen two ways, and neither hangs: the driver's next collective raises (the
step fails its requests), and `alive()` finds the actor's task finished, so the replica's
health check raises (the ingress answers /health with 503, Serve replaces the replica) and new
requests get 503 at once.

A replica process belongs to one process group at a time, so it holds one tensor-parallel
engine: it cannot build a second one beside it (a plan swap, or a decode replica's engine for
payloads of another plan). `start` refuses that at once (503, `plan_mismatch`); the plan
follower reports it as the replica's plan_error and keeps the running plan, and replicas that
start later (a redeploy, a replacement) load the new plan.
"""

from __future__ import annotations

import logging
import socket
from contextlib import aclosing

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from serving.engine import AsyncLLMEngine
from serving.errors import Unavailable

log = logging.getLogger(__name__)
START_TIMEOUT_S = 120.0  # every rank must join within this (a rank that failed to start)


@ray.remote
class RankActor:
    """One non-driver rank: loads its shard and serves the driver's forwards until shutdown."""

    def run(self, path: str, pattern, settings: dict, rank: int, init: str, backend: str) -> int:
        from serving.engine.tp import start_rank

        start_rank(path, pattern, settings, rank, init, backend, START_TIMEOUT_S)
        return rank


def _rendezvous() -> str:
    ip = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((ip, 0))
        return f"tcp://{ip}:{s.getsockname()[1]}"


class TPAsyncEngine(AsyncLLMEngine):
    """AsyncLLMEngine over rank 0 of a tensor-parallel group, owning the other ranks' actors."""

    @classmethod
    def start(cls, path: str, pattern, settings: dict, num_cpus: float, num_gpus: float, name: str):
        """Start ranks 1..N-1 as actors named `{name}-rank{i}` (in this job's namespace), then
        rank 0 here; returns once every rank has loaded its shard."""
        import torch.distributed as dist

        from serving.engine.tp import start_rank

        if dist.is_initialized():
            plan = f"plan {pattern}" if pattern else "the checkpoint's plan"
            raise Unavailable(
                "this tensor-parallel replica already runs an engine (one process group per "
                f"process), so it cannot build one for {plan} beside it; replicas started from "
                "now on (a redeploy, a replacement) load it",
                code="plan_mismatch",
            )
        n = settings["tensor_parallel_size"]
        backend = "nccl" if str(settings.get("device", "cpu")).startswith("cuda") else "gloo"
        init = _rendezvous()
        pg = get_current_placement_group()
        actors = []
        for i in range(1, n):
            strategy = (
                PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
                if pg is not None
                else None
            )
            actors.append(
                RankActor.options(
                    name=f"{name}-rank{i}",
                    num_cpus=num_cpus,
                    num_gpus=num_gpus,
                    scheduling_strategy=strategy,
                ).remote()
            )
        runs = [
            a.run.remote(path, pattern, settings, i, init, backend) for i, a in enumerate(actors, 1)
        ]
        try:
            engine = start_rank(path, pattern, settings, 0, init, backend, START_TIMEOUT_S)
        except Exception:
            for a in actors:
                ray.kill(a)
            raise
        self = cls(engine)
        self.actors, self.runs = actors, runs
        ns = ray.get_runtime_context().namespace
        self.ranks = [{"name": f"{name}-rank{i}", "namespace": ns} for i in range(1, n)]
        log.info("tensor-parallel engine up: %d ranks at %s (%s)", n, init, backend)
        return self

    def alive(self) -> str | None:
        """None while every rank runs; else what happened to the first one that stopped."""
        done, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        if not done:
            return None
        try:
            rank = ray.get(done[0])
            return f"tensor-parallel rank {rank} stopped"
        except Exception as e:  # the actor died or its serve loop raised
            return f"a tensor-parallel rank failed: {type(e).__name__}: {str(e)[:300]}"

    def _check(self) -> None:
        err = self.alive()
        if err is not None:
            raise Unavailable(f"{err}; this replica is being replaced", code="rank_failed")

    async def generate(self, *args, **kwargs):
        self._check()
        async with aclosing(super().generate(*args, **kwargs)) as deltas:
            async for delta in deltas:
                yield delta

    async def prefill(self, *args, **kwargs):
        self._check()
        return await super().prefill(*args, **kwargs)

    async def decode(self, *args, **kwargs):
        self._check()
        async with aclosing(super().decode(*args, **kwargs)) as deltas:
            async for delta in deltas:
                yield delta

    async def shutdown(self) -> None:
        await super().shutdown()  # the engine thread releases the ranks' serve loops
        for a in self.actors:
            ray.kill(a)
