"""Start one rank of a tensor-parallel engine: join the replica's process group, load this
rank's shard (only its slices are read from the checkpoint), then either drive (rank 0: the
LLMEngine, with the scheduler, KV page bookkeeping and sampling) or follow (every other rank:
run each forward the driver broadcasts, until it shuts the engine down).

Every rank calls `start_rank` with the same settings; the process model around it (the Serve
replica and its placement group) is serving/tp_replica.py's business."""

from __future__ import annotations

from pathlib import Path

from model.index_cache import IndexCacheConfig
from model.loader import load_model
from model.parallel import init_parallel
from model.tokenizer import Tokenizer
from serving.engine.config import EngineConfig
from serving.engine.llm_engine import LLMEngine
from serving.engine.model_runner import ModelRunner


def start_rank(
    path: str | Path,
    index_cache: IndexCacheConfig | str | None,
    settings: dict,
    rank: int,
    init_method: str,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    device: str | None = None,
):
    """-> the LLMEngine on rank 0 (call its `shutdown()` when done); on other ranks, returns
    None once the driver has shut down. `settings`: EngineConfig fields, identical on all
    ranks. A rank that dies makes the others' next collective raise instead of hanging.
    `device`: this rank's device when it is not settings' (several ranks of one process
    launcher on one host: "cuda:<rank>"; under Ray each rank sees its own GPU as "cuda")."""
    config = EngineConfig.from_kwargs(**settings)
    if device is not None:
        config = config.replace(device=device)
    par = init_parallel(
        rank,
        config.tensor_parallel_size,
        init_method,
        backend,
        config.expert_parallel,
        timeout_s,
    )
    model = load_model(
        path,
        index_cache,
        dtype=config.torch_dtype,
        device=config.device,
        keep_fp8=config.fp8_weights,
        parallel=par,
    ).eval()
    if par.driver:
        try:
            return LLMEngine(model, Tokenizer.from_pretrained(path), config)
        except BaseException:
            par.close()  # the others time out of their first broadcast
            raise
    try:
        ModelRunner(model, config).serve()
    finally:
        par.close()
    return None
