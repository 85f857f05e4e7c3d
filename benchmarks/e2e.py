"""End to end through LLMEngine: a GLM-4.7-Flash-shaped DSA model (random weights), prefill and
decode, all-F against IndexCache plans. The project's own measure of whether IndexCache's gains
survive the whole engine.

    python -m benchmarks.e2e                  # one H200: results/e2e-<device>.json, .png
    python -m benchmarks.e2e --quick          # a tiny shape on CPU (what CI runs)

Plans: all-F, the paper's searched 1/4 for 47 layers, uniform 1/4 (one F layer in four).
- Prefill: one request per context, the time to its first token at the engine's default chunk,
  and the share of that time in the lightning indexer (CUDA events around each F layer's call).
- Decode at batch 1 and 16 per context that fits the card, paired: one KV pool holds the same
  random context for every plan's engine (KVCache.shared_as) and the engines step in turn, so
  host noise falls on all alike. Step time (median), tokens/s, the all-F / plan step ratio, and
  the GPU-busy share: kernel time on the device (torch.profiler, union of kernel intervals) over
  the step's wall time.
- `--chunks`: the prefill chunk sweep behind the engine's GPU default.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.saturation import build_model, device_name

RESULTS = Path(__file__).resolve().parent / "results"

# GLM-4.7-Flash (zai-org/GLM-4.7-Flash config.json) with a GLM-5-style indexer (32 x 128, top-2048).
GLM_FLASH = dict(
    vocab_size=154880,
    hidden_size=2048,
    intermediate_size=10240,
    moe_intermediate_size=1536,
    num_hidden_layers=47,
    num_attention_heads=20,
    num_key_value_heads=20,
    n_shared_experts=1,
    n_routed_experts=64,
    num_experts_per_tok=4,
    n_group=1,
    topk_group=1,
    kv_lora_rank=512,
    q_lora_rank=768,
    qk_rope_head_dim=64,
    qk_nope_head_dim=192,
    v_head_dim=256,
    first_k_dense_replace=1,
    max_position_embeddings=202752,
    index_topk=2048,
    index_head_dim=128,
    index_n_heads=32,
    routed_scaling_factor=1.8,
    rms_norm_eps=1e-5,
)
# The paper's searched 1/4 plan for a 47-layer model (12 F layers).
SEARCHED_47 = "FSFSFSSSSFSSSFSSFFSSFSSFSSSSFSSSFSSSSFSSSSSSSSS"
TINY = dict(num_hidden_layers=8, max_position_embeddings=1024, index_topk=16)
SEARCHED_TINY = "FSFSSFSS"


def uniform_quarter(n: int) -> str:
    return "".join("F" if i % 4 == 0 else "S" for i in range(n))


def plans_for(n: int, quick: bool) -> dict[str, str]:
    return {
        "all-F": "F" * n,
        "searched-1/4": SEARCHED_TINY if quick else SEARCHED_47,
        "uniform-1/4": uniform_quarter(n),
    }


def share_weights(model, pattern: str):
    """The same weights under another plan (S layers simply have no indexer), no copy."""
    from model.dsa import DSAForCausalLM
    from model.index_cache import IndexCacheConfig

    plan = IndexCacheConfig.from_pattern(pattern, model.config.num_hidden_layers)
    with torch.device("meta"):
        other = DSAForCausalLM(model.config, plan)
    missing, _ = other.load_state_dict(model.state_dict(), strict=False, assign=True)
    if missing:
        raise RuntimeError(f"weights missing under plan {pattern}: {missing[:4]}")
    return other.eval()


def tokenizer():
    from model.tiny import byte_tokenizer
    from model.tokenizer import Tokenizer

    return Tokenizer(byte_tokenizer(), None, ())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class IndexerTimer:
    """CUDA events around every F layer's indexer call (no sync until read)."""

    def __init__(self, model, device: torch.device):
        self.pairs: list = []
        self.device = device
        self._orig = []
        for layer in model.model.layers:
            ix = layer.self_attn.indexer
            if ix is None:
                continue
            self._orig.append((ix, ix.forward))
            ix.forward = self._wrap(ix.forward)

    def _wrap(self, fwd):
        def timed(*a, **k):
            if self.device.type != "cuda":
                t0 = time.perf_counter()
                out = fwd(*a, **k)
                self.pairs.append(time.perf_counter() - t0)
                return out
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            out = fwd(*a, **k)
            e.record()
            self.pairs.append((s, e))
            return out

        return timed

    def seconds(self) -> float:
        sync(self.device)
        if self.device.type != "cuda":
            return sum(self.pairs)
        return sum(s.elapsed_time(e) for s, e in self.pairs) / 1e3

    def close(self) -> None:
        for ix, fwd in self._orig:
            ix.forward = fwd


def engine_for(
    model,
    device,
    *,
    kv_tokens: int,
    chunk: int | None,
    batch: int,
    eager: bool,
    max_len: int,
    cache=None,
    compile: bool = True,
):
    from serving.engine import EngineConfig, LLMEngine

    layout = model.kv_layout()
    pages = math.ceil(kv_tokens / layout.page_size)
    cfg = EngineConfig(
        device=str(device),
        num_blocks=pages if cache is None else None,
        max_num_seqs=max(batch, 1),
        max_num_batched_tokens=chunk,
        max_model_len=max_len,
        enforce_eager=eager,
        cuda_graph_max_batch=max(batch, 1),
        torch_compile=compile,
        enable_prefix_caching=False,  # every prompt is computed: this measures the compute
    )
    return LLMEngine(model, tokenizer(), cfg, cache=cache)


def free_memory() -> None:
    """Callers drop their engine references first; this returns the memory to the card."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- prefill --------------------------------------------------------------------------------------
def prefill_rows(models: dict, args, device, rows: list, on_row=None) -> list[dict]:
    from serving.engine import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    vocab = next(iter(models.values())).config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = {L: torch.randint(5, vocab, (L,), generator=g).tolist() for L in args.contexts}
    top = max(args.contexts)
    engines = {}
    for name, model in models.items():  # one engine per plan, all alive: contexts run in turn
        engines[name] = engine_for(
            model,
            device,
            kv_tokens=top + 128,
            chunk=args.chunk,
            batch=1,
            eager=True,
            max_len=top + 64,
            compile=not args.no_compile,
        )
        engines[name].generate([prompts[min(args.contexts)]], sp)  # warm-up: compiles kernels
    for L in args.contexts:  # context-major: a cut-off run still has every plan's short prompts
        for name, eng in engines.items():
            times, ix_s = [], []
            for _ in range(args.repeats):
                timer = IndexerTimer(models[name], device)
                sync(device)
                t0 = time.perf_counter()
                eng.generate([prompts[L]], sp)
                sync(device)
                times.append(time.perf_counter() - t0)
                ix_s.append(timer.seconds())
                timer.close()
            s = statistics.median(times)
            row = dict(
                plan=name,
                context=L,
                seconds=s,
                indexer_s=statistics.median(ix_s),
                chunk=eng.config.chunk,
                repeats=times,
            )
            row["indexer_share"] = row["indexer_s"] / s
            rows.append(row)
            print(
                f"prefill {name:13s} {L:>7d} tokens: {s:8.3f} s "
                f"(indexer {row['indexer_share']:.0%})",
                flush=True,
            )
            if on_row:
                on_row()
    engines.clear()
    free_memory()
    return rows


def chunk_rows(model, args, device) -> list[dict]:
    from serving.engine import SamplingParams

    rows = []
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    L = args.chunk_context
    prompt = torch.randint(5, model.config.vocab_size, (L,), generator=torch.Generator()).tolist()
    for chunk in args.chunks:
        eng = engine_for(
            model,
            device,
            kv_tokens=L + 128,
            chunk=chunk,
            batch=1,
            eager=True,
            max_len=L + 64,
            compile=not args.no_compile,
        )
        eng.generate([prompt[: 2 * chunk]], sp)
        sync(device)
        t0 = time.perf_counter()
        eng.generate([prompt], sp)
        sync(device)
        rows.append(dict(chunk=chunk, context=L, seconds=time.perf_counter() - t0))
        print(f"chunk {chunk:>6d}: prefill {L} tokens {rows[-1]['seconds']:.3f} s", flush=True)
        del eng
        free_memory()
    return rows


# -- decode ---------------------------------------------------------------------------------------
def seat(engine, rid: str, context: int, params, vocab: int):
    """A request whose first `context` tokens already sit in the KV pool (as after a decode
    replica's import), so the next step is its decode step at that context."""
    from serving.engine.sequence import SequenceStatus

    g = torch.Generator().manual_seed(hash(rid) % (1 << 31))
    ids = torch.randint(5, vocab, (context + 1,), generator=g).tolist()
    seq = engine._new_seq(rid, ids, params)
    engine.seqs[rid] = seq
    engine.block_manager.allocate(seq, context + params.max_tokens + 1)
    seq.num_cached = context
    seq.status = SequenceStatus.RUNNING
    engine.scheduler.running.append(seq)
    return seq


def fill_random(cache) -> None:
    """Random context rows (never time on zeros), FP8 keys with positive scales included."""
    with torch.no_grad():
        for t in cache.k:
            t.normal_()
        for t in cache.index_k:
            if t is not None:
                if t.dtype == torch.float8_e4m3fn:
                    t.copy_(torch.randn(t.shape, device=t.device).to(t.dtype))
                else:
                    t.normal_()
        for t in cache.index_scale:
            if t is not None:
                t.uniform_(0.5, 1.5)


def busy_share(engine, steps: int, device) -> tuple[float | None, list[dict]]:
    """Device time of the kernels of `steps` steps (union of their intervals) per step, and the
    kernels by device time per step (the top 15)."""
    if device.type != "cuda":
        return None, []
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        sync(device)
    cuda = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end) for e in cuda)
    by_name: dict[str, list[float]] = {}
    for e in cuda:
        agg = by_name.setdefault(e.name[:80], [0, 0.0])
        agg[0] += 1
        agg[1] += e.time_range.elapsed_us()
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:15]
    kernels = [
        dict(kernel=k, per_step=c / steps, us_per_step=round(t / steps, 1)) for k, (c, t) in top
    ]
    kernels.append(dict(kernel="(all)", per_step=len(cuda) / steps))
    busy, end = 0.0, -math.inf
    for s, e in spans:
        if s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy / 1e6 / steps, kernels  # seconds per step


def decode_rows(models: dict, args, device, weights_bytes: int) -> list[dict]:
    from serving.engine import SamplingParams

    names = list(models)
    base = models[names[0]]
    layout = base.kv_layout()
    per_round = args.warmup + args.rounds + args.busy_steps + 2
    combos = [(b, L) for b in args.batches for L in args.contexts]
    need = {c: c[0] * (c[1] + per_round + layout.page_size) for c in combos}
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        room = int((free - args.reserve_gb * (1 << 30)) / layout.bytes_per_token)
    else:
        room = max(need.values())
    fits = [c for c in combos if need[c] <= room]
    skipped = [
        dict(
            batch=b,
            context=L,
            skipped=f"needs {need[(b, L)] * layout.bytes_per_token / 2**30:.1f} "
            f"GiB of all-F KV, {room * layout.bytes_per_token / 2**30:.1f} GiB free",
        )
        for (b, L) in combos
        if (b, L) not in fits
    ]
    if not fits:
        return skipped
    pool_tokens = max(need[c] for c in fits)
    top_batch = max(b for b, _ in fits)
    max_len = max(L for _, L in fits) + per_round + 64
    print(
        f"decode pool: {pool_tokens} tokens, "
        f"{pool_tokens * layout.bytes_per_token / 2**30:.1f} GiB",
        flush=True,
    )
    first = engine_for(
        base,
        device,
        kv_tokens=pool_tokens,
        chunk=args.chunk,
        batch=top_batch,
        eager=args.eager,
        max_len=max_len,
        compile=not args.no_compile,
    )
    fill_random(first.cache)
    engines = {names[0]: first}
    for n in names[1:]:
        m = models[n]
        engines[n] = engine_for(
            m,
            device,
            kv_tokens=pool_tokens,
            chunk=args.chunk,
            batch=top_batch,
            eager=args.eager,
            max_len=max_len,
            cache=first.cache.shared_as(m.kv_layout()),
            compile=not args.no_compile,
        )
    sp = SamplingParams(temperature=0, max_tokens=per_round + 1, ignore_eos=True)
    rows = []
    for b, L in tqdm(fits, desc="decode", disable=device.type != "cuda"):
        seqs = {
            n: [seat(e, f"{n}-{i}", L, sp, base.config.vocab_size) for i in range(b)]
            for n, e in engines.items()
        }
        pages = [[s.pages for s in v] for v in seqs.values()]
        assert all(p == pages[0] for p in pages), "paired engines must share page ids"
        for _ in range(args.warmup):
            for e in engines.values():
                e.step()
        times = {n: [] for n in engines}
        for _ in range(args.rounds):
            for n, e in engines.items():
                sync(device)
                t0 = time.perf_counter()
                e.step()
                sync(device)
                times[n].append(time.perf_counter() - t0)
        prof = {n: busy_share(e, args.busy_steps, device) for n, e in engines.items()}
        busy = {n: p[0] for n, p in prof.items()}
        ref = statistics.median(times[names[0]])
        for n in engines:
            med = statistics.median(times[n])
            q = statistics.quantiles(times[n], n=10) if len(times[n]) > 1 else [med] * 9
            rows.append(
                dict(
                    plan=n,
                    batch=b,
                    context=L,
                    step_ms=med * 1e3,
                    p10_ms=q[0] * 1e3,
                    p90_ms=q[-1] * 1e3,
                    tok_s=b / med,
                    all_f_over_plan=ref / med,
                    gpu_busy_s=busy[n],
                    gpu_busy_share=(busy[n] / med) if busy[n] else None,
                    kernels=prof[n][1],
                    graphs=engines[n].runner.graphs is not None,
                )
            )
            r = rows[-1]
            share = f"{r['gpu_busy_share']:.0%}" if r["gpu_busy_share"] else "n/a"
            print(
                f"decode {n:13s} b={b:<3d} ctx={L:>7d}: {r['step_ms']:7.2f} ms/step "
                f"{r['tok_s']:8.1f} tok/s  all-F/plan {r['all_f_over_plan']:.2f}x  busy {share}",
                flush=True,
            )
        for n, e in engines.items():
            for s in seqs[n]:
                e.abort(s.request_id)
    del first
    engines.clear()  # the engines (pools, graphs) go before prefill builds its own
    free_memory()
    return rows + skipped


# -- report ---------------------------------------------------------------------------------------
def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    plans = list(report["plans"])
    colors = dict(zip(plans, ("tab:blue", "tab:orange", "tab:green"), strict=False))
    for p in plans:
        c = colors.get(p)
        pr = [r for r in report["prefill"] if r["plan"] == p]
        axes[0].plot(
            [r["context"] / 1024 for r in pr], [r["seconds"] for r in pr], "o-", c=c, label=p
        )
        for b, style in ((1, "o-"), (16, "s--")):
            dr = [r for r in report["decode"] if r.get("plan") == p and r["batch"] == b]
            if dr:
                axes[1].plot(
                    [r["context"] / 1024 for r in dr],
                    [r["tok_s"] for r in dr],
                    style,
                    c=c,
                    label=f"{p}, batch {b}",
                )
    axes[0].set(xlabel="prompt (K tokens)", ylabel="time to first token (s)", title="Prefill")
    axes[1].set(xlabel="context (K tokens)", ylabel="decode tokens/s", title="Decode", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(report["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shape on CPU (CI smoke)")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --quick")
    p.add_argument("--contexts", type=int, nargs="+")
    p.add_argument("--batches", type=int, nargs="+")
    p.add_argument("--layers", type=int, help="fewer layers than the real 47 (plans truncated)")
    p.add_argument("--chunk", type=int, help="prefill chunk (default: the engine's)")
    p.add_argument("--chunks", type=int, nargs="*", default=[], help="chunk sweep")
    p.add_argument("--chunk-context", type=int, default=65536)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--rounds", type=int, default=20, help="paired decode rounds")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--busy-steps", type=int, default=5)
    p.add_argument("--reserve-gb", type=float, default=8.0, help="GPU memory kept out of the pool")
    p.add_argument("--eager", action="store_true", help="decode without CUDA graphs")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile of the glue")
    p.add_argument("--skip-prefill", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    a.device = a.device or ("cpu" if a.quick else "cuda")
    if a.quick:
        a.contexts = a.contexts or [80, 200]
        a.batches = a.batches or [1, 2]
        a.chunk = a.chunk or 64
        a.rounds, a.warmup, a.busy_steps = min(a.rounds, 4), 1, 1
        a.chunk_context = min(a.chunk_context, 256)
    else:
        a.contexts = a.contexts or [16384, 65536, 131072, 200000]
        a.batches = a.batches or [1, 16]
    return a


def main(argv=None) -> dict:
    args = parse(argv)
    device = torch.device(args.device)
    overrides = dict(TINY) if args.quick else dict(GLM_FLASH)
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    n = overrides.get("num_hidden_layers", 4)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    plans = {k: v[:n] for k, v in plans_for(n if not args.layers else 47, args.quick).items()}
    if args.layers:  # truncated plans keep layer 0 F
        plans = {k: v if v else "F" for k, v in plans.items()}
    t0 = time.perf_counter()
    base = build_model("glm_moe_dsa", overrides, plans["all-F"], dtype, device)
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    models = {"all-F": base} | {k: share_weights(base, v) for k, v in plans.items() if k != "all-F"}
    print(
        f"model: {n} layers, {weights / 2**30:.1f} GiB of weights, built in "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    report = dict(
        benchmark="e2e",
        title=f"{'tiny' if args.quick else 'GLM-4.7-Flash shape'}, {n} layers, random weights, "
        f"LLMEngine on {device_name(device)}",
        device=device_name(device),
        date=dt.date.today().isoformat(),
        torch=torch.__version__,
        config={k: (v.name if isinstance(v, Path) else v) for k, v in vars(args).items()},
        model=dict(overrides, weights_bytes=weights),
        plans=plans,
        prefill=[],
        chunk_sweep=[],
        decode=[],
    )
    out = args.out or RESULTS / f"e2e-{report['device']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every stage and prefill row: a run cut off keeps what it did
        from model.layers import glue

        report["glue"] = glue.status()  # which glue functions ran compiled (or why not)
        report["summary"] = summarize(report)
        out.write_text(json.dumps(report, indent=1))

    if not args.skip_decode:
        report["decode"] = decode_rows(models, args, device, weights)
        save()
    if not args.skip_prefill:
        prefill_rows(models, args, device, report["prefill"], on_row=save)
    if args.chunks:
        report["chunk_sweep"] = chunk_rows(models["searched-1/4"], args, device)
    save()
    plot(report, out.with_suffix(".png"))
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {out}")
    return report


def summarize(report: dict) -> dict:
    s: dict = {}
    pre = {(r["plan"], r["context"]): r["seconds"] for r in report["prefill"]}
    for (plan, L), sec in pre.items():
        if plan != "all-F" and ("all-F", L) in pre:
            s[f"prefill_{L}_all_f_over_{plan}"] = pre[("all-F", L)] / sec
    for r in report["decode"]:
        if "plan" in r and r["plan"] != "all-F":
            s[f"decode_b{r['batch']}_{r['context']}_{r['plan']}_tok_s"] = r["tok_s"]
            s[f"decode_b{r['batch']}_{r['context']}_all_f_over_{r['plan']}"] = r["all_f_over_plan"]
    return s


if __name__ == "__main__":
    main()
