"""Per-request state: tokens, how many have KV in the cache, pages, sampling and output state.

One invariant drives scheduling: tokens `token_ids[num_cached:]` still need a forward. A fresh
prompt has all of them pending (prefill, possibly in chunks); a decoding sequence has exactly one
(the last sampled token); a preempted sequence drops its pages, sets num_cached to 0 and so
recomputes prompt + generated tokens in one prefill; a KV handoff (decode role) is reserved pages,
filled with the payload's rows and then runs with the prompt cached and the first token pending.
With prefix caching an admitted sequence starts with `num_cached` at the end of its longest
cached prefix (whole pages shared with other sequences).
"""

from __future__ import annotations

import enum
import itertools

import torch

from serving.engine.detokenizer import Detokenizer
from serving.engine.outputs import FinishReason, Logprob
from serving.engine.params import SamplingParams

_ARRIVALS = itertools.count()  # admission order ties are broken by arrival


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted, or preempted: holds no pages
    RUNNING = "running"  # admitted: holds pages for its cached tokens
    EXPORTING = "exporting"  # prefill role: prompt done, pages held until decode has the payload
    RESERVING = "reserving"  # decode role: a KV handoff waiting for pages (holds none)
    RESERVED = "reserved"  # decode role: pages held for a handoff, its rows not yet in them
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        detokenizer: Detokenizer,
        generator: torch.Generator | None = None,
    ):
        self.request_id = request_id
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_cached = 0
        self.pages: list[int] = []
        self.page_hashes: list[
            bytes
        ] = []  # chain hashes of full pages (prefix cache), grown lazily
        self.num_committed = 0  # leading pages registered in the prefix cache (or taken from it)
        self.num_bypassed = 0  # later requests admitted ahead of this one while it did not fit
        self.arrival = next(_ARRIVALS)
        self.status = SequenceStatus.WAITING
        self.detok = detokenizer
        self.generator = generator
        self.logprobs: list[Logprob] | None = [] if params.logprobs is not None else None
        # Entry i: prompt token i's logprob (None for the first token, which nothing predicts).
        want = params.prompt_logprobs is not None
        self.prompt_logprobs: list[Logprob | None] | None = [None] if want else None
        self.prompt_logprobs_sent = False
        self.finish_reason: FinishReason | None = None
        # Prefill role, under the serving stack: how long the pages stay after export, waiting for
        # the decode side's acknowledgement (None: freed as soon as the payload is staged).
        self.export_hold_s: float | None = None
        self.num_streamed = 0  # generated tokens already reported (stream deltas)
        self.num_logprobs_streamed = 0
        self.sampling = None  # the sampler's per-request state (penalties, grammar), if any

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_pending(self) -> int:
        """Tokens still needing a forward before the next sample."""
        return len(self.token_ids) - self.num_cached

    @property
    def prompt_logits_pending(self) -> bool:
        """Prompt logprobs asked for and not all computed: its prompt rows need logits."""
        pl = self.prompt_logprobs
        return pl is not None and len(pl) < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"cached={self.num_cached}, pages={len(self.pages)})"
        )
