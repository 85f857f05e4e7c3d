"""What the engine hands back: final outputs, streamed deltas, prefill results, statistics.

Plain dataclasses of Python values and CPU tensors, so they pickle across process boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from serving.engine.payload import KVPayload

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class Logprob:
    """The sampled token's log-probability and the `k` most likely alternatives, from the model's
    raw distribution (before temperature, top-k and top-p)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass
class Output:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens (a stop token is included, its text is not)
    text: str
    finish_reason: FinishReason | None
    logprobs: list[Logprob] | None = None
    prompt_logprobs: list[Logprob | None] | None = None  # entry 0 is None


@dataclass(frozen=True)
class TokenDelta:
    """New tokens of one streamed request since the previous delta."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    logprobs: list[Logprob] | None = None
    prompt_logprobs: list[Logprob | None] | None = None  # with the request's first delta only


@dataclass(frozen=True)
class HandoffReserved:
    """First item of a KV handoff's stream (AsyncLLMEngine.reserve): the decode engine holds
    pages for the payload now; pull it and `fill` it in."""

    request_id: str
    wait_s: float  # how long the handoff waited for pages


@dataclass(frozen=True)
class PrefillResult:
    request_id: str
    first_token: int
    payload: KVPayload
    num_prompt_tokens: int
    finish_reason: FinishReason | None = None  # set when the first token already ends the request
    text: str = ""  # the first token's streamable text (held back while it may start a stop string)
    logprobs: list[Logprob] | None = None
    prompt_logprobs: list[Logprob | None] | None = None


@dataclass
class StepOutput:
    """One request's progress in one engine step (internal: the async layer turns it into
    a TokenDelta or resolves a PrefillResult)."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    logprobs: list[Logprob] | None = None
    prefill: PrefillResult | None = None
    error: BaseException | None = None
    prompt_logprobs: list[Logprob | None] | None = None
    reserved: bool = False  # decode role: pages are reserved for the request's KV handoff

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(frozen=True)
class EngineStats:
    role: str
    num_running: int
    num_waiting: int
    num_preemptions: int  # cumulative
    kv_blocks_total: int
    kv_blocks_used: int
    kv_usage: float  # 0..1
    kv_capacity_tokens: int  # token slots in the pool: pages x page size
    prompt_tokens_total: int  # prompt tokens computed (recomputation after preemption included)
    generation_tokens_total: int
    indexer_layers_run_total: int  # per token per layer: F layers run the indexer ...
    indexer_layers_skipped_total: int  # ... S layers reuse the previous F layer's top-k
    f_layer_ratio: float
    plan_id: str
    bytes_per_token: int
    index_bytes_per_token: int
    num_exporting: int = 0  # prefill role: payloads whose pages wait for the decode side
    num_handoffs_waiting: int = 0  # decode role: KV handoffs queued for pages (holding none)
    num_handoffs_reserved: int = 0  # decode role: handoffs holding pages, rows not yet in
    kv_blocks_handoff: int = 0  # pages held by handoffs (either side), not running
    kv_blocks_cached_free: int = 0  # unreferenced pages holding a cached prefix (not in kv_usage)
    prefix_cache_pages: int = 0  # pages registered in the prefix cache, referenced or not
    prefix_cache_queries_total: int = 0  # prompt tokens looked up on first admission
    prefix_cache_hits_total: int = 0  # ... of which found cached (not recomputed)
    prefix_cache_evictions_total: int = 0  # cached pages reclaimed for new allocations
