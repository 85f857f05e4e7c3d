"""The process group of one model replica and the collectives its forward uses.

Arguments are explicit (rank, world size, rendezvous address): nothing here reads the
environment. A replica is a whole torch.distributed world; rank 0 drives (scheduler, KV page
bookkeeping, sampling) and broadcasts each step to the others over the control group (gloo, so
small Python messages never go through NCCL)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Parallel:
    """A rank's place in its replica. `size` 1 (SINGLE) makes every collective a no-op."""

    rank: int = 0
    size: int = 1
    expert_parallel: bool = False
    group: object = field(default=None, repr=False, compare=False)  # tensor collectives
    cpu_group: object = field(default=None, repr=False, compare=False)  # control messages

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {self.size!r}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank must be in [0, {self.size}), got {self.rank}")

    @property
    def driver(self) -> bool:
        return self.rank == 0

    def split(self, n: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's equal share of n items."""
        if n % self.size:
            raise ValueError(f"{what}={n} is not divisible by tensor_parallel_size={self.size}")
        k = n // self.size
        return self.rank * k, k

    # -- collectives (identity at size 1) --------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; every rank gets the same bits (ring reduce then gather)."""
        if self.size > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate the ranks' tensors along the last dimension, rank order."""
        if self.size == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast(self, obj=None):
        """Rank 0's Python object on every rank (control plane)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.cpu_group)

    def close(self) -> None:
        """Leave the replica's world (this process may then join another)."""
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


SINGLE = Parallel()


def init_parallel(
    rank: int,
    size: int,
    init_method: str,
    backend: str = "gloo",
    expert_parallel: bool = False,
    timeout_s: float = 120.0,
) -> Parallel:
    """Join the replica's world (`init_method`: "tcp://host:port" or "file://path"). backend:
    "nccl" on GPUs (then a gloo group carries the control messages), "gloo" on CPU. A rank that
    does not arrive within `timeout_s` makes every collective raise instead of hanging."""
    if size == 1:
        return Parallel(expert_parallel=expert_parallel)
    if dist.is_initialized():
        raise ValueError(
            "this process already belongs to a tensor-parallel group: it holds one "
            "tensor-parallel engine at a time (shut the other down first)"
        )
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=size, timeout=timeout
    )
    world = dist.group.WORLD
    cpu = world if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return Parallel(rank, size, expert_parallel, world, cpu)
