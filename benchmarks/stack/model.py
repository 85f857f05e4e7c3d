"""The model and serving config of the whole-stack run: a GLM-4.7-Flash-shaped DSA checkpoint with
random bf16 weights, as many layers as two copies (prefill + decode replica on one GPU) fit with
their KV pools, and the disaggregated serving YAML that gives each replica its own KV budget.

    python -m benchmarks.stack.model --out /tmp/stack-model              # GPU machine
    python -m benchmarks.stack.model --out .cache/stack-tiny --quick     # CPU smoke shape

Sizing (printed and written to sizing.json): the decode pool holds `--fit` whole all-F requests
of the load test's mean size (documents of [P/2, P] tokens + max_tokens), the prefill pool
`--prefill-seqs` full documents; each engine keeps `--reserve-gib` besides weights and KV (CUDA
context, the activations of an 8192-token chunk, the indexer's scratch, decode CUDA graphs,
torch.compile); the checkpoint must fit the disk. Layers = the most (up to GLM-4.7-Flash's 47)
that satisfy both. The 1/4 plan runs on the same KV bytes, so its pools hold more tokens.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

GIB = 1 << 30
MAX_LAYERS = 47  # GLM-4.7-Flash
NO_GPU = 1 << 62  # CPU runs: no card to fill
SERVED_NAME = "glm-4.7-flash-shape"


def model_config(layers: int, quick: bool = False) -> dict:
    """config.json of the checkpoint: GLM-4.7-Flash dims (benchmarks/e2e.py) on `layers` layers;
    `quick`: the tiny GLM-style dims with GLM's vocabulary (larger than the tokenizer's, as real
    checkpoints pad it), so the same paths run on a CPU."""
    from benchmarks.e2e import GLM_FLASH
    from model.tiny import tiny_config

    dims = {"vocab_size": GLM_FLASH["vocab_size"]} if quick else GLM_FLASH
    return {**tiny_config("glm_moe_dsa"), **dims, "num_hidden_layers": layers}


def _meta_model(cfg: dict):
    from model.config import ModelConfig
    from model.dsa import DSAForCausalLM

    with torch.device("meta"):
        return DSAForCausalLM(ModelConfig.from_hf(cfg))  # all-F: every indexer built


def _param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    from model.loader import FP32_PARAMS

    return torch.float32 if FP32_PARAMS.search(name) else dtype


def weight_bytes(cfg: dict, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the all-F weights as the loader keeps them (routing / indexer heads in fp32)."""
    m = _meta_model(cfg)
    return sum(
        p.numel() * torch.finfo(_param_dtype(n, dtype)).bits // 8 for n, p in m.named_parameters()
    )


def kv_bytes_per_token(cfg: dict, pattern: str, dtype: torch.dtype = torch.bfloat16) -> int:
    from model.config import ModelConfig
    from model.index_cache import IndexCacheConfig
    from model.kv_cache import KVLayout

    mc = ModelConfig.from_hf(cfg)
    plan = IndexCacheConfig.from_pattern(pattern, mc.num_hidden_layers)
    return KVLayout.for_model(mc, plan, dtype).bytes_per_token


@dataclass(frozen=True)
class Workload:
    doc_tokens: int = 16384  # largest prompt; the load test draws from [P/2, P]
    max_tokens: int = 512
    fit: int = 16  # whole all-F requests the decode pool holds
    prefill_seqs: int = 4  # full documents the prefill pool holds

    @property
    def mean_request_tokens(self) -> float:
        return 0.75 * self.doc_tokens + self.max_tokens + 32  # + the chat template's tokens

    @property
    def decode_kv_tokens(self) -> int:
        return math.ceil(self.fit * self.mean_request_tokens)

    @property
    def prefill_kv_tokens(self) -> int:
        return self.prefill_seqs * (self.doc_tokens + 64)

    @property
    def max_model_len(self) -> int:
        return self.doc_tokens + self.max_tokens + 256


@dataclass(frozen=True)
class Sizing:
    layers: int
    weight_bytes: int  # one copy
    kv_bytes_per_token_all_f: int
    decode_kv_bytes: int
    prefill_kv_bytes: int
    reserve_bytes: int  # per engine
    gpu_bytes: int
    disk_free_bytes: int | None
    limited_by: str

    @property
    def gpu_needed(self) -> int:
        return (
            2 * (self.weight_bytes + self.reserve_bytes)
            + self.decode_kv_bytes
            + self.prefill_kv_bytes
        )

    def lines(self) -> list[str]:
        g = lambda b: f"{b / GIB:.1f} GiB"  # noqa: E731
        disk = g(self.disk_free_bytes) if self.disk_free_bytes is not None else "not checked"
        card = g(self.gpu_bytes) if self.gpu_bytes < NO_GPU else "no card (CPU)"
        return [
            f"layers: {self.layers} of GLM-4.7-Flash's {MAX_LAYERS} ({self.limited_by})",
            f"weights {g(self.weight_bytes)} per copy x 2, reserve {g(self.reserve_bytes)} "
            "per engine",
            f"KV: {self.kv_bytes_per_token_all_f} B/token all-F; decode pool "
            f"{g(self.decode_kv_bytes)}, prefill pool {g(self.prefill_kv_bytes)}",
            f"GPU: {g(self.gpu_needed)} of {card}; disk free {disk} "
            f"(checkpoint {g(self.weight_bytes)})",
        ]


def size_for(
    work: Workload,
    gpu_bytes: int,
    reserve_bytes: int,
    disk_free_bytes: int | None = None,
    layers: int | None = None,
    quick: bool = False,
    disk_margin: int = 8 * GIB,
    dtype: torch.dtype = torch.bfloat16,
) -> Sizing:
    """The most layers (<= 47, or exactly `layers`) whose two copies, reserves and KV pools fit
    `gpu_bytes` and whose checkpoint (plus `disk_margin` for logs and spills) fits the disk."""
    base, step = _linear(quick, dtype)

    def sizing(n: int, why: str) -> Sizing:
        per_tok = base[1] + (n - 1) * step[1]
        return Sizing(
            n,
            base[0] + (n - 1) * step[0],
            per_tok,
            work.decode_kv_tokens * per_tok,
            work.prefill_kv_tokens * per_tok,
            reserve_bytes,
            gpu_bytes,
            disk_free_bytes,
            why,
        )

    if layers is not None:
        return sizing(layers, "set by --layers")
    why = "the whole model fits"
    for n in range(MAX_LAYERS, 0, -1):
        s = sizing(n, why)
        short = []
        if s.gpu_needed > gpu_bytes:
            short.append("GPU memory")
        if disk_free_bytes is not None and s.weight_bytes + disk_margin > disk_free_bytes:
            short.append("disk")
        if not short:
            return s
        why = "limited by " + " and ".join(short)
    raise ValueError("not even one layer fits: lower --fit, --doc-tokens or --reserve-gib")


@functools.cache
def _linear(quick: bool, dtype: torch.dtype) -> tuple[tuple[int, int], tuple[int, int]]:
    """(weights, all-F KV bytes/token) of one layer and what each further layer adds: layer 0 is
    dense, every later one the same MoE layer, so both grow linearly from there."""
    one, two = model_config(1, quick), model_config(2, quick)
    w1, w2 = weight_bytes(one, dtype), weight_bytes(two, dtype)
    k1, k2 = kv_bytes_per_token(one, "F", dtype), kv_bytes_per_token(two, "FF", dtype)
    return (w1, k1), (w2 - w1, k2 - k1)


def write_checkpoint(cfg: dict, out: Path, device: str, dtype: torch.dtype, seed: int = 0) -> None:
    """Random weights, one safetensors shard per layer (plus one for embeddings and head), made
    on `device` a tensor at a time so host memory holds one layer at most. Experts are saved packed
    (the loader takes packed expert tensors as well as per-expert ones)."""
    from safetensors.torch import save_file

    from model.tiny import write_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    m = _meta_model(cfg)
    g = torch.Generator(device).manual_seed(seed)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in m.named_parameters():
        parts = name.split(".")
        key = f"layer{int(parts[2]):03d}" if name.startswith("model.layers.") else "base"
        shards.setdefault(key, {})[name] = p
    weight_map = {}
    for key, params in sorted(shards.items()):
        tensors = {}
        for name, p in params.items():
            t = torch.empty(p.shape, dtype=_param_dtype(name, dtype), device=device)
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                t.fill_(1.0)
            elif name.endswith(".bias") or name.endswith("e_score_correction_bias"):
                t.zero_()
            else:
                t.normal_(0.0, 0.02, generator=g)
            tensors[name] = t.cpu()
        fname = f"model-{key}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    write_tokenizer(out)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")  # last: marks it complete


def serving_yaml(model_dir: Path, s: Sizing, work: Workload, device: str, port: int) -> dict:
    """The disaggregated app: one prefill and one decode replica, each half the GPU (Ray's
    fractional resources put both on the one card) and its own KV byte budget."""
    gpu = 0.5 if device.startswith("cuda") else 0.0
    engine = {
        "device": device,
        "dtype": "bfloat16" if gpu else "float32",
        "max_model_len": work.max_model_len,
    }
    return {
        "model": str(model_dir),
        "served_model_name": SERVED_NAME,
        "mode": "disaggregated",
        "prefill": {
            "num_cpus": 1,
            "num_gpus": gpu,
            "engine": {**engine, "max_num_seqs": 8, "kv_memory_bytes": s.prefill_kv_bytes},
        },
        "decode": {
            "num_cpus": 1,
            "num_gpus": gpu,
            "engine": {**engine, "max_num_seqs": 128, "kv_memory_bytes": s.decode_kv_bytes},
        },
        "ingress": {
            "port": port,
            "max_tokens_limit": max(work.max_tokens, 16),
            "max_concurrent_requests": 512,
        },
        "kv_transfer": {"backend": "object_store", "timeout_s": 120},
        "routing": {"max_local_prefill_tokens": 0},  # every prompt through the prefill replica
        "metrics_interval_s": 1.0,
    }


def main(argv: list[str] | None = None) -> int:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    ap.add_argument("--quick", action="store_true", help="tiny dims on the CPU (smoke run)")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --quick")
    ap.add_argument("--layers", type=int, default=None, help="default: the most that fit")
    ap.add_argument("--gpu-gib", type=float, default=None, help="default: the card's memory")
    ap.add_argument("--reserve-gib", type=float, default=10.0)
    ap.add_argument("--doc-tokens", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--fit", type=int, default=None)
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.quick else "cuda")
    quick_work = Workload(doc_tokens=256, max_tokens=32, fit=8, prefill_seqs=4)
    base = quick_work if args.quick else Workload()
    work = Workload(
        args.doc_tokens or base.doc_tokens,
        args.max_tokens or base.max_tokens,
        args.fit or base.fit,
        base.prefill_seqs,
    )
    if args.gpu_gib is not None:
        gpu = int(args.gpu_gib * GIB)
    elif device.startswith("cuda"):
        gpu = torch.cuda.mem_get_info(torch.device(device))[1]
    else:
        gpu = NO_GPU
    args.out.parent.mkdir(parents=True, exist_ok=True)
    disk = shutil.disk_usage(args.out.parent).free
    if (args.out / "config.json").is_file():  # an earlier call's checkpoint counts as free space
        disk += sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    layers = args.layers if args.layers is not None else (4 if args.quick else None)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    reserve = int(args.reserve_gib * GIB)
    s = size_for(work, gpu, reserve, disk, layers, quick=args.quick, dtype=dtype)
    for line in s.lines():
        print(f"model: {line}", flush=True)
    cfg = model_config(s.layers, args.quick)
    done = args.out / "config.json"
    if done.is_file() and json.loads(done.read_text()) == cfg:
        print(f"model: {args.out} already holds this checkpoint", flush=True)
    else:
        if args.out.exists():
            shutil.rmtree(args.out)
        write_checkpoint(cfg, args.out, device, dtype)
        print(f"model: wrote {args.out}", flush=True)
    conf = serving_yaml(args.out, s, work, device, args.port)
    (args.out / "stack.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))
    sizing = {**asdict(s), "gpu_needed": s.gpu_needed, "workload": asdict(work), "device": device}
    (args.out / "sizing.json").write_text(json.dumps(sizing, indent=1) + "\n")
    print(f"model: serving config {args.out / 'stack.yaml'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
