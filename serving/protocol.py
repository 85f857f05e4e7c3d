"""Messages that cross replica boundaries (Ray handles): frozen dataclasses of token ids and
sampling parameters, never text and never pydantic objects. The ingress tokenizes once; replicas
see ids only. Streamed results are the engine's `TokenDelta`s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.engine import Logprob, Resume, SamplingParams
    from serving.kv_transfer import KVHandle


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A tokenized request, as the ingress hands it to an engine deployment."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    resume: Resume | None = None  # failover: continue after what the client already has


@dataclass(frozen=True, slots=True)
class PrefillResponse:
    """The first item of a prefill replica's stream: the first token (already streamable) and a
    handle to the prompt's KV payload, whose header travels in it. `kv` is None when the first
    token already finished the request. The replica holds the payload's pages until the stream
    is closed (serving/kv_connector.py)."""

    request_id: str
    first_token: int
    text: str  # the first token's streamable text (held back while it may start a stop string)
    finish_reason: str | None
    num_prompt_tokens: int
    kv: KVHandle | None
    plan_id: str
    logprobs: list[Logprob] | None = None
    prefill_seconds: float = 0.0  # replica-side: arrival to first token (queue + compute)
    prompt_logprobs: list[Logprob | None] | None = None  # when the request asked for them


@dataclass(frozen=True, slots=True)
class DecodeRequest:
    request_id: str
    kv: KVHandle
    params: SamplingParams
    prompt_token_ids: tuple[int, ...] = ()  # the routing key: the replica caching this prefix
    resume: Resume | None = None  # the payload was re-prefilled with these tokens (failover)


@dataclass(frozen=True, slots=True)
class PrefillRoute:
    """First item of a decode replica's `generate_or_defer` stream: whether it prefills the
    request itself (its deltas follow) or the ingress must go through a prefill replica (the
    stream ends here)."""

    local: bool
    num_cached_tokens: int  # prompt tokens this replica's prefix cache holds
    num_prompt_tokens: int


@dataclass(frozen=True, slots=True)
class KVReceived:
    """The decode replica's first stream item: it reserved pages for the payload and pulled it,
    so the prefill replica's pages and copy can go. Until it arrives the orchestrator counts down
    the KV transfer timeout."""

    nbytes: int
    seconds: float  # pulling the bytes
    plan_id: str = ""
    wait_s: float = 0.0  # waiting for KV pages before the pull
