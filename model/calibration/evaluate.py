"""Language-model loss of F/S plans on fixed calibration batches, with one all-F model.

An S layer is emulated by not calling that layer's indexer (`ForwardContext.skip_indexer`): it then
attends with `ctx.topk` of the nearest preceding F layer, exactly as a model built with the plan
does (tests check the logits match `load_model(path, index_cache=plan)`).

Cached prefix: flipping layer l changes nothing before l, so one forward of the current plan
records, at every layer boundary, the hidden state and the `ctx.topk` entering that layer (both are
needed: an S layer right after the boundary reads the indices of the F layer before it). A
candidate is then scored by running layers l..N-1 only. Each layer rewrites its own cache rows
before reading them, so one scratch context per batch shape serves every evaluation.

Boundary memory is N x T x (d + index_topk) per batch; `boundary_device="cpu"` keeps it in host
memory for long contexts (each candidate then copies one boundary back).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.context import ForwardContext
from model.dsa import DSAForCausalLM, scratch_context
from model.index_cache import IndexCacheConfig

# Rows whose logits are materialised at once: bounds the fp32 [rows, vocab] tile of the loss.
LOSS_ROWS = 2048


@dataclass
class Boundaries:
    """State entering each layer under one plan, for one batch."""

    hidden: list[torch.Tensor]  # [N] of [T, d]
    topk: list[torch.Tensor | None]  # [N] of [T, index_topk] (None entering layer 0)
    loss_sum: float  # summed next-token CE of the whole plan on this batch


def require_all_full(model: DSAForCausalLM) -> None:
    missing = [i for i, layer in enumerate(model.model.layers) if layer.self_attn.indexer is None]
    if missing:
        raise ValueError(
            f"calibration needs every layer's indexer: layers {missing} have none. "
            "Load an all-F checkpoint with index_cache='F' * num_layers"
        )


def shared_layers(plan: IndexCacheConfig | str) -> frozenset[int]:
    pattern = plan.pattern if isinstance(plan, IndexCacheConfig) else plan
    if not pattern.startswith("F"):
        raise ValueError("a plan must start with 'F': layer 0 seeds the indices")
    return frozenset(i for i, c in enumerate(pattern) if c == "S")


def targets(ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets of packed rows [B, S] -> [B*S], -100 on each row's last token."""
    tgt = torch.full_like(ids, -100)
    tgt[:, :-1] = ids[:, 1:]
    return tgt.reshape(-1)


def predicted_tokens(ids: torch.Tensor) -> int:
    return ids.shape[0] * (ids.shape[1] - 1)


class PlanEvaluator:
    """Scores plans on `batches` (each [b, seq_len] int64 ids). The model must hold all indexers."""

    def __init__(
        self,
        model: DSAForCausalLM,
        batches: list[torch.Tensor],
        boundary_device: torch.device | str | None = None,
    ):
        require_all_full(model)
        if not batches:
            raise ValueError("calibration needs at least one batch")
        self.model = model
        self.boundary_device = torch.device(boundary_device or model.device)
        self.num_layers = model.config.num_hidden_layers
        self.batches = [b.to(model.device) for b in batches]
        self.targets = [targets(b) for b in self.batches]
        self.tokens = sum(predicted_tokens(b) for b in self.batches)
        self._contexts: dict[tuple[int, int], ForwardContext] = {}

    def context(self, batch: torch.Tensor) -> ForwardContext:
        key = tuple(batch.shape)
        if key not in self._contexts:
            ctx = scratch_context(self.model, *key)
            self.model.prepare(ctx)
            self._contexts[key] = ctx
        return self._contexts[key]

    def run_layers(
        self,
        h: torch.Tensor,
        ctx: ForwardContext,
        start: int,
        topk: torch.Tensor | None,
        skip: frozenset[int],
        record: Boundaries | None = None,
    ) -> torch.Tensor:
        """Layers start..N-1 from hidden `h` and indices `topk` entering `start`."""
        ctx.topk, ctx.skip_indexer = topk, skip
        # S layers share their F layer's tensor: store it once (the original is kept alive in
        # the dict so its id cannot be reused by a later tensor).
        stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i in range(start, self.num_layers):
            if record is not None:
                record.hidden.append(h.to(self.boundary_device))
                t = ctx.topk
                if t is not None and id(t) not in stored:
                    stored[id(t)] = (t, t.to(self.boundary_device))
                record.topk.append(stored[id(t)][1] if t is not None else None)
            h = self.model.model.layers[i](h, ctx)
        return h

    def loss_sum(self, h: torch.Tensor, tgt: torch.Tensor) -> float:
        """Summed next-token CE of final hidden states [T, d] (fp32, in row chunks)."""
        h = self.model.model.norm(h)
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        for s in range(0, h.shape[0], LOSS_ROWS):
            logits = self.model.lm_head(h[s : s + LOSS_ROWS]).float()
            total += F.cross_entropy(
                logits, tgt[s : s + LOSS_ROWS], ignore_index=-100, reduction="sum"
            ).double()
        return float(total)

    @torch.no_grad()
    def full_loss_sum(self, b: int, skip: frozenset[int]) -> float:
        """Naive scoring: embeddings to logits for batch `b`."""
        ids = self.batches[b]
        ctx = self.context(ids)
        h = self.run_layers(self.model.model.embed_tokens(ids.reshape(-1)), ctx, 0, None, skip)
        return self.loss_sum(h, self.targets[b])

    @torch.no_grad()
    def prefix(self, b: int, skip: frozenset[int]) -> Boundaries:
        """One full forward of the plan on batch `b`, recording every layer boundary."""
        ids = self.batches[b]
        ctx = self.context(ids)
        rec = Boundaries(hidden=[], topk=[], loss_sum=0.0)
        h = self.run_layers(
            self.model.model.embed_tokens(ids.reshape(-1)), ctx, 0, None, skip, record=rec
        )
        rec.loss_sum = self.loss_sum(h, self.targets[b])
        return rec

    @torch.no_grad()
    def suffix_loss_sum(
        self, b: int, bounds: Boundaries, start: int, skip: frozenset[int]
    ) -> float:
        """Score a plan that agrees with the recorded one on layers < start."""
        ctx = self.context(self.batches[b])
        dev = self.model.device
        topk = bounds.topk[start]
        h = self.run_layers(
            bounds.hidden[start].to(dev),
            ctx,
            start,
            topk.to(dev) if topk is not None else None,
            skip,
        )
        return self.loss_sum(h, self.targets[b])

    def loss(self, plan: IndexCacheConfig | str) -> float:
        """Mean next-token CE of a plan over all batches."""
        skip = shared_layers(plan)
        return sum(self.full_loss_sum(b, skip) for b in range(len(self.batches))) / self.tokens

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, plan: IndexCacheConfig | str) -> torch.Tensor:
        """Logits [B, S, V] of `ids` under `plan` (for checking against a model built with it)."""
        ctx = scratch_context(self.model, *ids.shape)
        self.model.prepare(ctx)
        h = self.run_layers(
            self.model.model.embed_tokens(ids.reshape(-1)), ctx, 0, None, shared_layers(plan)
        )
        return self.model.lm_head(self.model.model.norm(h)).view(*ids.shape, -1)
