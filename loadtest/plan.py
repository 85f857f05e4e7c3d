"""Scenarios -> a workload and a load shape (users over time).

smoke     short chat, a few constant users: does the server answer under concurrency?
long      documents up to the model's maximum length (and one replica's KV pool), few users.
saturate  documents sized so that several fit the KV pool; users step up from half of what the
          pool holds, to what it holds, to `oversubscribe` times that (default 1.5x) for the
          second half of the run: the engine then queues and preempts, and the KV pool stays
          nearly full. Users are closed-loop (a user sends its next request when the last ends),
          so users = requests in flight.
chaos     short chat at a constant 32 users (`--users`: set it above what the engines run at
          once, to saturate them) while loadtest/chaos.py kills a decode and a prefill replica
          and rolls out a plan; the report counts requests completed, migrated, retried,
          cleanly failed and lost, and the run passes only with none lost.
multiturn chats of `turns` turns (default 4): a document and a question, then follow-ups that
          resend the whole history; documents leave room for every later turn. Its report shows
          the prefix-cache hit rate and the TTFT of first turns and follow-ups apart; run it
          against a server with and without `enable_prefix_caching` to see what the cache buys.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from loadtest.workloads import FOLLOWUP_TOKENS, WorkloadSpec, max_doc_tokens

SCENARIOS = ("smoke", "saturate", "long", "chaos", "multiturn")
DEFAULTS = {  # scenario -> (workload, users, max_tokens)
    "smoke": ("chat", 4, 32),
    "long": ("docs", 2, 64),
    "saturate": ("docs", None, 64),  # users derived from the KV capacity
    "chaos": ("chat", 32, 32),
    "multiturn": ("multiturn", 4, 32),
}
MULTITURN_DOC_TOKENS = 2048  # multiturn: default largest first-turn document
SATURATE_FIT = 8  # saturate: documents sized so that about this many fill one replica's pool


@dataclass(frozen=True)
class Stage:
    until_s: float  # this stage lasts until this many seconds into the run
    users: int


@dataclass(frozen=True)
class RunPlan:
    scenario: str
    workload: WorkloadSpec
    stages: tuple[Stage, ...]
    saturated_from_s: float | None  # saturate: start of the oversubscribed stage
    requests_fit: float | None  # saturate: whole requests the KV pool holds at once

    @property
    def duration_s(self) -> float:
        return self.stages[-1].until_s

    def users_at(self, t: float) -> int | None:
        for stage in self.stages:
            if t < stage.until_s:
                return stage.users
        return None

    def to_json(self) -> dict:
        d = asdict(self)
        d["workload"]["doc_tokens"] = list(self.workload.doc_tokens)
        return d


def saturation_stages(
    capacity_tokens: float, request_tokens: float, duration_s: float, oversubscribe: float = 1.5
) -> tuple[tuple[Stage, ...], float]:
    """Half the pool's worth of users, then a full pool, then `oversubscribe` pools (the second
    half of the run). Returns (stages, requests that fit)."""
    if capacity_tokens <= 0 or request_tokens <= 0:
        raise ValueError(
            f"capacity ({capacity_tokens}) and tokens per request ({request_tokens}) must be > 0"
        )
    if oversubscribe <= 1:
        raise ValueError(f"oversubscribe must be > 1 to saturate, got {oversubscribe}")
    fit = capacity_tokens / request_tokens
    steps = (
        max(1, math.ceil(fit / 2)),
        max(1, math.ceil(fit)),
        max(2, math.ceil(fit * oversubscribe)),
    )
    ends = (0.25 * duration_s, 0.5 * duration_s, duration_s)
    return tuple(Stage(e, u) for e, u in zip(ends, steps, strict=True)), fit


def build_plan(
    scenario: str,
    *,
    duration_s: float,
    model: str,
    max_model_len: int,
    capacity_tokens: float,
    capacity_per_replica: float,
    chars_per_token: float,
    workload: str | None = None,
    users: int | None = None,
    max_tokens: int | None = None,
    doc_tokens: int | None = None,
    oversubscribe: float = 1.5,
    ignore_eos: bool = True,
    logprobs: bool = True,
    turns: int = 4,
) -> RunPlan:
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {', '.join(SCENARIOS)}, got {scenario!r}")
    if duration_s <= 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration_s}")
    if users is not None and users < 1:
        raise ValueError(f"users must be >= 1, got {users}")
    kind, default_users, default_max = DEFAULTS[scenario]
    max_tokens = max_tokens or default_max
    longest = max_doc_tokens(max_model_len, int(capacity_per_replica) or None, max_tokens)
    if (workload or kind) == "multiturn":  # the last turn holds the document and every reply
        longest -= (turns - 1) * (max_tokens + FOLLOWUP_TOKENS)
        if longest < 16:
            raise ValueError(
                f"{turns} turns of {max_tokens} output tokens leave no room for a document "
                f"within {max_model_len} tokens: use fewer --turns or --max-tokens"
            )
    if doc_tokens is None:
        doc_tokens = longest
        if scenario == "multiturn":
            doc_tokens = min(longest, MULTITURN_DOC_TOKENS)
        if scenario == "saturate":
            per_req = capacity_per_replica / SATURATE_FIT - max_tokens
            doc_tokens = max(16, min(longest, int(per_req / 0.75)))  # mean is 3/4 of the top
    elif not 1 <= doc_tokens <= longest:
        raise ValueError(
            f"doc_tokens must lie in [1, {longest}] (max_model_len "
            f"{max_model_len}, KV pool {capacity_per_replica:.0f} tokens, "
            f"max_tokens {max_tokens}), got {doc_tokens}"
        )
    spec = WorkloadSpec(
        workload or kind,
        model,
        max_tokens,
        (max(1, doc_tokens // 2), doc_tokens),
        chars_per_token,
        ignore_eos=ignore_eos,
        logprobs=logprobs,
        turns=turns,
    )
    if scenario == "saturate" and users is None:
        stages, fit = saturation_stages(
            capacity_tokens, spec.mean_request_tokens(), duration_s, oversubscribe
        )
        return RunPlan(scenario, spec, stages, stages[1].until_s, fit)
    n = users or default_users or 1
    sat_from = duration_s / 2 if scenario == "saturate" else None
    return RunPlan(scenario, spec, (Stage(duration_s, n),), sat_from, None)
