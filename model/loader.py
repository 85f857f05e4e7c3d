"""Load a local Hugging Face checkpoint directory (config.json + *.safetensors, single file or
sharded with model.safetensors.index.json) into a `DSAForCausalLM`.

Everything is checked from the safetensors headers before any weight is read: missing,
unexpected or misshapen tensors raise one ValueError listing them, so a bad checkpoint never
leaves a half-loaded model. Indexer weights of S layers are skipped (S layers have no indexer
module), MTP layers (index >= num_hidden_layers) are ignored, per-expert MoE weights are stacked
into the packed expert tensors, and FP8 weights with 128x128 `weight_scale_inv` blocks are
dequantised at load, or, with `keep_fp8=True`, kept in e4m3 beside their scales (the linears
become model.layers.linear.Fp8Linear; see `_fp8_kept` for what stays dequantised).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from model.config import ModelConfig
from model.dsa import DSAForCausalLM
from model.fp8_load import plan_fp8
from model.index_cache import IndexCacheConfig
from model.parallel import SINGLE, Parallel, ShardPlan
from model.sources import Source, headers_of, shards

# Kept in fp32 whatever the load dtype: routing and indexer head weights decide discrete choices.
FP32_PARAMS = re.compile(
    r"(indexer\.weights_proj\.weight|mlp\.gate\.weight|e_score_correction_bias)$"
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def _plan_sources(model: DSAForCausalLM, headers: dict) -> tuple[list[Source], dict[str, str]]:
    """Map checkpoint tensors to parameters; returns (sources, scale key -> weight key)."""
    cfg = model.config
    i_inter = cfg.moe_intermediate_size
    sources, scales = [], {}
    for key, (file, shape, dtype) in headers.items():
        m = _LAYER.match(key)
        if m and int(m.group(1)) >= cfg.num_hidden_layers:
            continue  # MTP / next-token-prediction layers
        if m and ".indexer." in key and not model.plan.is_full(int(m.group(1))):
            continue  # S layer under this plan: its indexer is neither built nor loaded
        if key.endswith("rotary_emb.inv_freq") or (
            cfg.tie_word_embeddings and key == "lm_head.weight"
        ):
            continue
        if key.endswith("_scale_inv"):
            scales[key] = key.removesuffix("_scale_inv")
            continue
        em = _EXPERT.match(key)
        if em:
            base, e, which = em.group(1), int(em.group(2)), em.group(3)
            if which == "down":
                target, index = f"{base}.down_proj", (e,)
            else:
                rows = slice(0, i_inter) if which == "gate" else slice(i_inter, 2 * i_inter)
                target, index = f"{base}.gate_up_proj", (e, rows)
        else:
            target, index = key, ()
        sources.append(Source(key, file, shape, dtype, target, index))
    return sources, scales


def _check(model: DSAForCausalLM, sources: list[Source], scales: dict[str, str], weights: set[str]):
    """`weights`: every weight key of the checkpoint this model uses (before sharding: another
    rank's experts are not missing scales' weights)."""
    params = dict(model.named_parameters())
    unexpected = sorted(s.key for s in sources if s.target not in params)
    bad_shape, covered = [], {}
    for s in sources:
        p = params.get(s.target)
        if p is None:
            continue
        want = tuple(p[s.index].shape) if s.index else tuple(p.shape)
        if s.shape != want:
            bad_shape.append(f"{s.key}: checkpoint {list(s.shape)}, model {list(want)}")
        covered.setdefault(s.target, 0)
        covered[s.target] += 1
    missing = []
    for name, p in params.items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            need = p.shape[0] * (2 if name.endswith("gate_up_proj") else 1)
            have = covered.get(name, 0)
            if have not in (need, 1):  # per-expert pieces, or one packed tensor
                missing.append(f"{name} ({have} of {need} expert tensors)")
        elif name not in covered:
            missing.append(name)
    orphan_scales = sorted(k for k, w in scales.items() if w not in weights and _kept(w, model))
    fp8_unscaled = sorted(
        s.key for s in sources if s.dtype.startswith("F8") and s.key + "_scale_inv" not in scales
    )
    problems = []
    for title, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", bad_shape),
        ("scale without weight", orphan_scales),
        ("fp8 weight without weight_scale_inv", fp8_unscaled),
    ):
        if items:
            shown = ", ".join(items[:20]) + (
                f" ... (+{len(items) - 20} more)" if len(items) > 20 else ""
            )
            problems.append(f"{title} ({len(items)}): {shown}")
    if problems:
        raise ValueError("checkpoint does not match the model:\n  " + "\n  ".join(problems))


def _kept(weight_key: str, model: DSAForCausalLM) -> bool:
    m = _LAYER.match(weight_key)
    if m and int(m.group(1)) >= model.config.num_hidden_layers:
        return False
    return not (m and ".indexer." in weight_key and not model.plan.is_full(int(m.group(1))))


def dequant_fp8(
    w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], offset: tuple = (0, 0)
) -> torch.Tensor:
    """W[i, j] * scale_inv[i // bm, j // bn] in fp32 (DeepSeek `weight_dequant`). `offset`: where
    `w` starts inside the full weight (a tensor-parallel shard), (0, 0) for the whole weight."""
    bm, bn = block
    m, n = w.shape
    r0, c0 = offset
    s = scale_inv.float()[r0 // bm : -(-(r0 + m) // bm), c0 // bn : -(-(c0 + n) // bn)]
    s = s.repeat_interleave(bm, 0)[r0 % bm : r0 % bm + m]
    return w.float() * s.repeat_interleave(bn, 1)[:, c0 % bn : c0 % bn + n]


def _read(h, s: Source) -> torch.Tensor:
    """The source's tensor, or only this rank's slice of it."""
    return h.get_slice(s.key)[s.slices] if s.slices else h.get_tensor(s.key)


def load_model(
    path: str | Path,
    index_cache: IndexCacheConfig | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    keep_fp8: bool = False,
    parallel: Parallel = SINGLE,
) -> DSAForCausalLM:
    """`index_cache`: an IndexCacheConfig, a pattern such as "FSSF...", or None for the
    checkpoint's own plan. Applying a plan to an all-F checkpoint is the training-free use.
    `keep_fp8`: FP8 checkpoints keep their linears in e4m3 + `weight_scale_inv` (a no-op for
    unquantised ones); by default every FP8 weight is dequantised to `dtype`.
    `parallel`: this rank's place in a tensor-parallel replica: the model gets this rank's shard
    shapes and only this rank's slices are read from the files (model/parallel/shard.py)."""
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    path = Path(path)
    cfg = ModelConfig.from_pretrained(path)
    plan = IndexCacheConfig.coerce(index_cache, cfg.num_hidden_layers, cfg.index_cache)
    with torch.device("meta"):
        model = DSAForCausalLM(cfg, plan, parallel)
    headers = headers_of(shards(path))
    sources, scales = _plan_sources(model, headers)
    weights = {s.key for s in sources}
    sources = ShardPlan(cfg, parallel).apply(sources)
    kept_keys: set[str] = set()
    if keep_fp8:
        kept_keys, scale_sources = plan_fp8(model, sources, scales, headers)
        sources += scale_sources
    _check(model, sources, scales, weights)

    model.to_empty(device=device)
    for name, p in model.named_parameters():
        if p.dtype == torch.float8_e4m3fn or name.endswith("weight_scale_inv"):
            continue  # kept FP8 weights and their fp32 scales
        p.data = p.data.to(torch.float32 if FP32_PARAMS.search(name) else dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    params = dict(model.named_parameters())
    block = cfg.quantization.block if cfg.quantization else (128, 128)
    by_file: dict[Path, list[Source]] = {}
    for s in sources:
        by_file.setdefault(s.file, []).append(s)
    with torch.no_grad():
        for file, srcs in by_file.items():
            with safe_open(file, "pt", device="cpu") as h:
                for s in srcs:
                    t = _read(h, s)
                    if s.key + "_scale_inv" in scales and s.key not in kept_keys:
                        sf = headers[s.key + "_scale_inv"][0]
                        offset = tuple(sl.start for sl in s.slices) if s.slices else (0, 0)
                        with safe_open(sf, "pt", device="cpu") as hs:
                            sc = hs.get_tensor(s.key + "_scale_inv")
                        t = dequant_fp8(t, sc, block, offset)
                    dst = params[s.target]
                    (dst[s.index] if s.index else dst).copy_(t.to(dst.dtype))
    return model.eval()
