"""Tensor and expert parallelism for the MLA families (DeepSeek-V3.2, GLM-5) over
torch.distributed (NCCL on GPUs, gloo on CPU).

One replica is a group of ranks; every rank holds a shard of the weights, runs the same forward
on the same packed batch and ends it with the same logits:
  - attention: MLA heads split over ranks (q_b_proj and kv_b_proj by head rows, o_proj by its
    input columns), o_proj's partial sums all-reduced; the latent KV cache is per token, shared
    by all heads, so every rank keeps the whole cache (model/layers/attention.py);
  - the lightning indexer replicated (see `INDEXER_REPLICATED`);
  - MLP and shared experts: gate/up by output rows, down by input columns, all-reduced;
  - routed experts: without EP each rank holds every expert's 1/N slice of I; with EP each rank
    holds E/N whole experts and computes the slots routed to them (tokens are already on every
    rank, so dispatch is a mask and combine is the all-reduce the layer needs anyway);
  - embedding and LM head vocab-parallel (an all-reduce of masked lookups, an all-gather of
    the logit slices).
`group.py` sets up process groups from explicit arguments, `shard.py` says which slice of each
checkpoint tensor a rank reads, `layers.py` holds the vocab-parallel modules.
"""

from model.parallel.group import SINGLE, Parallel, init_parallel
from model.parallel.shard import ShardPlan

__all__ = ["SINGLE", "Parallel", "ShardPlan", "init_parallel"]
