"""Prefix caching: time to first token of a long shared prefix plus new tokens, cached vs not.

    python -m benchmarks.prefix_cache                     # CPU smoke run, tiny GLM-style model
    python -m benchmarks.prefix_cache --preset glm-mid --device cuda --dtype bfloat16 \\
        --prefix-tokens 131072 --new-tokens 1024

Per plan (all-F and 1/4), one engine with prefix caching on an otherwise idle pool:
  uncached  prefix + new tokens A, cold cache: the whole prompt is prefilled (chunked);
  cached    prefix + new tokens B (same length, different ids): the engine reuses the prefix's
            full pages (attention rows and the F layers' indexer keys) and prefills only the
            rest, so S layers right after the cache reuse the top-k their F layer scores over
            cached plus new keys.
TTFT is arrival to first token, steps timed on the engine thread (CUDA synchronised). Target
(issue 16): cached TTFT <= 10% of uncached for a 128K prefix + 1K new tokens. The cached run's
greedy tokens are checked against an engine without the cache. Writes
benchmarks/results/prefix_cache-<device>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import torch

from benchmarks.saturation import PRESETS, build_model, device_name, quarter_pattern

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULTS = {  # preset: (prefix tokens, new tokens, step token budget)
    "tiny": (2048, 64, 512),
    "glm-mid": (131072, 1024, 8192),
}
TARGET_RATIO = 0.10


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(DEFAULTS), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prefix-tokens", type=int, help="shared prefix length (preset default)")
    p.add_argument("--new-tokens", type=int, help="tokens after the prefix (preset default)")
    p.add_argument("--gen", type=int, default=4, help="greedy tokens per request")
    p.add_argument("--max-num-batched-tokens", type=int, help="chunked-prefill step budget")
    p.add_argument("--index-fp8", action="store_true", help="FP8 indexer keys (+ fp32 scale)")
    p.add_argument("--kernels", choices=["auto", "ref", "triton"], default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-check", action="store_true", help="skip the uncached-engine token check")
    p.add_argument("--out", type=Path, help="JSON path (default results/prefix_cache-<device>)")
    args = p.parse_args(argv)
    prefix, new, mnbt = DEFAULTS[args.preset]
    args.prefix_tokens = args.prefix_tokens or prefix
    args.new_tokens = args.new_tokens or new
    args.max_num_batched_tokens = args.max_num_batched_tokens or mnbt
    for k in ("prefix_tokens", "new_tokens", "gen", "max_num_batched_tokens"):
        if getattr(args, k) < 1:
            raise SystemExit(f"--{k.replace('_', '-')} must be >= 1")
    return args


def make_engine(args, pattern: str, device: torch.device, cache: bool):
    from model.tiny import byte_tokenizer
    from model.tokenizer import Tokenizer
    from serving.engine import EngineConfig, LLMEngine

    kind, overrides = PRESETS[args.preset][:2]
    need = args.prefix_tokens + args.new_tokens + args.gen + 64
    overrides = {**overrides}
    overrides["max_position_embeddings"] = max(overrides.get("max_position_embeddings", 0), need)
    model = build_model(kind, overrides, pattern, getattr(torch, args.dtype), device)
    layout = model.kv_layout(args.index_fp8)
    # The prefix once, two tails, and a page of slack per request.
    tokens = args.prefix_tokens + 2 * (args.new_tokens + args.gen) + 4 * layout.page_size
    cfg = EngineConfig(
        max_num_seqs=4,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=need,
        num_blocks=-(-tokens // layout.page_size),
        index_fp8=args.index_fp8,
        enable_prefix_caching=cache,
    )
    return LLMEngine(model, Tokenizer(byte_tokenizer(), None, ()), cfg)


def timed_request(engine, rid: str, prompt: list[int], sp, device) -> dict:
    """Run one request alone; -> TTFT, prefill steps, hit tokens, greedy tokens."""
    hits0 = engine.stats().prefix_cache_hits_total
    t0 = time.perf_counter()
    engine.add_request(rid, prompt, sp)
    ttft, steps, tokens = None, 0, []
    while engine.has_unfinished():
        outs = engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        steps += ttft is None
        for o in outs:
            tokens += o.token_ids
            if ttft is None and o.token_ids:
                ttft = time.perf_counter() - t0
    return dict(
        ttft_s=ttft,
        prefill_steps=steps,
        hit_tokens=engine.stats().prefix_cache_hits_total - hits0,
        tokens=tokens,
    )


def run_plan(name: str, pattern: str, args, device: torch.device) -> dict:
    from serving.engine import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=args.gen, ignore_eos=True)
    engine = make_engine(args, pattern, device, cache=True)
    vocab = engine.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(5, vocab, (args.prefix_tokens,), generator=g).tolist()
    a = prefix + torch.randint(5, vocab, (args.new_tokens,), generator=g).tolist()
    b = prefix + torch.randint(5, vocab, (args.new_tokens,), generator=g).tolist()
    # Warm-up at full length (another prefix): first-call and allocation costs stay out of both.
    warm = torch.randint(5, vocab, (len(a),), generator=g).tolist()
    engine.generate([warm], SamplingParams(temperature=0, max_tokens=2))
    uncached = timed_request(engine, "uncached", a, sp, device)
    cached = timed_request(engine, "cached", b, sp, device)
    out = dict(
        plan=pattern,
        uncached=uncached,
        cached=cached,
        ttft_ratio=cached["ttft_s"] / uncached["ttft_s"],
        expected_hit_tokens=args.prefix_tokens // engine.layout.page_size * engine.layout.page_size,
        pages_used_after=engine.block_manager.num_used,
        pages_cached_after=engine.block_manager.num_cached,
    )
    if not args.no_check:
        ref = make_engine(args, pattern, device, cache=False)
        out["tokens_match_uncached_engine"] = ref.generate([b], sp)[0].token_ids == cached["tokens"]
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(
        f"{name:6s} {pattern}: TTFT uncached {uncached['ttft_s'] * 1e3:.1f} ms "
        f"({uncached['prefill_steps']} steps), cached {cached['ttft_s'] * 1e3:.1f} ms "
        f"({cached['prefill_steps']} steps, {cached['hit_tokens']} tokens hit): "
        f"ratio {out['ttft_ratio']:.3f}"
        + (
            f", tokens match: {out['tokens_match_uncached_engine']}"
            if "tokens_match_uncached_engine" in out
            else ""
        )
    )
    return out


def main(argv: list[str] | None = None) -> dict:
    from kernels.dispatch import set_backend
    from model.config import ModelConfig
    from model.tiny import tiny_config

    args = parse(argv)
    set_backend(args.kernels)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kind, overrides = PRESETS[args.preset][:2]
    layers = ModelConfig.from_hf({**tiny_config(kind), **overrides}).num_hidden_layers
    plans = {"all-F": "F" * layers, "1/4": quarter_pattern(layers)}
    results = {name: run_plan(name, p, args, device) for name, p in plans.items()}
    report = dict(
        benchmark="prefix_cache",
        device=device_name(device),
        date=dt.date.today().isoformat(),
        torch=torch.__version__,
        config={k: (v.name if isinstance(v, Path) else v) for k, v in vars(args).items()},
        target_ttft_ratio=TARGET_RATIO,
        summary={
            name: dict(
                ttft_ratio=r["ttft_ratio"],
                meets_target=r["ttft_ratio"] <= TARGET_RATIO,
                hit_tokens=r["cached"]["hit_tokens"],
                tokens_match=r.get("tokens_match_uncached_engine"),
            )
            for name, r in results.items()
        },
        results=results,
    )
    out = args.out or RESULTS / f"prefix_cache-{report['device']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
