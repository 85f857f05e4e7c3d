"""`indexcache generate --model PATH "prompt" ...`: offline generation."""

from __future__ import annotations


def register(p) -> None:
    p.add_argument("--model", required=True, help="local checkpoint directory")
    p.add_argument("--index-cache", default=None, help='IndexCache pattern, e.g. "FSSF..."')
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("prompt", nargs="+")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from model import load_model
    from model.tokenizer import Tokenizer

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    tok = Tokenizer.from_pretrained(args.model)
    model = load_model(args.model, args.index_cache, dtype=getattr(torch, args.dtype))
    for prompt in args.prompt:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}]) if args.chat else prompt
        ids = tok.encode(text)
        out = []
        with torch.no_grad():  # greedy by full recomputation; the engine does this with a cache
            for _ in range(args.max_tokens):
                nxt = int(model(torch.tensor(ids + out)[None])[0, -1].argmax())
                if nxt in tok.eos_token_ids:
                    break
                out.append(nxt)
        print(f"{prompt!r} -> {tok.decode(out)!r}")
    return 0
