"""Constrained decoding: decode throughput at batch 16 with and without json_schema grammars.

    python -m benchmarks.structured_decode                 # CPU run, tiny GLM-style model
    python -m benchmarks.structured_decode --preset glm-mid --device cuda --dtype bfloat16 \\
        --tokenizer DIR                                    # H200: a real tokenizer's vocabulary

One engine, one pool; rounds alternate between a plain batch (16 requests, greedy, no grammar)
and a constrained one (the same prompts and parameters plus a json_schema grammar, compiled by
the ingress's code, serving/structured.py). The schema keeps every request inside the grammar for
all its tokens (an array of objects with `minItems` beyond reach), so every decode step computes
16 llguidance masks (on a worker thread, overlapping the forward) and applies them on the device.
Decode throughput counts the tokens of decode-only steps over their wall time (CUDA
synchronised); the first step of each round (prefill) is left out. The cost is the median over
rounds of 1 - constrained / plain of a back-to-back pair. Target (issue 15): constrained costs
<= 10% of plain throughput. Every constrained output is checked against its grammar.
Writes benchmarks/results/structured_decode-<device>.json.

The mask's cost grows with the tokenizer's vocabulary (llguidance walks its token trie): the
built-in byte tokenizer (261 tokens) gives a lower bound; pass `--tokenizer` (a directory with a
tokenizer.json, e.g. GLM's 150K vocabulary) for a real one. The model's vocabulary is widened to
the tokenizer's when it is smaller.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.saturation import PRESETS, build_model, device_name, quarter_pattern

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_COST = 0.10
SCHEMA = {
    "type": "array",
    "minItems": 10000,  # the array cannot close within the run: every token is constrained
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "id": {"type": "integer"},
            "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "maxItems": 3},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "id", "tags", "ok"],
        "additionalProperties": False,
    },
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=16, help="requests decoding together")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--gen", type=int, default=64, help="tokens per request")
    p.add_argument("--rounds", type=int, default=7, help="plain/constrained pairs (median)")
    p.add_argument("--tokenizer", type=Path, help="directory with a tokenizer.json")
    p.add_argument("--kernels", choices=["auto", "ref", "triton"], default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", type=Path, help="JSON path (default results/structured_decode-<dev>)")
    args = p.parse_args(argv)
    for k in ("batch", "prompt_tokens", "gen", "rounds"):
        if getattr(args, k) < 1:
            raise SystemExit(f"--{k.replace('_', '-')} must be >= 1")
    return args


def tokenizer(args):
    from model.tiny import SPECIAL_TOKENS, byte_tokenizer
    from model.tokenizer import Tokenizer

    if args.tokenizer is not None:
        return Tokenizer.from_pretrained(args.tokenizer)
    hf = byte_tokenizer()
    return Tokenizer(hf, None, (hf.token_to_id(SPECIAL_TOKENS[0]),))


def make_engine(args, tok, device: torch.device):
    from model.tiny import tiny_config
    from serving.engine import EngineConfig, LLMEngine

    kind, overrides = PRESETS[args.preset][:2]
    own = {**tiny_config(kind), **overrides}
    need = args.prompt_tokens + args.gen + 1
    overrides = {
        **overrides,
        "vocab_size": max(own["vocab_size"], tok.vocab_size),
        "max_position_embeddings": max(own["max_position_embeddings"], need),
    }
    plan = quarter_pattern(own["num_hidden_layers"])  # the served shape: one F layer in four
    model = build_model(kind, overrides, plan, getattr(torch, args.dtype), device)
    page = model.kv_layout().page_size
    cfg = EngineConfig(
        device=str(device),
        max_num_seqs=args.batch,
        max_num_batched_tokens=max(512, args.batch * args.prompt_tokens),
        max_model_len=need,
        num_blocks=args.batch * -(-need // page) + 2,
        enable_prefix_caching=False,  # every round prefills the same prompts from scratch
    )
    return LLMEngine(model, tok, cfg)


def instrument(engine) -> dict[str, float]:
    """Seconds spent in the grammar's parts of a step: on the engine thread, masking the logits
    (waiting for the mask included) and feeding the sampled tokens to the matchers; on the mask
    worker, computing masks (overlapping the forward). Wall-clock throughput on a shared machine
    is noisy; these are measured inside the same steps."""
    spent = {"mask_s": 0.0, "advance_s": 0.0, "worker_s": 0.0}
    sampler = engine.sampler

    def timed(fn, key):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t0

        return wrapper

    sampler._mask = timed(sampler._mask, "mask_s")
    sampler.advance = timed(sampler.advance, "advance_s")
    worker = sampler._worker()
    worker._compute = timed(worker._compute, "worker_s")
    return spent


def run_round(engine, prompts, params, device, spent: dict[str, float]) -> dict:
    """All requests at once; -> decode tokens/s over decode-only steps, and the outputs."""
    ids = [engine.add_request(None, p, params) for p in prompts]
    toks: dict[str, list[int]] = {i: [] for i in ids}
    decode_tokens, decode_s, cpu_s, steps, errors = 0, 0.0, 0.0, 0, []
    grammar = dict.fromkeys(spent, 0.0)
    while engine.has_unfinished():
        before = dict(spent)
        t0, c0 = time.perf_counter(), time.process_time()
        outs = engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt_s, dc_s = time.perf_counter() - t0, time.process_time() - c0
        batch = engine.last_batch
        if batch and all(n == 1 for n in batch.num_new):
            decode_tokens += sum(len(o.token_ids) for o in outs)
            decode_s += dt_s
            cpu_s += dc_s
            steps += 1
            for k in grammar:
                grammar[k] += spent[k] - before[k]
        for o in outs:
            toks[o.request_id] += o.token_ids
            if o.error is not None:
                errors.append(repr(o.error))
    return dict(
        decode_tok_s=decode_tokens / decode_s if decode_s else 0.0,
        # per CPU second of the whole process (mask thread included): what a loaded shared
        # machine's scheduling does not move
        decode_tok_cpu_s=decode_tokens / cpu_s if cpu_s else 0.0,
        decode_steps=steps,
        step_ms=1e3 * decode_s / max(steps, 1),
        # engine thread: grammar share of the decode steps' wall time; worker: mask ms per step
        grammar_share=(grammar["mask_s"] + grammar["advance_s"]) / decode_s if decode_s else 0.0,
        mask_worker_ms=1e3 * grammar["worker_s"] / max(steps, 1),
        tokens=list(toks.values()),
        errors=errors,
    )


def conforms(grammar: str, tokens: list[list[int]], engine) -> bool:
    """Each output is a prefix the grammar accepts (llguidance consumes every token)."""
    import llguidance

    from serving.engine.grammar import ll_tokenizer

    lltok = ll_tokenizer(engine.tokenizer, engine.model.config.vocab_size, engine.sampler.eos_ids)
    for t in tokens:
        m = llguidance.LLMatcher(lltok, grammar, log_level=0)
        if not all(m.consume_token(x) for x in t) or m.is_error():
            return False
    return True


def main(argv: list[str] | None = None) -> dict:
    from kernels.dispatch import set_backend
    from serving.engine import SamplingParams
    from serving.structured import _json_grammar

    args = parse(argv)
    set_backend(args.kernels)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tok = tokenizer(args)
    engine = make_engine(args, tok, device)
    g = torch.Generator().manual_seed(0)
    vocab = tok.vocab_size
    prompts = [
        torch.randint(5, vocab, (args.prompt_tokens,), generator=g).tolist()
        for _ in range(args.batch)
    ]
    grammar = _json_grammar(SCHEMA)
    base = dict(temperature=0.0, max_tokens=args.gen, ignore_eos=True)
    plain, constrained = SamplingParams(**base), SamplingParams(**base, grammar=grammar)
    spent = instrument(engine)
    # Warm-up: first-call costs and the llguidance tokenizer (built once per vocabulary).
    for sp in (plain, constrained):
        warm = SamplingParams(**{**base, "max_tokens": 4}, grammar=sp.grammar)
        run_round(engine, prompts[:2], warm, device, spent)
    from serving.engine.grammar import FUSED

    FUSED.wait(torch.device(device))  # a server compiles it in the background once per process
    rounds = [
        dict(
            plain=run_round(engine, prompts, plain, device, spent),
            constrained=run_round(engine, prompts, constrained, device, spent),
        )
        for _ in range(args.rounds)
    ]
    p_tps = statistics.median(r["plain"]["decode_tok_s"] for r in rounds)
    c_tps = statistics.median(r["constrained"]["decode_tok_s"] for r in rounds)
    # Each round's pair ran back to back: the median of the paired costs is robust to a shared
    # machine's load drifting between rounds.
    paired = [1 - r["constrained"]["decode_tok_s"] / r["plain"]["decode_tok_s"] for r in rounds]
    cost = statistics.median(paired)
    last = rounds[-1]["constrained"]
    ok = not last["errors"] and conforms(grammar, last["tokens"], engine)
    full = all(len(t) == args.gen for r in rounds for v in r.values() for t in v["tokens"])
    con = [r["constrained"] for r in rounds]
    summary = dict(
        plain_decode_tok_s=p_tps,
        constrained_decode_tok_s=c_tps,
        cost=cost,
        meets_target=cost <= TARGET_COST,
        paired_cost_range=[min(paired), max(paired)],
        grammar_share_of_step=statistics.median(c["grammar_share"] for c in con),
        mask_worker_ms_per_step=statistics.median(c["mask_worker_ms"] for c in con),
        constrained_step_ms=statistics.median(c["step_ms"] for c in con),
        outputs_conform=ok,
        all_requests_full_length=full,
        sample=tok.decode(last["tokens"][0])[:120],
    )
    print(
        f"batch {args.batch}: plain {p_tps:.1f} tok/s, constrained {c_tps:.1f} tok/s, "
        f"cost {100 * cost:.1f}% (target <= {100 * TARGET_COST:.0f}%), conform {ok}; grammar "
        f"{100 * summary['grammar_share_of_step']:.1f}% of a constrained step on the engine "
        f"thread, masks {summary['mask_worker_ms_per_step']:.2f} ms/step on the worker"
    )
    for r in rounds:
        for v in r.values():
            v.pop("tokens")
    report = dict(
        benchmark="structured_decode",
        device=device_name(device),
        date=dt.date.today().isoformat(),
        torch=torch.__version__,
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        vocab_size=engine.model.config.vocab_size,
        tokenizer_vocab=tok.vocab_size,
        schema=SCHEMA,
        target_cost=TARGET_COST,
        summary=summary,
        rounds=rounds,
    )
    engine.sampler.shutdown()
    out = args.out or RESULTS / f"structured_decode-{report['device']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
