"""Run a function on N gloo ranks in fresh processes (torch.multiprocessing spawn) with a
file rendezvous, bounded by a timeout; a rank's exception fails the caller with its traceback."""

from __future__ import annotations

import os
import tempfile

import torch.multiprocessing as mp


def _entry(rank, size, init, backend, fn, args):
    import torch

    torch.set_num_threads(1)  # N ranks share the runner's 2 cores
    if backend == "nccl":
        torch.cuda.set_device(rank)  # rank r on GPU r
    from model.parallel import init_parallel

    par = init_parallel(rank, size, init, backend, timeout_s=60)
    fn(par, *args)
    # Leave the group together before the interpreter exits: a gloo group still alive at exit
    # can destroy a joinable thread, and a rank that passed then dies of SIGABRT (seen in CI).
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    par.close()


def run_ranks(size: int, fn, *args, timeout_s: float = 120.0, backend: str = "gloo") -> None:
    """fn(par, *args) on every rank; fn must be importable (module level). backend "nccl":
    rank r uses GPU r."""
    fd, path = tempfile.mkstemp(prefix="tp-rdv-")
    os.close(fd)
    os.unlink(path)  # the file store creates it
    ctx = mp.start_processes(
        _entry, args=(size, f"file://{path}", backend, fn, args), nprocs=size, join=False,
        start_method="spawn",
    )  # fmt: skip
    try:
        import time

        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{size} ranks did not finish within {timeout_s} s")
    finally:
        if os.path.exists(path):
            os.unlink(path)
