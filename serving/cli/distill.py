"""`indexcache distill --model PATH --data FILE --plan plan.json --out DIR`: train the F layers'
indexers towards the attention of the layers they serve (training-aware IndexCache), all other
weights frozen. Checkpoints to --out (resume with --resume); --export writes a servable checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path


def register(p) -> None:
    from serving.cli.calibrate import add_data_args

    add_data_args(p)
    p.add_argument("--out", required=True, help="checkpoint directory (indexer weights, optimizer)")
    p.add_argument("--plan", default=None, help="plan.json from `indexcache calibrate`")
    p.add_argument(
        "--index-cache",
        default=None,
        help='plan as a pattern, e.g. "FSSF..." (default: the checkpoint\'s own plan)',
    )
    p.add_argument(
        "--loss",
        default="multi",
        choices=["multi", "single"],
        help="multi: F layer learns its S layers' attention too (paper); single: DSA "
        "warm-up on its own layer",
    )
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--chunk", type=int, default=256, help="query rows per loss tile")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--export", default=None, help="write a full checkpoint with the plan here")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from model import ModelConfig, load_model
    from model.calibration import DistillConfig, IndexerDistiller, export_checkpoint, read_plan
    from model.calibration.plots import distill_curve
    from serving.cli.calibrate import load_data, resolve_device

    if args.plan and args.index_cache:
        raise ValueError("give --plan or --index-cache, not both")
    dcfg = DistillConfig(
        steps=args.steps,
        lr=args.lr,
        loss=args.loss,
        chunk=args.chunk,
        checkpoint_every=args.checkpoint_every,
    )
    model_dir, out = Path(args.model), Path(args.out)
    if (out / "state.json").is_file() and not args.resume:
        raise ValueError(
            f"--out {out} already holds a checkpoint: pass --resume or choose another directory"
        )
    cfg = ModelConfig.from_pretrained(model_dir)
    plan = read_plan(args.plan, cfg.num_hidden_layers) if args.plan else args.index_cache
    data = load_data(args, cfg, model_dir)
    model = load_model(
        model_dir, plan, dtype=getattr(torch, args.dtype), device=resolve_device(args.device)
    )
    trainer = IndexerDistiller(model, dcfg)
    meta = {"model": model_dir.resolve().name, **data.provenance()}
    if args.resume:
        trainer.load(out)
        saved = json.loads((out / "state.json").read_text()).get("calibration_data_hash")
        if saved != data.sha256:
            raise ValueError(
                f"resume: the calibration data differs from the checkpoint's "
                f"(sha256 {saved} vs {data.sha256})"
            )
    batches = data.batches(args.batch_size)
    before, _ = trainer.batch_loss(batches[0], backward=False)
    history = trainer.train(batches, out, progress=not args.quiet, meta=meta)
    after, _ = trainer.batch_loss(batches[0], backward=False)
    distill_curve(history, out / "loss.png")
    print(
        f"plan {model.plan}: indexer loss on batch 0 {before:.5f} -> {after:.5f} after "
        f"{trainer.step} steps; checkpoint in {out}"
    )
    if args.export:
        export_checkpoint(model, model_dir, args.export)
        print(f"exported servable checkpoint to {args.export}")
    return 0
