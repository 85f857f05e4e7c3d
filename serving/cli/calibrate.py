"""`indexcache calibrate --model PATH --data FILE --retain 0.25`: greedy IndexCache layer search.

Writes plan.json (pattern + provenance), trajectory.json (every step, candidate losses, timing),
search_curve.png, and unless --no-overlap, overlap.json and overlap.png to --out.
`--publish` stores the plan in the running plan registry.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path


def add_data_args(p) -> None:
    p.add_argument("--model", required=True, help="local checkpoint directory")
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        help='calibration files: JSONL ({"text"} or {"messages"} lines) or plain text',
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per calibration sequence (default 4 x index_topk; must exceed it)",
    )
    p.add_argument("--num-seqs", type=int, default=8, help="calibration sequences")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(p) -> None:
    add_data_args(p)
    p.add_argument(
        "--retain",
        type=float,
        required=True,
        help="fraction of layers that keep their indexer, in (0, 1], e.g. 0.25",
    )
    p.add_argument(
        "--pipeline-blocks",
        type=int,
        default=1,
        help="P contiguous blocks whose first layers stay F; search within blocks",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default: bfloat16 on cuda, float32 on cpu",
    )
    p.add_argument("--out", default=None, help="output directory (default calibration-<model>)")
    p.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="score every candidate with a full forward (slower; for checking)",
    )
    p.add_argument(
        "--offload-boundaries",
        action="store_true",
        help="keep the per-layer prefix states in host memory (long contexts)",
    )
    p.add_argument("--no-overlap", action="store_true", help="skip the top-k overlap analysis")
    p.add_argument("--publish", action="store_true", help="store the plan in the plan registry")
    p.add_argument(
        "--registry-model",
        default=None,
        help="model name in the registry (default: the checkpoint directory's name)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster of the registry (default: the one `indexcache serve` recorded)",
    )
    p.set_defaults(run=run)


def resolve_device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(name)


def load_data(args, cfg, model_dir: Path):
    """Tokenised calibration rows; seq_len must exceed index_topk or no plan differs from all-F."""
    from model.calibration.data import load_calibration
    from model.tokenizer import Tokenizer

    k = cfg.index_topk
    seq_len = args.seq_len if args.seq_len is not None else 4 * k
    if seq_len <= k:
        raise ValueError(
            f"--seq-len {seq_len} must be greater than the model's index_topk ({k}): "
            "with fewer tokens every key is selected and all plans score the same"
        )
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    return load_calibration(args.data, Tokenizer.from_pretrained(model_dir), seq_len, args.num_seqs)


def _publisher():
    try:
        from serving.plan_registry import publish
    except ImportError as e:
        raise ValueError(
            f"--publish needs the plan registry (serving.plan_registry), which this "
            f"installation lacks ({e})"
        ) from None
    return publish


def run(args) -> int:
    import torch

    from model import IndexCacheConfig, ModelConfig, load_model
    from model.calibration import greedy_search, topk_overlap, write_plan
    from model.calibration.plots import overlap_heatmap, search_curve
    from model.calibration.search import split_blocks, target_full_layers

    model_dir = Path(args.model)
    cfg = ModelConfig.from_pretrained(model_dir)
    n = cfg.num_hidden_layers
    target_full_layers(n, args.retain, len(split_blocks(n, args.pipeline_blocks)))  # fail fast
    publish = _publisher() if args.publish else None
    if publish is not None:  # which cluster: named or recorded by `indexcache serve`, checked now
        from serving.cli.address import resolve

        args.ray_address = resolve(args.ray_address)
    data = load_data(args, cfg, model_dir)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    try:
        model = load_model(model_dir, IndexCacheConfig.all_full(n), dtype=dtype, device=device)
    except ValueError as e:
        raise ValueError(
            f"calibration needs indexer weights on every layer (an all-F checkpoint): {e}"
        ) from None
    result = greedy_search(
        model,
        data.batches(args.batch_size),
        args.retain,
        pipeline_blocks=args.pipeline_blocks,
        reuse_prefix=not args.no_prefix_cache,
        progress=not args.quiet,
        boundary_device="cpu" if args.offload_boundaries else None,
    )

    out = Path(args.out or f"calibration-{model_dir.resolve().name}")
    out.mkdir(parents=True, exist_ok=True)
    traj = {
        "model": model_dir.resolve().name,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,
        **result.to_dict(),
        **data.provenance(),
    }
    (out / "trajectory.json").write_text(json.dumps(traj, indent=1) + "\n")
    search_curve(traj, out / "search_curve.png")
    if not args.no_overlap:
        ov = topk_overlap(model, data.batches(args.batch_size), progress=not args.quiet)
        (out / "overlap.json").write_text(json.dumps(ov, indent=1) + "\n")
        overlap_heatmap(ov, out / "overlap.png")
    now = datetime.now(UTC)
    provenance = {  # registry keys: source, calibration_data_hash, created_at (epoch s)
        "source": "calibration",
        "tool": "indexcache calibrate",
        "model": traj["model"],
        "created_at": now.timestamp(),
        "created_at_utc": now.isoformat(timespec="seconds"),
        **data.provenance(),
        "retain": args.retain,
        "pipeline_blocks": args.pipeline_blocks,
        "dtype": traj["dtype"],
        "base_loss": result.base_loss,
        "final_loss": result.final_loss,
        "loss_trajectory": [{"flipped": s.flipped, "loss": s.loss} for s in result.steps],
    }
    write_plan(out / "plan.json", result.plan, provenance)
    print(
        f"plan {result.plan}: loss {result.base_loss:.4f} (all F) -> {result.final_loss:.4f}; "
        f"{result.candidate_evals} candidate evaluations in {result.seconds:.1f}s "
        f"({traj['candidate_evals_per_s'] or 0:.2f}/s); wrote {out}"
    )
    if publish is not None:
        name = args.registry_model or traj["model"]
        version = publish(name, result.plan, provenance, address=args.ray_address, num_layers=n)
        provenance["registry"] = {"model": name, "version": version}
        write_plan(out / "plan.json", result.plan, provenance)
        print(f"published {name} plan version {version}")
    return 0
