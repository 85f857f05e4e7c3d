"""`indexcache plans list|show|publish`: the IndexCache plan registry of a running cluster.

Publishing a plan rolls it out to every deployment that follows `plan_version: latest`. The
plan is checked against the served model first (F/S letters, layer 0 F, one letter per layer of
a model some replica serves); a plan that cannot run is refused and nothing changes. The cluster
is `--address` or the one the running `indexcache serve` recorded, never a guess.
"""

from __future__ import annotations

import json


def register(p) -> None:
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: the cluster the running `indexcache serve` recorded)",
    )
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
    pb.add_argument("--num-layers", type=int, default=None, help="the model's layer count")
    pb.add_argument(
        "--checkpoint", default=None, help="read the layer count from this checkpoint's config.json"
    )
    pb.add_argument("--source", choices=["freq", "pattern", "calibration"], default=None)
    pb.add_argument("--calibration-hash", default=None, help="hash of the calibration data set")
    p.set_defaults(run=run)


def _num_layers(args) -> int | None:
    if args.num_layers is not None:
        return args.num_layers
    if args.checkpoint:
        from model.config import ModelConfig

        return ModelConfig.from_pretrained(args.checkpoint).num_hidden_layers
    return None


def _plan(args, n: int | None):
    from model.index_cache import IndexCacheConfig
    from serving import plan_registry as reg

    if args.pattern:
        return IndexCacheConfig(args.pattern), {}
    n = n if n is not None else reg.model_layers(args.model)
    if n is None:
        raise ValueError(
            f"--freq needs the layer count: model {args.model!r} is not served on this "
            "cluster; pass --num-layers or --checkpoint"
        )
    return IndexCacheConfig.from_freq(n, args.freq, args.offset), {
        "freq": args.freq,
        "offset": args.offset,
    }


def run(args) -> int:
    from serving import plan_registry as reg
    from serving.cli.address import resolve
    from serving.env import apply_ray_local_env

    address = resolve(args.address)
    apply_ray_local_env()
    reg.connect(address)
    if args.plans_command == "publish":
        n = _num_layers(args)
        plan, details = _plan(args, n)
        source = args.source or ("pattern" if args.pattern else "freq")
        prov = reg.Provenance(source, args.calibration_hash, details=details)
        version = reg.publish(args.model, plan, prov, num_layers=n)
        print(f"published {args.model} v{version}: {plan.pattern}")
    elif args.plans_command == "show":
        print(json.dumps(reg.show(args.model, args.version).summary(), indent=2))
    else:
        records = reg.list_plans(args.model)
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
