"""`indexcache plans list|show|publish`: the IndexCache plan registry of a running cluster.

Publishing a plan rolls it out to every deployment that follows `plan_version: latest`.
"""

from __future__ import annotations

import json


def register(p) -> None:
    p.add_argument("--address", default=None, help="Ray cluster address (default: the local one)")
    sub = p.add_subparsers(dest="plans_command", required=True)
    ls = sub.add_parser("list", help="every plan version, per model")
    ls.add_argument("--model", default=None)
    ls.add_argument("--json", action="store_true")
    sh = sub.add_parser("show", help="one plan (default: the latest version)")
    sh.add_argument("model")
    sh.add_argument("--version", type=int, default=None)
    pb = sub.add_parser("publish", help="store a new plan version for a served model")
    pb.add_argument("model", help="served model name (what clients send as `model`)")
    how = pb.add_mutually_exclusive_group(required=True)
    how.add_argument("--pattern", help='one F/S letter per layer, e.g. "FSSFSSFS"')
    how.add_argument("--freq", type=int, help="F every N layers (transformers' index_topk_freq)")
    pb.add_argument("--offset", type=int, default=2, help="index_skip_topk_offset for --freq")
    pb.add_argument("--num-layers", type=int, default=None, help="layer count for --freq")
    pb.add_argument("--checkpoint", default=None, help="read the layer count from this config.json")
    pb.add_argument("--source", choices=["freq", "pattern", "calibration"], default=None)
    pb.add_argument("--calibration-hash", default=None, help="hash of the calibration data set")
    p.set_defaults(run=run)


def _plan(args):
    from model.index_cache import IndexCacheConfig

    if args.pattern:
        return IndexCacheConfig(args.pattern), {}
    n = args.num_layers
    if n is None and args.checkpoint:
        from model.config import ModelConfig

        n = ModelConfig.from_pretrained(args.checkpoint).num_hidden_layers
    if n is None:
        raise ValueError("--freq needs --num-layers or --checkpoint")
    return IndexCacheConfig.from_freq(n, args.freq, args.offset), {
        "freq": args.freq,
        "offset": args.offset,
    }


def run(args) -> int:
    from serving import plan_registry as reg
    from serving.env import apply_ray_local_env

    apply_ray_local_env()
    if args.plans_command == "publish":
        plan, details = _plan(args)
        source = args.source or ("pattern" if args.pattern else "freq")
        prov = reg.Provenance(source, args.calibration_hash, details=details)
        version = reg.publish(args.model, plan, prov, address=args.address)
        print(f"published {args.model} v{version}: {plan.pattern}")
    elif args.plans_command == "show":
        print(
            json.dumps(reg.show(args.model, args.version, address=args.address).summary(), indent=2)
        )
    else:
        records = reg.list_plans(args.model, address=args.address)
        if args.json:
            print(json.dumps([r.summary() for r in records], indent=2))
        elif not records:
            print("no plans")
        for r in [] if args.json else records:
            p = r.provenance
            print(
                f"{r.model}  v{r.version}  {r.pattern}  ({r.pattern.count('F')}/{len(r.pattern)}"
                f" F)  {p.source}  {r.plan_id}"
            )
    return 0
