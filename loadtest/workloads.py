"""Seeded request generators: short chat, long documents, a mix of both, and multi-turn chats.

Each Locust user draws its requests from its own `random.Random(seed + user_index)`, so a run's
request sequence is reproducible. Prompt lengths are set in tokens; text is cut from the offline
corpus using the server's measured characters per token (`chars_per_token`, from one calibration
request), with a safety margin so documents sized to the model's maximum length are not refused.
Every request streams, asks for the usage chunk, and by default sets `ignore_eos` (as
`vllm bench serve --ignore-eos` does) so each request produces exactly `max_tokens` tokens.

A multi-turn user holds a `Conversation`: the first turn sends a document and a question, each
later turn resends the whole history (the replies as streamed back) plus a new question, as chat
clients do, so every follow-up shares a long prefix with the turn before: what prefix caching
and prefix-affinity routing exist for. Requests are named `turn1` and `followup`, so the report
shows the TTFT of each apart.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

from loadtest import corpus

WORKLOADS = ("chat", "docs", "mix", "multiturn")
# Prompt tokens are estimated from characters; stay this far below a limit to absorb the error.
LENGTH_MARGIN = 0.95
# Chat prompts: one corpus sentence plus an instruction, wrapped in the chat template.
CHAT_PROMPT_CHARS = 260  # at most, before the template
DOC_INSTRUCTION = "\n\nSummarize the document above in a few sentences."
FOLLOWUP_TOKENS = 80  # multiturn: room per later turn for its question (chat template included)
ASKS = (
    "Explain this in simple terms",
    "Give an example of",
    "What follows from",
    "Rephrase",
    "Is this correct",
)


@dataclass(frozen=True)
class WorkloadSpec:
    kind: Literal["chat", "docs", "mix", "multiturn"]
    model: str
    max_tokens: int  # output tokens per request
    doc_tokens: tuple[int, int]  # (low, high) prompt tokens of a document request
    chars_per_token: float  # measured on the server's tokenizer
    docs_share: float = 0.25  # mix: share of document requests
    ignore_eos: bool = True
    logprobs: bool = True  # one SSE event per token, so every token is clocked
    turns: int = 4  # multiturn: turns per conversation

    def __post_init__(self):
        if self.kind not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {self.kind!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        lo, hi = self.doc_tokens
        if not 1 <= lo <= hi:
            raise ValueError(f"doc_tokens must satisfy 1 <= low <= high, got {self.doc_tokens}")
        if not 0 <= self.docs_share <= 1:
            raise ValueError(f"docs_share must lie in [0, 1], got {self.docs_share}")
        if self.chars_per_token <= 0:
            raise ValueError(f"chars_per_token must be > 0, got {self.chars_per_token}")
        if self.turns < 1:
            raise ValueError(f"turns must be >= 1, got {self.turns}")

    def mean_request_tokens(self) -> float:
        """Expected prompt + output tokens of one request: what it holds in the KV cache when it
        finishes (sizes the saturation scenario)."""
        chat = CHAT_PROMPT_CHARS / 2 / self.chars_per_token
        docs = (self.doc_tokens[0] + self.doc_tokens[1]) / 2
        if self.kind == "multiturn":  # the mean context over a conversation's turns
            grow = (self.turns - 1) / 2 * (self.max_tokens + FOLLOWUP_TOKENS)
            return docs + grow + self.max_tokens
        share = {"chat": 0.0, "docs": 1.0, "mix": self.docs_share}[self.kind]
        return share * docs + (1 - share) * chat + self.max_tokens


@dataclass(frozen=True)
class RequestSpec:
    workload: Literal["chat", "docs", "turn1", "followup"]
    path: str  # relative to /v1
    body: dict[str, Any]


def _common(spec: WorkloadSpec) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": spec.model,
        "max_tokens": spec.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
    }
    if spec.ignore_eos:
        body["ignore_eos"] = True
    return body


def chat_request(spec: WorkloadSpec, rng: random.Random) -> RequestSpec:
    sentence = rng.choice(corpus.sentences())
    ask = rng.choice(ASKS)
    body = _common(spec)
    body["messages"] = [{"role": "user", "content": f"{ask}: {sentence}"[:CHAT_PROMPT_CHARS]}]
    if spec.logprobs:
        body.update(logprobs=True, top_logprobs=0)
    return RequestSpec("chat", "/chat/completions", body)


def doc_request(spec: WorkloadSpec, rng: random.Random) -> RequestSpec:
    tokens = rng.randint(*spec.doc_tokens)
    chars = max(1, int(tokens * spec.chars_per_token * LENGTH_MARGIN) - len(DOC_INSTRUCTION))
    body = _common(spec)
    body["prompt"] = corpus.document(rng, chars) + DOC_INSTRUCTION
    if spec.logprobs:
        body["logprobs"] = 0
    return RequestSpec("docs", "/completions", body)


class Conversation:
    """One user's chat: `request()` gives the next turn, `reply(text)` records the answer it
    streamed back (a failed turn calls `reset()`: the next request starts a new chat)."""

    def __init__(self, spec: WorkloadSpec, rng: random.Random):
        self.spec, self.rng = spec, rng
        self.messages: list[dict[str, str]] = []
        self.turn = 0

    def reset(self) -> None:
        self.messages, self.turn = [], 0

    def request(self) -> RequestSpec:
        if self.turn >= self.spec.turns:
            self.reset()
        if not self.messages:
            tokens = self.rng.randint(*self.spec.doc_tokens)
            chars = max(1, int(tokens * self.spec.chars_per_token * LENGTH_MARGIN))
            text = corpus.document(self.rng, chars) + DOC_INSTRUCTION
        else:
            ask = self.rng.choice(ASKS)
            text = f"{ask}: {self.rng.choice(corpus.sentences())}"[: CHAT_PROMPT_CHARS // 2]
        self.messages.append({"role": "user", "content": text})
        self.turn += 1
        body = _common(self.spec)
        body["messages"] = [dict(m) for m in self.messages]
        if self.spec.logprobs:
            body.update(logprobs=True, top_logprobs=0)
        return RequestSpec("turn1" if self.turn == 1 else "followup", "/chat/completions", body)

    def reply(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})


def make_request(spec: WorkloadSpec, rng: random.Random) -> RequestSpec:
    if spec.kind == "multiturn":
        raise ValueError("multiturn requests come from a Conversation, which keeps the history")
    if spec.kind == "chat" or (spec.kind == "mix" and rng.random() >= spec.docs_share):
        return chat_request(spec, rng)
    return doc_request(spec, rng)


def max_doc_tokens(max_model_len: int, capacity_tokens: int | None, max_tokens: int) -> int:
    """The longest document prompt the server can take: prompt + output within the model's
    length and within one replica's KV pool (a longer one is refused by the engine)."""
    limit = max_model_len if not capacity_tokens else min(max_model_len, capacity_tokens)
    n = limit - max_tokens - 1
    if n < 1:
        raise ValueError(
            f"max_tokens={max_tokens} leaves no room for a prompt within {limit} tokens"
        )
    return n
