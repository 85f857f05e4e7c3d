"""Greedy F/S layer selection (IndexCache paper, Algorithm 1; paper.md section 3.3).

Start all-F; layer 0 stays F; each step scores every remaining F layer flipped to S by the language
model loss on the same calibration batches and commits the cheapest flip, until `retain` of the
layers are F. Greedy elimination is nested, so the trajectory also holds the plan for every
retention between 1 and `retain`.

Pipeline blocks (P > 1): the layers are cut into P contiguous blocks whose first layers stay F (a
pipeline stage then never needs indices from the previous one); each step commits the best flip
inside every block that is still above its share of F layers, so a search needs about P times fewer
steps (the NOTES-ZH reading of the paper; the flips of one step are chosen independently).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from model.calibration.evaluate import PlanEvaluator, shared_layers
from model.dsa import DSAForCausalLM
from model.index_cache import IndexCacheConfig


@dataclass
class SearchStep:
    step: int
    flipped: list[int]  # layers turned F -> S by this step (one per active block)
    loss_before: float  # mean next-token CE of the plan this step started from
    loss: float  # mean next-token CE of `pattern`
    pattern: str
    candidates: dict[int, float]  # layer -> loss with only that layer flipped (this step)
    seconds: float
    candidate_evals: int

    @property
    def delta(self) -> float:
        return self.loss - self.loss_before

    @property
    def evals_per_s(self) -> float:
        return self.candidate_evals / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class SearchResult:
    plan: IndexCacheConfig
    base_loss: float  # all-F
    steps: list[SearchStep]
    retain: float
    target_full: int
    blocks: list[tuple[int, int]]  # [start, stop) per pipeline block
    reuse_prefix: bool
    seconds: float
    layer_forwards: int  # decoder-layer forwards actually run
    naive_layer_forwards: int  # with a full forward per candidate and for the current plan
    tokens: int = 0  # predicted tokens per evaluation
    extra: dict = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        return self.steps[-1].loss if self.steps else self.base_loss

    @property
    def candidate_evals(self) -> int:
        return sum(s.candidate_evals for s in self.steps)

    def plan_at(self, num_full: int) -> IndexCacheConfig:
        """The plan on the trajectory with `num_full` F layers."""
        for s in [None, *self.steps]:
            pattern = s.pattern if s else "F" * self.plan.num_layers
            if pattern.count("F") == num_full:
                return IndexCacheConfig(pattern, "calibration")
        raise ValueError(f"no plan with {num_full} F layers on this trajectory")

    def to_dict(self) -> dict:
        evals = self.candidate_evals
        search_s = sum(s.seconds for s in self.steps)
        return {
            "pattern": self.plan.pattern,
            "num_layers": self.plan.num_layers,
            "retain": self.retain,
            "target_full_layers": self.target_full,
            "retention": self.plan.retention,
            "pipeline_blocks": [list(b) for b in self.blocks],
            "base_loss": self.base_loss,
            "final_loss": self.final_loss,
            "tokens_per_eval": self.tokens,
            "reuse_prefix": self.reuse_prefix,
            "seconds": self.seconds,
            "candidate_evals": evals,
            "candidate_evals_per_s": evals / search_s if search_s > 0 else None,
            "layer_forwards": self.layer_forwards,
            "naive_layer_forwards": self.naive_layer_forwards,
            "layer_work_vs_naive": self.layer_forwards / max(self.naive_layer_forwards, 1),
            "steps": [
                {
                    **asdict(s),
                    "delta": s.delta,
                    "evals_per_s": s.evals_per_s,
                    "candidates": {str(k): v for k, v in s.candidates.items()},
                }
                for s in self.steps
            ],
            **self.extra,
        }


def split_blocks(num_layers: int, p: int) -> list[tuple[int, int]]:
    """P contiguous blocks as even as possible (earlier blocks take the remainder)."""
    if not isinstance(p, int) or not 1 <= p <= num_layers:
        raise ValueError(f"pipeline_blocks must be an integer in [1, {num_layers}], got {p!r}")
    base, extra = divmod(num_layers, p)
    out, start = [], 0
    for b in range(p):
        stop = start + base + (b < extra)
        out.append((start, stop))
        start = stop
    return out


def target_full_layers(num_layers: int, retain: float, fixed: int = 1) -> int:
    """F layers kept for `retain`: rounded up, so at least that fraction keeps its indexer
    (1/4 of 47 -> 12 and 1/2 of 47 -> 24, the paper's published counts)."""
    if isinstance(retain, bool) or not isinstance(retain, int | float) or not 0 < retain <= 1:
        raise ValueError(f"retain must be in (0, 1], got {retain!r}")
    n = max(1, math.ceil(retain * num_layers - 1e-9))
    if n < fixed:
        raise ValueError(
            f"retain={retain} keeps {n} of {num_layers} layers F, but {fixed} "
            "pipeline blocks each fix their first layer as F; raise retain or use "
            "fewer blocks"
        )
    return n


def block_quotas(blocks: list[tuple[int, int]], target: int) -> list[int]:
    """F layers per block: one each (its first layer), the rest in proportion to block size."""
    n = blocks[-1][1]
    sizes = [b - a for a, b in blocks]
    quota = [1] * len(blocks)
    for _ in range(target - len(blocks)):
        i = max(
            (i for i in range(len(blocks)) if quota[i] < sizes[i]),
            key=lambda i: target * sizes[i] / n - quota[i],
        )
        quota[i] += 1
    return quota


def _score(
    ev: PlanEvaluator, pattern: list[str], cands: list[int], reuse_prefix: bool, bar
) -> tuple[float, dict[int, float], int]:
    """-> (loss of `pattern`, loss with each candidate flipped alone, layer forwards run)."""
    skip = shared_layers("".join(pattern))
    n = ev.num_layers
    cur, sums, work = 0.0, dict.fromkeys(cands, 0.0), 0
    for b in range(len(ev.batches)):
        if reuse_prefix:
            bounds = ev.prefix(b, skip)
            cur += bounds.loss_sum
            for l in cands:
                sums[l] += ev.suffix_loss_sum(b, bounds, l, skip | {l})
                work += n - l
                bar.update(1)
            del bounds
        else:
            cur += ev.full_loss_sum(b, skip)
            for l in cands:
                sums[l] += ev.full_loss_sum(b, skip | {l})
                work += n
                bar.update(1)
        work += n
    cur /= ev.tokens
    if not math.isfinite(cur):
        raise ValueError(
            f"calibration loss of plan {''.join(pattern)} is {cur}: the model "
            "produces non-finite logits (try --dtype float32)"
        )
    # A flip that breaks the model numerically is never the cheapest one.
    return cur, {l: s / ev.tokens if math.isfinite(s) else math.inf for l, s in sums.items()}, work


def greedy_search(
    model: DSAForCausalLM,
    batches: list[torch.Tensor],
    retain: float,
    *,
    pipeline_blocks: int = 1,
    reuse_prefix: bool = True,
    boundary_device: torch.device | str | None = None,
    progress: bool = True,
) -> SearchResult:
    """Greedy search down to `retain` (fraction of F layers) on fixed `batches` [b, seq_len].

    `model` must be built all-F. Ties go to the lowest layer index, so results are deterministic."""
    n = model.config.num_hidden_layers
    blocks = split_blocks(n, pipeline_blocks)
    fixed = {a for a, _ in blocks}
    target = target_full_layers(n, retain, len(fixed))
    quotas = block_quotas(blocks, target)
    ev = PlanEvaluator(model, batches, boundary_device)
    pattern = ["F"] * n
    steps: list[SearchStep] = []
    base_loss, work, naive_work = None, 0, 0
    t_start = time.perf_counter()
    total_steps = max(b - a - q for (a, b), q in zip(blocks, quotas, strict=True))
    with tqdm(total=total_steps, desc="greedy search", unit="step", disable=not progress) as bar:
        while True:
            active = [
                (a, b)
                for (a, b), q in zip(blocks, quotas, strict=True)
                if pattern[a:b].count("F") > q
            ]
            if not active:
                break
            cands = [
                l for a, b in active for l in range(a, b) if pattern[l] == "F" and l not in fixed
            ]
            t0 = time.perf_counter()
            with tqdm(
                total=len(cands) * len(ev.batches),
                desc=f"step {len(steps) + 1}",
                unit="eval",
                leave=False,
                disable=not progress,
            ) as inner:
                cur, losses, w = _score(ev, pattern, cands, reuse_prefix, inner)
            work += w
            naive_work += (len(cands) + 1) * n * len(ev.batches)
            if base_loss is None:
                base_loss = cur
            if steps and math.isnan(steps[-1].loss):  # multi-flip step: measured only now
                steps[-1].loss = cur
            flips = [
                min((l for l in cands if a <= l < b), key=lambda l: (losses[l], l))
                for a, b in active
            ]
            for l in flips:
                pattern[l] = "S"
            # One flip: its candidate score is the new plan's loss (the same computation).
            loss = losses[flips[0]] if len(flips) == 1 else float("nan")
            steps.append(
                SearchStep(
                    step=len(steps) + 1,
                    flipped=flips,
                    loss_before=cur,
                    loss=loss,
                    pattern="".join(pattern),
                    candidates=losses,
                    seconds=time.perf_counter() - t0,
                    candidate_evals=len(cands),
                )
            )
            bar.update(1)
            bar.set_postfix(loss=f"{cur if math.isnan(loss) else loss:.4f}", F=pattern.count("F"))
    if base_loss is None:  # retain == 1: nothing to flip
        base_loss = ev.loss("F" * n)
    if steps and math.isnan(steps[-1].loss):
        steps[-1].loss = ev.loss("".join(pattern))
    return SearchResult(
        plan=IndexCacheConfig("".join(pattern), "calibration"),
        base_loss=base_loss,
        steps=steps,
        retain=retain,
        target_full=target,
        blocks=blocks,
        reuse_prefix=reuse_prefix,
        seconds=time.perf_counter() - t_start,
        layer_forwards=work,
        naive_layer_forwards=naive_work,
        tokens=ev.tokens,
    )
