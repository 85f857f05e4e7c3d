"""`indexcache make-tiny --kind glm_moe_dsa OUT`."""

from __future__ import annotations


def register(p) -> None:
    from model.tiny import KINDS

    p.add_argument("--kind", choices=KINDS, default="glm_moe_dsa")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--index-topk-freq",
        type=int,
        default=None,
        help="write an IndexCache plan into config.json (F every N layers)",
    )
    p.add_argument("out")
    p.set_defaults(run=run)


def run(args) -> int:
    from model.tiny import make_tiny

    extra = {"index_topk_freq": args.index_topk_freq} if args.index_topk_freq else {}
    out = make_tiny(args.kind, args.out, seed=args.seed, **extra)
    print(f"wrote tiny {args.kind} checkpoint to {out}")
    return 0
