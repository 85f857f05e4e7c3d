"""Engine at saturation: more concurrent long-context requests than the KV pool holds, all-F
versus a 1/4 IndexCache plan under the same KV byte budget.

    python -m benchmarks.saturation                       # CPU smoke run, tiny GLM-style model
    python -m benchmarks.saturation --preset glm-mid --device cuda --dtype bfloat16 \\
        --mode decode --context 32768 --gen 128 --fit 16 --requests 40

The budget is sized so the all-F engine holds `--fit` whole requests (prompt + output); the 1/4
plan gets the same bytes. S layers keep no indexer rows, so its pages hold more tokens and it
admits more sequences at once; F-only indexing also cuts decode compute at long context.

Modes: `unified` prefills every prompt in the engine (chunked) and then decodes; `decode`
imports synthetic prefilled payloads into a decode-role engine (random KV rows of the right
layout), so the measurement is the decode replica's steady state. Both preempt by recompute
when pages run out. Per plan: bytes per token, pool capacity, admitted concurrent sequences (max,
and mean while saturated), decode tokens/s while saturated (decode-only steps with requests still
waiting for pages), KV usage, preemptions. Writes benchmarks/results/saturation-<device>.json and
a PNG of concurrency and KV usage over time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

RESULTS = Path(__file__).resolve().parent / "results"

# GLM-5-style attention shapes (MLA 512 + 64, indexer 32 heads x 128, top-2048) on few layers and
# a small MoE: the KV rows and the indexer work per token are the real ones, the weights are not.
GLM_MID = dict(
    vocab_size=32768,
    hidden_size=2048,
    intermediate_size=8192,
    moe_intermediate_size=1024,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=16,
    n_shared_experts=1,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=1,
    topk_group=1,
    kv_lora_rank=512,
    q_lora_rank=1024,
    qk_rope_head_dim=64,
    qk_nope_head_dim=128,
    v_head_dim=128,
    first_k_dense_replace=1,
    max_position_embeddings=131072,
    index_topk=2048,
    index_head_dim=128,
    index_n_heads=32,
)
PRESETS = {
    # name: (tiny kind, config overrides, context, gen, fit, requests, step token budget)
    "tiny": ("glm_moe_dsa", {}, 192, 24, 4, 12, 256),
    "glm-mid": ("glm_moe_dsa", GLM_MID, 32768, 128, 16, 40, 8192),
}


def build_model(
    kind: str,
    overrides: dict,
    pattern: str,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
):
    """A random-weight DSA model built in place on `device` (no checkpoint on disk)."""
    from model.config import ModelConfig
    from model.dsa import DSAForCausalLM
    from model.index_cache import IndexCacheConfig
    from model.loader import FP32_PARAMS
    from model.tiny import tiny_config

    cfg = ModelConfig.from_hf({**tiny_config(kind), **overrides})
    plan = IndexCacheConfig.from_pattern(pattern, cfg.num_hidden_layers)
    with torch.device("meta"):
        model = DSAForCausalLM(cfg, plan)
    g = torch.Generator(device).manual_seed(seed)
    # Each weight is allocated in its final dtype on the device: a model built in fp32 first
    # would need twice its bf16 size (120 GB for GLM-4.7-Flash's 30B parameters).
    with torch.no_grad():
        for prefix, mod in model.named_modules():
            for pname, meta in list(mod._parameters.items()):
                if meta is None:
                    continue
                name = f"{prefix}.{pname}" if prefix else pname
                dt = torch.float32 if FP32_PARAMS.search(name) else dtype
                p = torch.empty(meta.shape, dtype=dt, device=device)
                if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias") or name.endswith("e_score_correction_bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, 0.02, generator=g)
                mod._parameters[pname] = torch.nn.Parameter(p, requires_grad=False)
    return model.eval()


def quarter_pattern(layers: int) -> str:
    """Exactly one F layer in four, layer 0 first: FSSSFSSS..."""
    return "".join("F" if i % 4 == 0 else "S" for i in range(layers))


def synthetic_payload(layout, prompt: list[int], dtype: torch.dtype, seed: int):
    """A payload of random rows in `layout`: what a prefill replica would send, for timing only."""
    from serving.engine.payload import KVPayload, make_header

    g = torch.Generator().manual_seed(seed)
    n = len(prompt)
    row = (
        (1, layout.k_dim)
        if layout.attn_kind == "mla"
        else (layout.kv_heads, layout.k_dim + layout.v_dim)
    )
    attn = [torch.randn(n, *row, generator=g).to(dtype) for _ in range(layout.num_layers)]
    idt = torch.float8_e4m3fn if layout.index_fp8 else dtype
    index_k = [
        torch.randn(n, layout.index_head_dim, generator=g).to(idt)
        if i in layout.index_layers
        else None
        for i in range(layout.num_layers)
    ]
    scales = (
        [torch.ones(n) if i in layout.index_layers else None for i in range(layout.num_layers)]
        if layout.index_fp8
        else []
    )
    return KVPayload.from_tensors(make_header(layout, prompt, prompt[-1]), attn, index_k, scales)


def run_plan(name: str, pattern: str, args, budget: int, device: torch.device) -> dict:
    from model.tiny import byte_tokenizer
    from model.tokenizer import Tokenizer
    from serving.engine import EngineConfig, LLMEngine, SamplingParams

    kind, overrides = PRESETS[args.preset][:2]
    dtype = getattr(torch, args.dtype)
    model = build_model(kind, overrides, pattern, dtype, device)
    role = "decode" if args.mode == "decode" else "unified"
    cfg = EngineConfig(
        role=role,
        device=str(device),
        kv_memory_bytes=budget,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.context + args.gen + 1,
        index_fp8=args.index_fp8,
        # Capacity is the point: no shared pages (decode mode reuses one payload's prompt) and no
        # admission headroom, so the pool fills with distinct requests.
        enable_prefix_caching=False,
        kv_watermark=0,
        max_queued_handoffs=max(args.requests, 1),  # every request is queued at once here
    )
    engine = LLMEngine(model, Tokenizer(byte_tokenizer(), None, ()), cfg)
    sp = SamplingParams(temperature=0, max_tokens=args.gen, ignore_eos=True)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(5, vocab, (args.context,), generator=g).tolist() for _ in range(args.requests)
    ]
    shared = synthetic_payload(engine.layout, prompts[0], dtype, 0) if role == "decode" else None
    _warm_up(engine, sp, role, shared)
    for i, p in enumerate(prompts):
        if role == "decode":  # one set of rows serves every request: only the ids differ
            engine.import_payload(shared, sp, f"r{i}")
        else:
            engine.add_request(f"r{i}", p, sp)
    pre0 = engine.stats().num_preemptions
    steps, t_start = [], time.perf_counter()
    bar = tqdm(
        total=args.requests * (args.gen - (role == "decode")), desc=f"{name} tokens", leave=False
    )
    while engine.has_unfinished():
        waiting = len(engine.scheduler.waiting) + len(engine.scheduler.reserving)
        t0 = time.perf_counter()
        outs = engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        b = engine.last_batch
        new = sum(len(o.token_ids) for o in outs)
        bar.update(new)
        steps.append(
            dict(
                t=t1 - t_start,
                dt=t1 - t0,
                running=len(b.seqs),
                waiting=waiting,
                kv_usage=engine.block_manager.num_used / engine.block_manager.num_blocks,
                decode_only=bool(b.seqs) and all(n == 1 for n in b.num_new),
                prefill_tokens=sum(n for n in b.num_new if n > 1),
                new_tokens=new,
            )
        )
    bar.close()
    return _summary(engine, steps, pre0, time.perf_counter() - t_start)


def _warm_up(engine, sp, role: str, payload) -> None:
    """One short request through every code path, so timings exclude first-call costs."""
    import dataclasses

    short = dataclasses.replace(sp, max_tokens=2)
    if role == "decode":
        engine.decode([payload], short)
    else:
        engine.generate([[5] * 64], short)


def _summary(engine, steps: list[dict], pre0: int, wall: float) -> dict:
    sat = [s for s in steps if s["decode_only"] and s["waiting"] > 0]
    dec = [s for s in steps if s["decode_only"]]
    window = sat or dec
    stats = engine.stats()
    lay = engine.layout
    return dict(
        plan=engine.plan.pattern,
        plan_id=lay.plan_id,
        bytes_per_token=lay.bytes_per_token,
        index_bytes_per_token=lay.index_bytes_per_token,
        kv_blocks=engine.block_manager.num_blocks,
        kv_capacity_tokens=engine.kv_capacity_tokens,
        kv_pool_bytes=engine.cache.nbytes,
        max_concurrent_seqs=max((s["running"] for s in steps), default=0),
        mean_concurrent_seqs_saturated=_mean([s["running"] for s in window]),
        decode_tok_s_saturated=_rate(window),
        decode_tok_s_all_decode_steps=_rate(dec),
        saturated_steps=len(sat),
        steps=len(steps),
        mean_kv_usage_saturated=_mean([s["kv_usage"] for s in window]),
        max_kv_usage=max((s["kv_usage"] for s in steps), default=0.0),
        preemptions=stats.num_preemptions - pre0,
        prefill_tokens=sum(s["prefill_tokens"] for s in steps),
        generated_tokens=sum(s["new_tokens"] for s in steps),
        wall_s=wall,
        pages_free_after=engine.block_manager.num_free,
        trace=[
            {k: (round(v, 5) if isinstance(v, float) else v) for k, v in s.items()} for s in steps
        ],
    )


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _rate(steps: list[dict]) -> float:
    t = sum(s["dt"] for s in steps)
    return sum(s["new_tokens"] for s in steps) / t if t else 0.0


def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        t = [s["t"] for s in r["trace"]]
        axes[0].plot(t, [s["running"] for s in r["trace"]], label=f"{name} ({r['plan']})")
        axes[1].plot(t, [s["kv_usage"] for s in r["trace"]], label=name)
    axes[0].set(xlabel="time (s)", ylabel="sequences in the batch", title="Admitted concurrency")
    axes[1].set(xlabel="time (s)", ylabel="KV pages used", title="KV usage", ylim=(0, 1.05))
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--mode", choices=["unified", "decode"], default="unified")
    p.add_argument("--context", type=int, help="prompt tokens per request (preset default)")
    p.add_argument("--gen", type=int, help="generated tokens per request")
    p.add_argument("--fit", type=int, help="whole requests the all-F pool holds (sets budget)")
    p.add_argument("--kv-gb", type=float, help="KV byte budget in GiB (overrides --fit)")
    p.add_argument("--requests", type=int, help="requests submitted at once")
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--index-fp8", action="store_true", help="FP8 indexer keys (+ fp32 scale)")
    p.add_argument("--kernels", choices=["auto", "ref", "triton"], default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (tiny models run best on 1)")
    p.add_argument(
        "--out", type=Path, help="JSON path (default results/saturation-<device>[-decode].json)"
    )
    args = p.parse_args(argv)
    _, _, context, gen, fit, requests, mnbt = PRESETS[args.preset]
    args.context = args.context or context
    args.gen = args.gen or gen
    args.fit = args.fit or fit
    args.requests = args.requests or requests
    args.max_num_batched_tokens = args.max_num_batched_tokens or mnbt
    for k in ("context", "gen", "fit", "requests", "max_num_batched_tokens"):
        if getattr(args, k) < 1:
            raise SystemExit(f"--{k.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    from kernels.dispatch import set_backend
    from model.config import ModelConfig
    from model.index_cache import IndexCacheConfig
    from model.kv_cache import KVLayout
    from model.tiny import tiny_config

    args = parse(argv)
    set_backend(args.kernels)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kind, overrides = PRESETS[args.preset][:2]
    mcfg = ModelConfig.from_hf({**tiny_config(kind), **overrides})
    layers = mcfg.num_hidden_layers
    plans = {"all-F": "F" * layers, "1/4": quarter_pattern(layers)}
    full = KVLayout.for_model(
        mcfg, IndexCacheConfig(plans["all-F"]), getattr(torch, args.dtype), args.index_fp8
    )
    if args.kv_gb:
        budget = int(args.kv_gb * (1 << 30))
    else:  # all-F holds exactly `fit` whole requests
        pages = math.ceil((args.context + args.gen) / full.page_size)
        budget = args.fit * pages * full.bytes_per_block
    results = {
        name: run_plan(name, pattern, args, budget, device) for name, pattern in plans.items()
    }
    f, q = results["all-F"], results["1/4"]
    report = dict(
        benchmark="saturation",
        device=device_name(device),
        date=dt.date.today().isoformat(),
        torch=torch.__version__,
        # file names only: results are committed and must not carry machine paths
        config={k: (v.name if isinstance(v, Path) else v) for k, v in vars(args).items()},
        model=dict(
            kind=kind,
            layers=layers,
            kv_lora_rank=mcfg.kv_lora_rank,
            index_head_dim=mcfg.index_head_dim,
            index_n_heads=mcfg.index_n_heads,
            index_topk=mcfg.index_topk,
        ),
        kv_budget_bytes=budget,
        summary=dict(
            capacity_ratio=q["kv_capacity_tokens"] / f["kv_capacity_tokens"],
            index_bytes_ratio=q["index_bytes_per_token"] / f["index_bytes_per_token"],
            max_concurrent=[f["max_concurrent_seqs"], q["max_concurrent_seqs"]],
            decode_tok_s_saturated=[f["decode_tok_s_saturated"], q["decode_tok_s_saturated"]],
            decode_speedup=(
                q["decode_tok_s_saturated"] / f["decode_tok_s_saturated"]
                if f["decode_tok_s_saturated"]
                else None
            ),
            preemptions=[f["preemptions"], q["preemptions"]],
        ),
        results=results,
    )
    mode = "" if args.mode == "unified" else f"-{args.mode}"
    out = args.out or RESULTS / f"saturation-{report['device']}{mode}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    plot(results, out.with_suffix(".png"))
    s = report["summary"]
    print(
        f"KV budget {budget / 2**20:.1f} MiB | capacity x{s['capacity_ratio']:.2f} | "
        f"index bytes x{s['index_bytes_ratio']:.2f}"
    )
    for name, r in results.items():
        print(
            f"{name:6s} {r['plan']}: {r['bytes_per_token']} B/token, "
            f"{r['kv_capacity_tokens']} tokens, max {r['max_concurrent_seqs']} seqs "
            f"(mean {r['mean_concurrent_seqs_saturated']:.1f} saturated), "
            f"{r['decode_tok_s_saturated']:.1f} decode tok/s saturated, "
            f"{r['preemptions']} preemptions, KV {r['mean_kv_usage_saturated']:.0%}"
        )
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
