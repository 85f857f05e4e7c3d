"""The SmolLM2-135M DSA quality study, end to end, in resumable stages (issue 7).

    python -m benchmarks.quality.pipeline --data DIR --work DIR --out DIR [--gguf FILE] \\
        --stages convert warmup search distill overlap eval --budget-s 540

1. convert  GGUF -> dsa_llama checkpoint with seeded random indexers (`work/base`)
2. warmup   DSA dense warm-up: every layer's indexer learns KL(head-summed attention || softmax
            of its scores) on train windows, the rest frozen -> `work/all-F` (trained indexers)
3. search   greedy layer selection (paper Algorithm 1) on calibration windows down to 1/8; the
            1/2 and 1/4 plans are points of the same trajectory (`work/plans/`)
4. distill  training-aware IndexCache for the uniform 1/4 plan: its F indexers (from the warm-up)
            learn the multi-layer loss over the layers they serve -> `work/ta-1of4`
5. overlap  top-k overlap of every layer pair on calibration windows (heatmap)
6. eval     held-out perplexity at each length and needle retrieval, for dense, all-F, uniform and
            searched 1/2, 1/4, 1/8 and the training-aware uniform 1/4

Every stage skips itself when its output exists, so a run cut by a time limit resumes. Training
stages stop early when the stage's share of --budget-s is spent (the step count reached is
recorded). Small results go to --out: indexer weights (bf16, weights_proj fp32), plans, JSON, PNGs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

# fp32 training: Triton's fp32 dots would otherwise run in TF32, which flips near-tied top-k picks
# against the reference path (seen on the H200: 1.3e-2 logits error at SmolLM2's shapes).
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

STAGES = ("convert", "warmup", "search", "distill", "overlap", "eval")
FRACTIONS = (1 / 2, 1 / 4, 1 / 8)


def log(msg: str) -> None:
    print(f"[pipeline {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def windows(tokens: np.ndarray, offsets: np.ndarray, length: int, count: int, seed: int):
    """`count` windows [count, length] inside single documents, seeded."""
    rng = np.random.default_rng(seed)
    starts = []
    bounds = list(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True))
    long_docs = [(a, b) for a, b in bounds if b - a >= length]
    if not long_docs:
        raise ValueError(f"no document has {length} tokens")
    for _ in range(count):
        a, b = long_docs[int(rng.integers(len(long_docs)))]
        s = int(rng.integers(a, b - length + 1))
        starts.append(tokens[s : s + length].astype(np.int64))
    return torch.from_numpy(np.stack(starts))


def split(data: Path, name: str):
    return np.load(data / f"{name}.npy", mmap_mode="r"), np.load(data / f"{name}_offsets.npy")


def load(path: Path, plan=None, dtype=torch.float32):
    from model import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_model(path, plan, dtype=dtype, device=device)


def train_indexers(
    model,
    batches: torch.Tensor,
    steps: int,
    loss: str,
    lr: float,
    budget_s: float,
    out: Path,
    batch_size: int,
) -> dict:
    """Distil until `steps` or the time budget; returns the stage record."""
    from model.calibration.distill import DistillConfig, IndexerDistiller

    groups = [batches[i : i + batch_size] for i in range(0, len(batches), batch_size)]
    d = IndexerDistiller(
        model, DistillConfig(steps=1, lr=lr, loss=loss, chunk=512, checkpoint_every=10**9)
    )
    t0, done = time.time(), 0
    while d.step < steps:
        # Grow the target in slices so the budget check runs between slices.
        d.cfg = replace(d.cfg, steps=min(steps, d.step + 10))
        d.train(groups, progress=False)
        done = d.step
        rate = (time.time() - t0) / done
        log(f"{loss}: step {done}/{steps} loss {d.history[-1]['loss']:.4f} ({rate:.2f} s/step)")
        if time.time() - t0 + 10 * rate > budget_s:
            log(f"{loss}: time budget reached after {done} steps")
            break
    d.save(out)
    first = sum(h["loss"] for h in d.history[:5]) / min(5, len(d.history))
    last = sum(h["loss"] for h in d.history[-5:]) / min(5, len(d.history))
    return {
        "steps": done,
        "steps_requested": steps,
        "lr": lr,
        "loss": loss,
        "batch_size": batch_size,
        "seq_len": int(batches.shape[1]),
        "loss_first5": first,
        "loss_last5": last,
        "seconds": round(time.time() - t0, 1),
        "history": [{"step": h["step"], "loss": h["loss"]} for h in d.history],
    }


def check_kernels(path: Path, data: Path) -> str:
    """On CUDA, compare Triton and reference logits once on a held-out window; fall back to the
    reference kernels (slower, same math) if they disagree, so a long run never rests on a kernel
    that was not checked at this model's shapes."""
    import kernels

    if not torch.cuda.is_available():
        return "ref"
    model = load(path)
    tokens, offsets = split(data, "heldout")
    ids = windows(tokens, offsets, 1024, 1, 0).to(model.device)
    out = {}
    try:
        for impl in ("ref", "triton"):
            kernels.set_backend(impl)
            with torch.no_grad():
                out[impl] = model(ids).float()
        err = float((out["triton"] - out["ref"]).norm() / out["ref"].norm())
    except Exception as e:  # noqa: BLE001 - any kernel failure means: use the reference
        log(f"triton kernels failed on this model ({e!r}); using the reference kernels")
        kernels.set_backend("ref")
        return "ref"
    ok = err < 1e-2
    log(f"triton vs reference logits: rel err {err:.2e} -> {'triton' if ok else 'ref'}")
    kernels.set_backend("triton" if ok else "ref")
    return "triton" if ok else "ref"


def export_indexers(src: Path, dst: Path, meta: dict) -> Path:
    """Indexer weights in bf16 (weights_proj stays fp32), with the metadata convert reads."""
    t = load_file(str(src / "indexer.safetensors"))
    t = {k: v.float() if k.endswith("weights_proj.weight") else v.bfloat16() for k, v in t.items()}
    save_file(t, str(dst), metadata={k: str(v) for k, v in meta.items()})
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.quality.pipeline", description=__doc__.splitlines()[0]
    )
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--gguf", default=None)
    p.add_argument(
        "--stages",
        nargs="*",
        default=list(STAGES),
        choices=STAGES,
        help="none: only bundle what exists into --out",
    )
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock for this invocation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index-n-heads", type=int, default=4)
    p.add_argument("--index-head-dim", type=int, default=64)
    p.add_argument("--index-topk", type=int, default=256)
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--warmup-seq", type=int, default=2048)
    p.add_argument("--warmup-batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--distill-steps", type=int, default=200)
    p.add_argument("--calib-seqs", type=int, default=4)
    p.add_argument("--calib-seq", type=int, default=2048)
    p.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192])
    p.add_argument("--windows", nargs="+", type=int, default=[8, 6, 4])
    p.add_argument("--needles", nargs="+", type=int, default=[10, 8, 6])
    args = p.parse_args(argv)
    t_start = time.time()
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 training of a frozen model: TF32 is fine
    torch.manual_seed(args.seed)
    work, out = args.work, args.out
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    record_path = work / "record.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    # file names only: the record is committed and must not carry machine paths
    record.setdefault("args", {}).update(
        {
            k: (Path(v).name if k in ("data", "work", "out", "gguf") and v else str(v))
            for k, v in vars(args).items()
        }
    )
    if torch.cuda.is_available():
        record["device"] = torch.cuda.get_device_name()
    remaining = lambda: args.budget_s - (time.time() - t_start)  # noqa: E731

    def save_record():
        record_path.write_text(json.dumps(record, indent=1))

    base, all_f, ta = work / "base", work / "all-F", work / "ta-1of4"
    plans_dir = work / "plans"
    n_layers = 30
    if "convert" in args.stages and not (base / "config.json").is_file():
        from model.gguf import convert_gguf

        convert_gguf(
            base,
            args.gguf,
            index_n_heads=args.index_n_heads,
            index_head_dim=args.index_head_dim,
            index_topk=args.index_topk,
            seed=args.seed,
        )
        log("converted")
    meta = {"index_topk": args.index_topk, "index_rope_head_dim": args.index_head_dim // 2}
    if args.stages:
        record.setdefault("kernels", []).append(check_kernels(base, args.data))

    if "warmup" in args.stages and not (all_f / "config.json").is_file():
        model = load(base)
        n_layers = model.config.num_hidden_layers
        tokens, offsets = split(args.data, "train")
        n = args.warmup_steps * args.warmup_batch
        batches = windows(tokens, offsets, args.warmup_seq, n, args.seed)
        share = 0.5 * remaining() if "search" in args.stages else 0.9 * remaining()
        record["warmup"] = train_indexers(
            model,
            batches,
            args.warmup_steps,
            "single",
            args.lr,
            share,
            work / "warmup",
            args.warmup_batch,
        )
        export_indexers(work / "warmup", out / "indexers-all-F.safetensors", meta)
        from model.gguf import convert_gguf

        convert_gguf(all_f, args.gguf, indexers=out / "indexers-all-F.safetensors")
        save_record()
        del model

    if "search" in args.stages and not (plans_dir / "searched-1of8.json").is_file():
        from model.calibration.plan_file import write_plan
        from model.calibration.plots import search_curve
        from model.calibration.search import greedy_search, target_full_layers

        model = load(all_f)
        n_layers = model.config.num_hidden_layers
        tokens, offsets = split(args.data, "calib")
        batches = list(windows(tokens, offsets, args.calib_seq, args.calib_seqs, args.seed + 1))
        result = greedy_search(model, [b[None] for b in batches], min(FRACTIONS), progress=False)
        traj = result.to_dict()
        plans_dir.mkdir(exist_ok=True)
        (plans_dir / "trajectory.json").write_text(json.dumps(traj, indent=1))
        search_curve(traj, plans_dir / "search-loss-curve.png")
        calib_hash = hashlib.sha256(torch.stack(batches).numpy().tobytes()).hexdigest()
        for f in FRACTIONS:
            plan = result.plan_at(target_full_layers(n_layers, f))
            write_plan(
                plans_dir / f"searched-1of{round(1 / f)}.json",
                plan,
                {
                    "source": "calibration",
                    "calibration_data_hash": calib_hash,
                    "calib_seqs": args.calib_seqs,
                    "calib_seq": args.calib_seq,
                    "seed": args.seed,
                    "created_at": time.time(),
                },
            )
        record["search"] = {
            "seconds": round(result.seconds, 1),
            "evals": result.candidate_evals,
            "evals_per_s": result.candidate_evals / max(result.seconds, 1e-9),
            "base_loss": result.base_loss,
            "final_loss": result.final_loss,
        }
        save_record()
        del model

    if "distill" in args.stages and not (ta / "config.json").is_file():
        from model.index_cache import IndexCacheConfig

        model = load(all_f)
        n_layers = model.config.num_hidden_layers
        uniform = IndexCacheConfig.from_freq(n_layers, 4, 1)
        del model
        model = load(all_f, uniform.pattern)
        tokens, offsets = split(args.data, "train")
        n = args.distill_steps * args.warmup_batch
        batches = windows(tokens, offsets, args.warmup_seq, n, args.seed + 2)
        share = 0.6 * remaining() if "eval" in args.stages else 0.9 * remaining()
        record["distill"] = train_indexers(
            model,
            batches,
            args.distill_steps,
            "multi",
            args.lr / 3,
            share,
            work / "distill",
            args.warmup_batch,
        )
        record["distill"]["pattern"] = uniform.pattern
        export_indexers(
            work / "distill",
            out / "indexers-ta-1of4.safetensors",
            {**meta, "index_topk_pattern": uniform.pattern},
        )
        from model.gguf import convert_gguf

        convert_gguf(ta, args.gguf, indexers=out / "indexers-ta-1of4.safetensors")
        save_record()
        del model

    if "overlap" in args.stages and not (work / "overlap.json").is_file():
        from model.calibration.overlap import topk_overlap
        from model.calibration.plots import overlap_heatmap

        model = load(all_f, dtype=torch.bfloat16)
        tokens, offsets = split(args.data, "calib")
        batches = windows(tokens, offsets, args.calib_seq, args.calib_seqs, args.seed + 1)
        ov = topk_overlap(model, [b[None] for b in batches], progress=False)
        (work / "overlap.json").write_text(json.dumps(ov, indent=1))
        overlap_heatmap(ov, work / "overlap-heatmap.png")
        record["overlap"] = {"adjacent_mean": ov["adjacent_mean"], "rows": ov["rows"]}
        save_record()
        del model

    if "eval" in args.stages and not (work / "eval.json").is_file():
        from dataclasses import asdict

        from benchmarks.quality.eval import evaluate, summary

        if len(args.windows) != len(args.lengths) or len(args.needles) != len(args.lengths):
            raise ValueError("--windows and --needles need one count per --lengths entry")
        plans = ["dense", "all-F", "uniform:2", "uniform:4", "uniform:8"] + [
            str(plans_dir / f"searched-1of{round(1 / f)}.json") for f in FRACTIONS
        ]
        rows = []
        for length, w, k in zip(args.lengths, args.windows, args.needles, strict=True):
            rows += evaluate(
                str(all_f), str(args.data), plans, [length], w, k, args.seed, progress=False
            )
            ta_rows = evaluate(
                str(ta), str(args.data), ["uniform:4"], [length], w, k, args.seed, progress=False
            )
            for r in ta_rows:
                r.plan = "ta-uniform-1/4"
            rows += ta_rows
            # Written after every length: a run cut by the time limit keeps what it measured.
            (work / "eval-partial.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
            log(f"eval done at {length} ({remaining():.0f} s left)")
        (work / "eval.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
        print(summary(rows))

    # Everything small travels back in one archive (the device returns at most 8 files).
    bundle = work / "bundle"
    bundle.mkdir(exist_ok=True)
    for f in [
        record_path,
        work / "overlap.json",
        work / "overlap-heatmap.png",
        work / "eval.json",
        work / "eval-partial.json",
        *sorted(plans_dir.glob("*")),
    ]:
        if f.is_file():
            shutil.copy(f, bundle / f.name)
    for d in ("warmup", "distill"):
        state = work / d / "state.json"
        if state.is_file():
            shutil.copy(state, bundle / f"{d}-state.json")
    shutil.make_archive(str(out / "results"), "gztar", bundle)
    log(f"done in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
