"""Engine settings: the one definition. `LLMEngine.from_pretrained(**settings)`, the serving YAML's
`engine:` block (serving/config.py builds its pydantic model from these fields) and the
deployments all derive from `EngineConfig`; each field's `help` is its documentation.

Fields that depend on the device resolve once, in `resolved()`: `dtype` "auto" is bf16 on CUDA and
fp32 on CPU; `max_num_batched_tokens` None is the measured GPU chunk (benchmarks/README.md) or a
CPU-sized one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Literal

import torch

Role = Literal["unified", "prefill", "decode"]
ROLES = ("unified", "prefill", "decode")
DTYPES = ("auto", "float32", "bfloat16", "float16")

# Chunk (token budget per step) when none is given. GPU: chosen by benchmarks/e2e.py's chunk sweep
# on an H200 (benchmarks/README.md); CPU runs are tests and smoke runs.
GPU_DEFAULT_CHUNK = 8192
CPU_DEFAULT_CHUNK = 512


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class EngineConfig:
    role: Role = _f(
        "unified", "unified (whole requests), prefill (first token + KV payload), decode"
    )
    dtype: str = _f("auto", "weight/activation dtype: auto (bf16 on CUDA, fp32 on CPU) or a name")
    device: str = _f("cpu", "torch device of the engine: cpu, cuda, cuda:N")
    max_num_seqs: int = _f(64, "sequences admitted to a batch at once")
    max_num_batched_tokens: int | None = _f(
        None,
        "token budget of one step, i.e. the chunked-prefill chunk; None = "
        f"{GPU_DEFAULT_CHUNK} on CUDA (measured), {CPU_DEFAULT_CHUNK} on CPU",
    )
    max_model_len: int | None = _f(None, "prompt + output tokens; None = the model's maximum")
    num_blocks: int | None = _f(None, "KV pages (64 tokens each); overrides kv_memory_bytes")
    kv_memory_bytes: int | None = _f(
        None, "KV pool byte budget; None = derived from gpu_memory_utilization (CUDA)"
    )
    index_fp8: bool = _f(False, "indexer keys in e4m3 + an fp32 scale (132 B/token/F layer)")
    gpu_memory_utilization: float = _f(
        0.9,
        "share of the GPU's total memory this engine may use (weights, activations, CUDA graphs "
        "and KV pool together), as in vLLM",
    )
    enforce_eager: bool = _f(False, "never use CUDA graphs for decode (debugging, profiling)")
    torch_compile: bool = _f(
        True, "fuse the PyTorch glue between kernels with torch.compile (CUDA only)"
    )
    cuda_graph_max_batch: int = _f(
        256, "largest decode batch captured as a CUDA graph; bigger batches run eagerly"
    )
    enable_prefix_caching: bool = _f(
        True, "reuse cached full pages of earlier requests' prefixes (indexer keys included)"
    )
    kv_watermark: float = _f(
        0.01,
        "share of the pool admission keeps free while requests run (at least one page when > 0), "
        "so decoding requests can grow without preempting the request just admitted",
    )
    max_queue_bypass: int = _f(
        8, "requests admitted ahead of a queue head that does not fit yet, before it waits"
    )
    max_queued_handoffs: int = _f(
        64,
        "decode: KV handoffs that may wait for pages at once (they hold no pages and no payload "
        "bytes while they wait); one more is refused and its request gets a 503",
    )
    tensor_parallel_size: int = _f(
        1,
        "ranks (GPUs) one replica's model is split over: MLA heads, MLP and vocabulary split, "
        "indexer replicated (model/parallel); MLA families only",
    )
    expert_parallel: bool = _f(
        False,
        "with tensor_parallel_size > 1, place whole routed experts on ranks (E / N each) instead "
        "of splitting every expert's intermediate size",
    )
    fp8_weights: bool = _f(
        False,
        "FP8 checkpoints keep linears and experts in e4m3 with their 128x128 block scales "
        "(kernels/fp8_gemm, fused_moe_fp8); false: dequantise them to dtype at load",
    )

    def __post_init__(self):
        if isinstance(self.dtype, torch.dtype):  # accepted for convenience, stored by name
            object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device {self.device!r} is not a torch device: {e}") from None
        for name in (
            "max_num_seqs",
            "cuda_graph_max_batch",
            "max_queued_handoffs",
            "tensor_parallel_size",
        ):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("max_num_batched_tokens", "max_model_len", "num_blocks", "kv_memory_bytes"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {v!r}")
        for name in (
            "index_fp8",
            "enforce_eager",
            "torch_compile",
            "enable_prefix_caching",
            "expert_parallel",
            "fp8_weights",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, int | float) or not 0 < u <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {u!r}")
        w = self.kv_watermark
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w < 1:
            raise ValueError(f"kv_watermark must be in [0, 1), got {w!r}")
        if not _is_int(self.max_queue_bypass) or self.max_queue_bypass < 0:
            raise ValueError(
                f"max_queue_bypass must be an integer >= 0, got {self.max_queue_bypass!r}"
            )

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        """Like the constructor, but an unknown setting is a ValueError naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine setting(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)

    def replace(self, **changes) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    @property
    def chunk(self) -> int:
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return GPU_DEFAULT_CHUNK if self.torch_device.type == "cuda" else CPU_DEFAULT_CHUNK

    @property
    def use_cuda_graphs(self) -> bool:
        return self.torch_device.type == "cuda" and not self.enforce_eager


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def watermark_pages(cfg: EngineConfig, num_blocks: int) -> int:
    """Pages admission leaves free while requests run."""
    return math.ceil(cfg.kv_watermark * num_blocks) if cfg.kv_watermark > 0 else 0
