"""Turns a scheduled batch into one model forward: packed ids, the ForwardContext (positions, slot
mapping, padded block tables, cumulative lengths) and logits for the rows that sample.

Only a sequence whose pending tokens all ran in this step samples; a prefill chunk that stops
short of the prompt's end produces KV only, so its logits are never computed.
"""

from __future__ import annotations

import torch

from model.context import ForwardContext
from model.dsa import DSAForCausalLM
from model.kv_cache import KVCache
from serving.engine.scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, model: DSAForCausalLM, cache: KVCache):
        self.model, self.cache = model, cache
        self.device = model.device

    def build_context(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor, ForwardContext, list[int]]:
        """-> (input ids [T], context, indices into batch.seqs of the sampling sequences)."""
        ids, cached, sampling, rows = [], [], [], []
        offset = 0
        for b, (seq, n) in enumerate(zip(batch.seqs, batch.num_new, strict=True)):
            ids.extend(seq.token_ids[seq.num_cached : seq.num_cached + n])
            cached.append(seq.num_cached)
            offset += n
            if seq.num_cached + n == seq.num_tokens:
                sampling.append(b)
                rows.append(offset - 1)  # the sequence's last row predicts its next token
        width = max(len(s.pages) for s in batch.seqs)
        tables = torch.zeros(len(batch.seqs), width, dtype=torch.int32)
        for b, seq in enumerate(batch.seqs):
            tables[b, : len(seq.pages)] = torch.tensor(seq.pages, dtype=torch.int32)
        dev = self.device
        ctx = ForwardContext.for_batch(
            batch.num_new,
            cached,
            tables.to(dev),
            self.cache,
            torch.tensor(rows, dtype=torch.long, device=dev),
        )
        return torch.tensor(ids, dtype=torch.long, device=dev), ctx, sampling

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, list[int]]:
        """Forward the batch (writing its KV); -> (logits [S, V] of the sampling rows, their
        indices into batch.seqs). Logits are None when no sequence samples this step."""
        ids, ctx, sampling = self.build_context(batch)
        if not sampling:
            ctx.logits_indices = torch.zeros(0, dtype=torch.long, device=self.device)
        logits = self.model(ids, ctx)
        return (logits if sampling else None), sampling
