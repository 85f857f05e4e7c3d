"""`indexcache generate --model PATH "prompt" ...`: offline generation with the engine."""

from __future__ import annotations


def register(p) -> None:
    p.add_argument("--model", required=True, help="local checkpoint directory")
    p.add_argument("--index-cache", default=None, help='IndexCache pattern, e.g. "FSSF..."')
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=512,
        help="token budget per step (the prefill chunk size)",
    )
    p.add_argument("--kv-memory-gb", type=float, default=None, help="KV pool budget in GiB")
    p.add_argument("prompt", nargs="+")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from serving.engine import LLMEngine, SamplingParams

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    kv = int(args.kv_memory_gb * (1 << 30)) if args.kv_memory_gb else None
    engine = LLMEngine.from_pretrained(
        args.model,
        args.index_cache,
        dtype=getattr(torch, args.dtype),
        device=args.device,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_memory_bytes=kv,
    )
    tok = engine.tokenizer
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}]) if args.chat else p
        for p in args.prompt
    ]
    outputs = engine.generate(texts, params, use_tqdm=len(texts) > 1)
    for prompt, out in zip(args.prompt, outputs, strict=True):
        print(f"{prompt!r} -> {out.text!r}")
    return 0
