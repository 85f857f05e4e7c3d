"""Tensor and expert parallelism for the MLA families (DeepSeek-V3.2, GLM-5) over
torch.distributed (NCCL on GPUs, gloo on CPU).

One replica is a group of ranks; every rank holds a shard of the weights, runs the same forward
on the same packed batch and ends it with the same logits:
  - attention: MLA heads split over ranks (q_b_proj and kv_b_proj by head rows, o_proj by its
    input columns), o_proj's partial sums all-reduced; the latent KV cache is per token, shared
    by all heads, so every rank keeps the whole cache (model/layers/attention.py);
  - the lightning indexer replicated (below);
  - MLP and shared experts: gate/up by output rows, down by input columns, all-reduced;
  - routed experts: without EP each rank holds every expert's 1/N slice of I; with EP each rank
    holds E/N whole experts and computes the slots routed to them (tokens are already on every
    rank, so dispatch is a mask and combine is the all-reduce the layer needs anyway);
  - embedding and LM head vocab-parallel (an all-reduce of masked lookups, an all-gather of
    the logit slices).
Why the indexer is replicated, not split. Replication gives every rank the identical top-k by
construction: its inputs are the same bits on every rank (an all-reduce hands all ranks the same
sum), so no rank can pick other keys and no communication is needed. It is not cheap, though.
Per decode query and F layer, at DeepSeek-V3.2's shapes (indexer 64 heads x 128, FP8 keys of
132 B/token; absorbed MLA over 576-d latent rows; topk 2048) and context L = 128K, the indexer
scans 17 MB of keys and does 1.07 G multiply-adds, while sparse attention reads 2.4 MB (the same
latent rows serve every head, so this does not shrink with N) and does 36 M multiply-adds at
TP=8's 16 heads: at long context the indexer is the larger part at any TP degree (estimated
from the shapes, not measured on a GPU). Splitting it by heads would divide its multiply-adds
by N but not its key reads (every rank still scans all L keys), and needs the [T, L] fp32
scores all-reduced before top-k: 512 KB per decode query and F layer, 4 GB for an 8K-token
prefill chunk at L = 128K, more traffic than it saves while the scan is memory-bound. The split
that pays is over keys (each rank scores L / N positions, takes a local top-k, and the N x topk
candidates are gathered and merged): it divides the reads as well and moves only the
candidates, but needs the indexer's key cache partitioned by position across ranks (future
work). IndexCache already removes the indexer from the S layers.

`group.py` sets up process groups from explicit arguments, `shard.py` says which slice of each
checkpoint tensor a rank reads, `layers.py` holds the vocab-parallel modules.
"""

from model.parallel.group import SINGLE, Parallel, init_parallel
from model.parallel.shard import ShardPlan

__all__ = ["SINGLE", "Parallel", "ShardPlan", "init_parallel"]
