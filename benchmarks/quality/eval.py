"""Quality of a DSA checkpoint under IndexCache plans: held-out perplexity and needle retrieval.

    python -m benchmarks.quality.eval --model CKPT --data DIR \\
        --plans dense all-F uniform:4 plans/searched-1of4.json --lengths 2048 4096 8192 \\
        --windows 16 --needles 20 --out rows.json

Plans: `dense` (one indexer with top-k >= the context, so attention is exactly dense: the original
model), `all-F`, `uniform:N` (F on every N-th layer from layer 0), `freq:N:OFFSET` (the HF
`index_topk_freq` rule), an F/S pattern string, or a plan .json with `index_topk_pattern`.

Perplexity: non-overlapping windows of each length inside held-out documents (a window never
crosses a document boundary), picked with a seeded shuffle and then round-robin over documents so
few windows still cover many documents. Every window is scored from its first token.

Needle: a "The secret passcode is NNNN." sentence inserted at a sentence boundary near a set depth
of a held-out haystack, then a question; the answer is scored by greedy exact match. Greedy
decoding reproduces the answer iff the argmax at every answer position matches it under teacher
forcing, so one forward pass scores it (no decode loop) with the same result.

Runs on CPU (a few windows) and CUDA; needs torch, numpy, safetensors, tokenizers only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Rows whose logits exist at once: bounds the fp32 [rows, vocab] tile of the loss.
LOSS_ROWS = 2048
NEEDLE = "\n\nThe secret passcode is {code}.\n\n"
QUESTION = "\n\nWhat is the secret passcode mentioned in the text above? The secret passcode is"
ANSWER = " {code}"
BOUNDARY_SEARCH = 256  # tokens either side of the target depth searched for a sentence end


# -- data ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Heldout:
    tokens: np.ndarray  # uint16, all held-out documents back to back
    offsets: np.ndarray  # int64 [docs + 1]

    @classmethod
    def load(cls, data_dir: str | Path, split: str = "heldout") -> Heldout:
        d = Path(data_dir)
        for name in (f"{split}.npy", f"{split}_offsets.npy"):
            if not (d / name).is_file():
                raise FileNotFoundError(
                    f"{d / name} not found: build it with "
                    "python -m benchmarks.quality.data --out DIR"
                )
        return cls(np.load(d / f"{split}.npy", mmap_mode="r"), np.load(d / f"{split}_offsets.npy"))

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def pick_windows(data: Heldout, length: int, count: int, seed: int) -> list[tuple[int, int]]:
    """(doc, start) of `count` non-overlapping windows: seeded order, round-robin over docs."""
    rng = np.random.default_rng(seed)
    per_doc = []
    for i, n in enumerate(data.lengths):
        starts = [i_ * length for i_ in range(int(n) // length)]
        if starts:
            rng.shuffle(starts)
            per_doc.append([(i, s) for s in starts])
    if not per_doc:
        raise ValueError(f"no held-out document has {length} tokens")
    order = rng.permutation(len(per_doc))
    out = []
    depth = 0
    while len(out) < count and any(depth < len(w) for w in per_doc):
        out += [per_doc[j][depth] for j in order if depth < len(per_doc[j])]
        depth += 1
    if len(out) < count:
        raise ValueError(f"only {len(out)} windows of {length} tokens exist, {count} asked")
    return out[:count]


# -- plans --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanSpec:
    name: str
    pattern: str
    dense: bool = False  # top-k raised to the context length: exact dense attention

    @property
    def retention(self) -> float:
        return self.pattern.count("F") / len(self.pattern)


def parse_plan(spec: str, num_layers: int) -> PlanSpec:
    from model.index_cache import IndexCacheConfig

    if spec == "dense":
        return PlanSpec("dense", "F" + "S" * (num_layers - 1), dense=True)
    if spec in ("all-F", "all-full"):
        return PlanSpec("all-F", "F" * num_layers)
    if spec.startswith("uniform:"):
        n = _int(spec.split(":", 1)[1], spec)
        return PlanSpec(f"uniform-1/{n}", IndexCacheConfig.from_freq(num_layers, n, 1).pattern)
    if spec.startswith("freq:"):
        parts = spec.split(":")
        if len(parts) != 3:
            raise ValueError(f"plan {spec!r}: use freq:N:OFFSET")
        plan = IndexCacheConfig.from_freq(num_layers, _int(parts[1], spec), _int(parts[2], spec))
        return PlanSpec(spec, plan.pattern)
    if spec.endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"plan file {spec} not found")
        doc = json.loads(path.read_text())
        pattern = doc.get("index_topk_pattern") if isinstance(doc, dict) else None
        if not isinstance(pattern, str):
            raise ValueError(f"plan file {spec} has no 'index_topk_pattern' string")
        return PlanSpec(path.stem, IndexCacheConfig.from_pattern(pattern, num_layers).pattern)
    return PlanSpec(spec, IndexCacheConfig.from_pattern(spec, num_layers).pattern)


def _int(s: str, spec: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"plan {spec!r}: {s!r} is not an integer") from None


def load_for_plan(model_dir: str | Path, plan: PlanSpec, dtype, device, context: int):
    from model import load_model

    model = load_model(model_dir, plan.pattern, dtype=dtype, device=device)
    if plan.dense:
        for layer in model.model.layers:
            if layer.self_attn.indexer is not None:
                layer.self_attn.indexer.topk = max(context, layer.self_attn.indexer.topk)
    return model


# -- scoring ------------------------------------------------------------------------------------
@torch.no_grad()
def token_logprobs(model, ids: torch.Tensor, targets: torch.Tensor | None = None):
    """ids [B, S] -> (next-token NLL [B, S-1] fp32, argmax [B, S-1]) of the model."""
    from model.dsa import scratch_context

    b, s = ids.shape
    ctx = scratch_context(model, b, s)
    h = model.hidden_states(ids.reshape(-1).to(model.device), ctx).view(b, s, -1)[:, :-1]
    tgt = ids[:, 1:].to(model.device)
    flat_h, flat_t = h.reshape(-1, h.shape[-1]), tgt.reshape(-1)
    nll = torch.empty(flat_t.shape, dtype=torch.float32, device=model.device)
    top = torch.empty(flat_t.shape, dtype=torch.long, device=model.device)
    for r in range(0, flat_t.shape[0], LOSS_ROWS):
        logits = model.lm_head(flat_h[r : r + LOSS_ROWS]).float()
        nll[r : r + LOSS_ROWS] = F.cross_entropy(
            logits, flat_t[r : r + LOSS_ROWS], reduction="none"
        )
        top[r : r + LOSS_ROWS] = logits.argmax(-1)
    return nll.view(b, s - 1).cpu(), top.view(b, s - 1).cpu()


def perplexity(
    model,
    data: Heldout,
    length: int,
    windows: list[tuple[int, int]],
    batch: int = 1,
    progress: bool = True,
) -> dict:
    from tqdm import tqdm

    nlls = []
    for i in tqdm(
        range(0, len(windows), batch), desc=f"ppl@{length}", disable=not progress, file=sys.stderr
    ):
        chunk = windows[i : i + batch]
        ids = torch.tensor(
            np.stack([data.doc(d)[s : s + length].astype(np.int64) for d, s in chunk])
        )
        nlls.append(token_logprobs(model, ids)[0])
    nll = torch.cat(nlls)  # [W, L-1]
    late = nll[:, length // 2 :]
    return {
        "ppl": math.exp(nll.mean().item()),
        "ppl_late_half": math.exp(late.mean().item()),
        "window_ppl": [round(math.exp(x), 4) for x in nll.mean(1).tolist()],
        "tokens": int(nll.numel()),
    }


@dataclass(frozen=True)
class NeedleCase:
    ids: list[int]  # haystack with the needle, question, answer (teacher-forced)
    answer_start: int  # index of the first answer token in ids
    code: str
    depth: float  # requested depth (0 = start of haystack)
    needle_at: int  # token index where the needle starts
    doc: int


def make_needles(
    tok, data: Heldout, length: int, count: int, seed: int, digits: int = 4
) -> list[NeedleCase]:
    """`count` cases of exactly `length` tokens, depths (i + 0.5) / count, seeded haystacks."""
    rng = np.random.default_rng([seed, length])
    long_docs = [i for i, n in enumerate(data.lengths) if n >= length]
    if not long_docs:
        raise ValueError(f"no held-out document has {length} tokens for a needle haystack")
    cases = []
    for i in range(count):
        code = str(int(rng.integers(10 ** (digits - 1), 10**digits)))
        needle = tok.encode(NEEDLE.format(code=code))
        question, answer = tok.encode(QUESTION), tok.encode(ANSWER.format(code=code))
        n_hay = length - len(needle) - len(question) - len(answer)
        if n_hay < 16:
            raise ValueError(f"length {length} is too short for a needle haystack")
        d = long_docs[int(rng.integers(len(long_docs)))]
        doc = data.doc(d)
        start = int(rng.integers(0, len(doc) - n_hay + 1))
        hay = doc[start : start + n_hay].astype(np.int64).tolist()
        depth = (i + 0.5) / count
        at = _sentence_end(tok, hay, round(depth * n_hay))
        ids = hay[:at] + needle + hay[at:] + question + answer
        cases.append(NeedleCase(ids, length - len(answer), code, depth, at, d))
    return cases


def _sentence_end(tok, hay: list[int], target: int) -> int:
    """The token index nearest `target` right after a sentence end ('.', '!', '?' or newline)."""
    for delta in range(BOUNDARY_SEARCH + 1):
        for pos in (target - delta, target + delta):
            if 0 < pos <= len(hay) and tok.decode([hay[pos - 1]]).rstrip(" ")[-1:] in (
                ".",
                "!",
                "?",
                "\n",
            ):
                return pos
    return min(max(target, 0), len(hay))


def needle_accuracy(model, tok, cases: list[NeedleCase], progress: bool = True) -> dict:
    from tqdm import tqdm

    hits, preds = [], []
    for c in tqdm(cases, desc=f"needle@{len(cases[0].ids)}", disable=not progress, file=sys.stderr):
        _, top = token_logprobs(model, torch.tensor([c.ids]))
        # argmax at position p predicts token p + 1: answer tokens are ids[answer_start:].
        pred = top[0, c.answer_start - 1 :].tolist()
        want = c.ids[c.answer_start :]
        hits.append(pred == want)
        preds.append(tok.decode(pred))
    return {
        "accuracy": sum(hits) / len(hits),
        "n": len(hits),
        "cases": [
            {
                "depth": round(c.depth, 4),
                "doc": c.doc,
                "needle_at": c.needle_at,
                "code": c.code,
                "pred": p,
                "hit": h,
            }
            for c, p, h in zip(cases, preds, hits, strict=True)
        ],
    }


# -- driver -------------------------------------------------------------------------------------
@dataclass
class Row:
    model: str
    plan: str
    pattern: str
    retention: float
    metric: str  # "ppl" | "needle"
    length: int
    seed: int
    index_topk: int
    seconds: float
    result: dict


def evaluate(
    model_dir: str,
    data_dir: str,
    plans: list[str],
    lengths: list[int],
    windows: int,
    needles: int,
    seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
    batch: int = 1,
    digits: int = 4,
    progress: bool = True,
) -> list[Row]:
    from model.config import ModelConfig
    from model.tokenizer import Tokenizer

    if windows < 0 or needles < 0 or (windows == 0 and needles == 0):
        raise ValueError("--windows and --needles must be >= 0, and not both 0")
    if any(n < 64 for n in lengths):
        raise ValueError(f"--lengths must be >= 64 tokens, got {lengths}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dt = getattr(torch, dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    cfg = ModelConfig.from_pretrained(model_dir)
    if max(lengths) > cfg.max_position_embeddings:
        raise ValueError(
            f"--lengths up to {max(lengths)} exceed the model's "
            f"max_position_embeddings {cfg.max_position_embeddings}"
        )
    specs = [parse_plan(p, cfg.num_hidden_layers) for p in plans]
    tok = Tokenizer.from_pretrained(model_dir)
    data = Heldout.load(data_dir)
    rows = []
    for spec in specs:
        model = load_for_plan(model_dir, spec, dt, device, max(lengths))
        for length in lengths:
            base = {
                "model": Path(model_dir).name,
                "plan": spec.name,
                "pattern": spec.pattern,
                "retention": round(spec.retention, 4),
                "length": length,
                "seed": seed,
                "index_topk": cfg.index_topk,
            }
            if windows:
                t = time.time()
                res = perplexity(
                    model, data, length, pick_windows(data, length, windows, seed), batch, progress
                )
                rows.append(
                    Row(metric="ppl", seconds=round(time.time() - t, 2), result=res, **base)
                )
            if needles:
                t = time.time()
                cases = make_needles(tok, data, length, needles, seed, digits)
                res = needle_accuracy(model, tok, cases, progress)
                rows.append(
                    Row(metric="needle", seconds=round(time.time() - t, 2), result=res, **base)
                )
        del model
    return rows


def summary(rows: list[Row]) -> str:
    lines = [f"{'plan':<28}{'ret':>6}{'len':>7}  {'metric':<8}{'value':>10}{'late-half':>11}"]
    for r in rows:
        if r.metric == "ppl":
            v, late = f"{r.result['ppl']:.3f}", f"{r.result['ppl_late_half']:.3f}"
        else:
            v, late = f"{100 * r.result['accuracy']:.1f}%", ""
        lines.append(
            f"{r.plan[:27]:<28}{r.retention:>6.3f}{r.length:>7}  {r.metric:<8}{v:>10}{late:>11}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.quality.eval", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", required=True, help="dsa_llama checkpoint directory")
    p.add_argument("--data", required=True, help="directory from benchmarks.quality.data")
    p.add_argument("--plans", nargs="+", default=["dense", "all-F"])
    p.add_argument("--lengths", nargs="+", type=int, default=[2048])
    p.add_argument("--windows", type=int, default=2, help="perplexity windows per length")
    p.add_argument("--needles", type=int, default=0, help="needle cases per length")
    p.add_argument("--digits", type=int, default=4, help="digits of the passcode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1, help="perplexity windows per forward")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default: bfloat16 on CUDA, float32 on CPU",
    )
    p.add_argument("--out", type=Path, default=None, help="write the rows as a JSON list")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        rows = evaluate(
            args.model,
            args.data,
            args.plans,
            args.lengths,
            args.windows,
            args.needles,
            args.seed,
            args.device,
            args.dtype,
            args.batch,
            args.digits,
            not args.quiet,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"eval: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        args.out.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
