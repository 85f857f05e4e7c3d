"""The KV handoff at engine level: payloads into reserved pages, and what imports cost the
streams a decode engine is running.

    python -m benchmarks.kv_transfer --device cuda         # H200: results/kv_transfer-<dev>.json
    python -m benchmarks.kv_transfer --device cpu --quick  # a tiny shape on CPU (CI smoke)

A GLM-4.7-Flash-shaped model (random weights, the paper's searched 1/4 plan: what the replicas of
a 1/4 deployment hold) serves a prefill-role and a decode-role engine on one device; they share
the weights and each has its own KV pool of random rows. Both copies run as the serving stack
runs them (serving/engine/kv_copy.py): on a side stream, into or out of one pinned host tensor.

- Transfer, per payload size (32K and 128K tokens; --quick: 512 and 2048): export = the prefill
  engine stages a prompt's rows from its pages into a pinned host tensor; import = the decode
  engine reserves pages from the payload's header and copies the payload into them. Each is
  timed from issue to its copy's completion, median of --repeats after one warm-up (the first
  pinned allocation of a size is reported apart), in GB/s. For comparison, the export the engine
  had before: one pageable `.cpu()` per layer part, inside the prefill step. The imported rows
  are checked against the exported ones.
- Decode under imports: --batch sequences at --decode-context tokens step --steps times alone,
  then again while --import-context-token handoffs are imported back to back (one in flight;
  each is aborted once its rows are in, so the running batch stays the same). Inter-token
  latency is the wall time of one engine-thread iteration (poll, fills, step: what the async
  engine does between two outputs), p50 and p99. Target (issue 17): p99 with imports <= 2x p50
  without.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
import time
from pathlib import Path

import torch

from benchmarks.e2e import GLM_FLASH, SEARCHED_47, SEARCHED_TINY, TINY, fill_random, seat, sync
from benchmarks.saturation import build_model, device_name

RESULTS = Path(__file__).resolve().parent / "results"
GB = 1e9


def make_engine(model, device, role: str, kv_tokens: int, batch: int, max_len: int, eager: bool):
    from benchmarks.e2e import tokenizer
    from serving.engine import EngineConfig, LLMEngine

    cfg = EngineConfig(
        role=role,
        device=str(device),
        num_blocks=math.ceil(kv_tokens / model.kv_layout().page_size),
        max_num_seqs=max(batch, 1) + 1,  # the running batch and the handoff being imported
        max_model_len=max_len,
        enforce_eager=eager or role == "prefill",
        cuda_graph_max_batch=max(batch, 1) + 1,
        enable_prefix_caching=False,  # every payload is copied in full
        kv_watermark=0,
    )
    return LLMEngine(model, tokenizer(), cfg)


def header_for(engine, n: int, seed: int):
    from serving.engine.payload import make_header

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, engine.model.config.vocab_size, (n + 1,), generator=g).tolist()
    return make_header(engine.layout, ids[:-1], ids[-1])


def holder(engine, rid: str, n: int):
    """A sequence holding pages for n tokens of the pool's (random) rows, as a finished prompt
    holds them on a prefill engine; `engine.block_manager.free(seq)` gives them back."""
    from serving.engine import SamplingParams

    seq = engine._new_seq(rid, [5] * n, SamplingParams(max_tokens=1))
    engine.block_manager.allocate(seq, n)
    return seq


def legacy_export(cache, pages: list[int], n: int) -> list[torch.Tensor]:
    """The export before the KV connector: a pageable .cpu() of every layer part, in the step."""
    from serving.engine.kv_copy import slots_of

    slots = slots_of(pages, n, cache.layout.page_size, cache.k[0].device)

    def take(t):
        return t.view(-1, *t.shape[2:])[slots].cpu()

    out = [take(k) for k in cache.k]
    out += [take(t) for t in cache.index_k if t is not None]
    out += [take(t) for t in cache.index_scale if t is not None]
    return out


def sync_main(device) -> None:
    """Wait for the main stream only: a device-wide sync would also wait for the import in
    flight on the side stream, which is exactly what the engine does not do."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def timed(device, fn, *args):
    """-> (seconds, fn(*args)), the device synchronised on both ends."""
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args)
    sync(device)
    return time.perf_counter() - t0, out


def export_once(pre, pages: list[int], header):
    payload, copy = pre.kv.copier.export(pages, header)
    copy.wait()
    return payload


def import_once(dec, rid: str, payload) -> None:
    dec.fill(rid, payload)
    dec.kv.imports[rid].copy.wait()


# -- transfer -------------------------------------------------------------------------------------
def transfer_rows(pre, dec, args, device) -> list[dict]:
    from serving.engine import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    rows = []
    for n in args.contexts:
        h = header_for(pre, n, seed=n)
        seq = holder(pre, f"held-{n}", n)
        pages = seq.pages
        runs = {"export": [], "import": [], "legacy_export": []}
        for r in range(args.repeats + 1):
            t, payload = timed(device, export_once, pre, pages, h)
            if r == 0:
                first_export = t
            else:
                runs["export"].append(t)
            rid = f"imp-{n}-{r}"
            dec.reserve(h, sp, rid)
            assert [o.request_id for o in dec.poll_handoffs() if o.reserved] == [rid]
            t, _ = timed(device, import_once, dec, rid, payload)
            if r == 0:
                ok = check_rows(dec, rid, payload)
            else:
                runs["import"].append(t)
            dec.abort(rid)
            if r > 0 and not args.skip_legacy:
                runs["legacy_export"].append(timed(device, legacy_export, pre.cache, pages, n)[0])
        pre.block_manager.free(seq)
        med = {k: statistics.median(v) for k, v in runs.items() if v}
        row = dict(
            tokens=n,
            payload_bytes=payload.nbytes,
            pinned=payload.data.is_pinned(),
            rows_match=ok,
            first_export_ms=first_export * 1e3,
            **{f"{k}_ms": v * 1e3 for k, v in med.items()},
            **{f"{k}_gbps": payload.nbytes / v / GB for k, v in med.items()},
        )
        rows.append(row)
        legacy = ""
        if "legacy_export_gbps" in row:
            legacy = f", legacy export {row['legacy_export_gbps']:6.2f} GB/s"
        print(
            f"transfer {n:>7d} tokens ({payload.nbytes / 2**30:.2f} GiB): export "
            f"{row['export_gbps']:6.2f} GB/s, import {row['import_gbps']:6.2f} GB/s{legacy}, "
            f"rows {'match' if ok else 'DIFFER'}",
            flush=True,
        )
        del payload
    return rows


def check_rows(dec, rid: str, payload) -> bool:
    """The imported rows in the decode pool equal the payload's (layer 0 and the last F layer)."""
    from serving.engine.kv_copy import slots_of

    seq = dec.seqs[rid]
    c = dec.cache
    slots = slots_of(seq.pages, payload.num_tokens, c.layout.page_size, c.k[0].device)
    same = torch.equal(c.k[0].view(-1, *c.k[0].shape[2:])[slots].cpu(), payload.attn[0])
    last = c.layout.index_layers[-1]
    got = c.index_k[last].view(-1, c.index_k[last].shape[-1])[slots].cpu()
    want = payload.index_k[last]
    return bool(same and torch.equal(got.view(torch.uint8), want.view(torch.uint8)))


# -- decode under imports -------------------------------------------------------------------------
def itl_rows(pre, dec, args, device) -> dict:
    from serving.engine import SamplingParams
    from serving.engine.sequence import SequenceStatus

    vocab = dec.model.config.vocab_size
    total = 2 * args.steps + args.warmup + 4
    run_sp = SamplingParams(temperature=0, max_tokens=total, ignore_eos=True)
    imp_sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    batch = [seat(dec, f"run-{i}", args.decode_context, run_sp, vocab) for i in range(args.batch)]
    h = header_for(pre, args.import_context, seed=7)
    seq = holder(pre, "held-import", args.import_context)
    payload, copy = pre.kv.copier.export(seq.pages, h)
    copy.wait()
    pre.block_manager.free(seq)

    def loop(steps: int, imports: bool) -> tuple[list[float], dict]:
        times, n_done, leaked, current, started, lat = [], 0, 0, None, 0.0, []
        for i in range(steps):
            sync_main(device)
            t0 = time.perf_counter()
            outs = dec.poll_handoffs()
            if imports:
                seq = dec.seqs.get(current) if current else None
                if seq is not None and seq.status is SequenceStatus.RUNNING:
                    dec.abort(current)  # its rows are in: what the import cost is measured
                    lat.append(time.perf_counter() - started)
                    n_done, current = n_done + 1, None
                if current is None:
                    current, started = f"imp-{i}", time.perf_counter()
                    dec.reserve(h, imp_sp, current)
            outs += dec.step()
            for o in outs:
                if o.reserved:
                    dec.fill(o.request_id, payload)
                elif o.request_id.startswith("imp-") and o.token_ids:
                    leaked += 1  # activated within step(): it decoded one row in the batch
            sync_main(device)
            times.append(time.perf_counter() - t0)
            assert len(dec.last_batch.seqs) >= args.batch, "the running batch shrank"
        if current is not None:
            dec.abort(current)
        info = dict(imports_done=n_done, imports_decoded_a_row=leaked)
        if lat:
            info["import_latency_ms_p50"] = statistics.median(lat) * 1e3
            info["import_gbps_under_decode"] = payload.nbytes / statistics.median(lat) / GB
        return times, info

    loop(args.warmup, False)
    base, _ = loop(args.steps, False)
    busy, info = loop(args.steps, True)
    for s in batch:
        dec.abort(s.request_id)

    def q(xs, p):
        return statistics.quantiles(xs, n=100, method="inclusive")[p - 1] if len(xs) > 1 else xs[0]

    out = dict(
        batch=args.batch,
        decode_context=args.decode_context,
        import_context=args.import_context,
        import_bytes=payload.nbytes,
        steps=args.steps,
        itl_p50_ms=q(base, 50) * 1e3,
        itl_p99_ms=q(base, 99) * 1e3,
        itl_p50_ms_importing=q(busy, 50) * 1e3,
        itl_p99_ms_importing=q(busy, 99) * 1e3,
        **info,
    )
    out["p99_importing_over_p50"] = out["itl_p99_ms_importing"] / out["itl_p50_ms"]
    out["target_met"] = out["p99_importing_over_p50"] <= 2.0
    print(
        f"decode b={args.batch} ctx={args.decode_context}: ITL p50 {out['itl_p50_ms']:.2f} ms, "
        f"p99 {out['itl_p99_ms']:.2f} ms; importing {args.import_context}-token payloads: p50 "
        f"{out['itl_p50_ms_importing']:.2f} ms, p99 {out['itl_p99_ms_importing']:.2f} ms "
        f"({out['p99_importing_over_p50']:.2f}x p50; {info['imports_done']} imports)",
        flush=True,
    )
    return out


# -- driver ---------------------------------------------------------------------------------------
def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shape (CI smoke)")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --quick")
    p.add_argument("--contexts", type=int, nargs="+", help="payload sizes in tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, help="running decode sequences")
    p.add_argument("--decode-context", type=int)
    p.add_argument("--import-context", type=int)
    p.add_argument("--steps", type=int, help="decode steps measured, each way")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--layers", type=int, help="fewer layers than the real 47 (plan truncated)")
    p.add_argument("--eager", action="store_true", help="decode without CUDA graphs")
    p.add_argument("--skip-legacy", action="store_true", help="no pageable-export baseline")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    a.device = a.device or ("cpu" if a.quick else "cuda")
    if a.quick:
        a.contexts = a.contexts or [512, 2048]
        a.batch = a.batch or 4
        a.decode_context = a.decode_context or 256
        a.import_context = a.import_context or 512
        a.steps = a.steps or 20
        a.warmup, a.repeats = min(a.warmup, 2), min(a.repeats, 2)
    else:
        a.contexts = a.contexts or [32768, 131072]
        a.batch = a.batch or 16
        a.decode_context = a.decode_context or 8192
        a.import_context = a.import_context or 32768
        a.steps = a.steps or 200
    return a


def main(argv=None) -> dict:
    args = parse(argv)
    device = torch.device(args.device)
    overrides = dict(TINY) if args.quick else dict(GLM_FLASH)
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    n_layers = overrides["num_hidden_layers"]
    plan = (SEARCHED_TINY if args.quick else SEARCHED_47)[:n_layers]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    top = max(*args.contexts, args.import_context)
    overrides["max_position_embeddings"] = max(
        overrides["max_position_embeddings"], top + 64, args.decode_context + 2 * args.steps + 64
    )
    t0 = time.perf_counter()
    model = build_model("glm_moe_dsa", overrides, plan, dtype, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        f"model: {n_layers} layers, plan {plan}, {weights / 2**30:.1f} GiB, "
        f"built in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    max_len = overrides["max_position_embeddings"]
    pre = make_engine(model, device, "prefill", top + 64, 1, max_len, args.eager)
    run_tokens = args.batch * (args.decode_context + 2 * args.steps + args.warmup + 70)
    dec = make_engine(
        model,
        device,
        "decode",
        max(top, args.import_context) + 64 + run_tokens,
        args.batch,
        max_len,
        args.eager,
    )
    for e in (pre, dec):
        fill_random(e.cache)
    report = dict(
        benchmark="kv_transfer",
        title=f"{'tiny' if args.quick else 'GLM-4.7-Flash shape'}, {n_layers} layers, plan "
        f"{plan.count('F')}/{n_layers} F, KV handoff on {device_name(device)}",
        device=device_name(device),
        date=dt.date.today().isoformat(),
        torch=torch.__version__,
        config={k: (v.name if isinstance(v, Path) else v) for k, v in vars(args).items()},
        model=dict(overrides, weights_bytes=weights, plan=plan),
        bytes_per_token=dec.layout.bytes_per_token,
        kv_pool_bytes={"prefill": pre.cache.nbytes, "decode": dec.cache.nbytes},
    )
    out = args.out or RESULTS / f"kv_transfer-{report['device']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report["transfer"] = transfer_rows(pre, dec, args, device)
    out.write_text(json.dumps(report, indent=1))
    report["decode_under_imports"] = itl_rows(pre, dec, args, device)
    report["summary"] = summarize(report)
    out.write_text(json.dumps(report, indent=1))
    print(table(report))
    print(f"wrote {out}")
    return report


def summarize(report: dict) -> dict:
    s = {}
    for r in report["transfer"]:
        for k in ("export_gbps", "import_gbps", "legacy_export_gbps"):
            if k in r:
                s[f"{k.removesuffix('_gbps')}_{r['tokens']}_gbps"] = round(r[k], 3)
    d = report["decode_under_imports"]
    s["itl_p50_ms"] = round(d["itl_p50_ms"], 3)
    s["itl_p99_ms_importing"] = round(d["itl_p99_ms_importing"], 3)
    s["p99_importing_over_p50"] = round(d["p99_importing_over_p50"], 3)
    s["target_met"] = d["target_met"]
    return s


def table(report: dict) -> str:
    lines = [
        "| payload | bytes | export GB/s | import GB/s | legacy export GB/s |",
        "|---|---|---|---|---|",
    ]
    for r in report["transfer"]:
        legacy = f"{r['legacy_export_gbps']:.2f}" if "legacy_export_gbps" in r else "-"
        lines.append(
            f"| {r['tokens']} tokens | {r['payload_bytes'] / 2**30:.2f} GiB | "
            f"{r['export_gbps']:.2f} | {r['import_gbps']:.2f} | {legacy} |"
        )
    d = report["decode_under_imports"]
    lines += [
        "",
        "| decode batch | ITL p50 | ITL p99 | p50 importing | p99 importing | p99 imp / p50 |",
        "|---|---|---|---|---|---|",
        f"| {d['batch']} x {d['decode_context']} | {d['itl_p50_ms']:.2f} ms | "
        f"{d['itl_p99_ms']:.2f} ms | {d['itl_p50_ms_importing']:.2f} ms | "
        f"{d['itl_p99_ms_importing']:.2f} ms | {d['p99_importing_over_p50']:.2f}x |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
