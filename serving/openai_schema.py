"""OpenAI API shapes we serve: /v1/chat/completions, /v1/completions, /v1/models.

Requests follow the official OpenAPI spec (a pinned copy lives in tests/openai_spec/): every field
it defines is accepted, explicit `null` means the default (SDKs and agents send nulls), and ranges
are the spec's. Unknown fields are rejected. A field we accept but cannot honour is refused with
400 `unsupported_parameter` naming it (UNSUPPORTED lists them; /openapi.json publishes them), never
ignored; fields that do not change generation (`user`, `metadata`, `store`, ...) are accepted and
have no effect. Extra sampling fields follow vLLM's names (`top_k`, `repetition_penalty`,
`ignore_eos`, `stop_token_ids`), which clients send through `extra_body`.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serving.engine.params import MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY

# The spec publishes seed's bounds as +-9223372036854776000: int64's limits written through a
# float. Clients generated from it may send any integer up to that; the adapter wraps it into
# int64 (two's complement), so every seed the spec allows is served and reproduces.
SPEC_SEED_BOUND = 9223372036854776000
# Fields of the spec this server refuses (400 unsupported_parameter) when set to a value that
# would need them; documented in /openapi.json and checked by the schemathesis run.
UNSUPPORTED = {
    "audio": "audio output is not supported",
    "modalities": "only the text modality is supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "moderation": "moderation is not supported",
    "suffix": "suffix (insertion) is not supported",
    "best_of": "best_of other than n is not supported",
    "messages.content": "only text content parts are supported (no image, audio or file input)",
    "tools.custom": "custom (free-form) tools are not supported; use function tools",
    "tool_choice.custom": "custom tool choices are not supported",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class FunctionCallIn(_Strict):
    name: str
    arguments: str = ""


class ToolCallIn(_Strict):
    id: str
    type: Literal["function", "custom"] = "function"
    function: FunctionCallIn | None = None
    custom: dict[str, Any] | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    refusal: str | None = None  # assistant
    audio: dict[str, Any] | None = None  # assistant: a previous audio answer
    function_call: FunctionCallIn | None = None  # assistant, deprecated

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.get("text") or p.get("refusal") or "" for p in self.content)
        return self.content or ""

    def unsupported_part(self) -> str | None:
        for p in self.content if isinstance(self.content, list) else ():
            if p.get("type") not in ("text", "refusal") or not isinstance(
                p.get("text", p.get("refusal")), str
            ):
                return str(p.get("type"))
        return None


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function", "custom"]
    function: FunctionDef | None = None
    custom: dict[str, Any] | None = None


class _Request(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None)
    seed: int | None = Field(None, ge=-SPEC_SEED_BOUND, le=SPEC_SEED_BOUND)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM-style extras
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    repetition_penalty: float | None = Field(
        None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY
    )
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None

    @property
    def n_choices(self) -> int:
        return self.n or 1

    @property
    def stop_list(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)  # an empty stop string cannot mean anything

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def common_unsupported(self) -> tuple[str, str] | None:
        if isinstance(self.stop, list) and len(self.stop) > 4:
            return "stop", "at most 4 stop sequences"
        if self.top_k == 0:
            return "top_k", "top_k must be -1 (off) or >= 1"
        return None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDef] | None = Field(None, min_length=1, max_length=128)
    function_call: str | dict[str, Any] | None = None
    # accepted, no effect on generation
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    safety_identifier: str | None = Field(None, max_length=64)
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    # refused when set (UNSUPPORTED)
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: Any = None

    def unsupported(self) -> tuple[str, str] | None:
        for name in ("audio", "prediction", "web_search_options", "moderation"):
            if getattr(self, name) is not None:
                return name, UNSUPPORTED[name]
        if self.modalities and "audio" in self.modalities:
            return "modalities", UNSUPPORTED["modalities"]
        for i, m in enumerate(self.messages):
            part = m.unsupported_part()
            if part is not None:
                return f"messages.{i}.content", f"{UNSUPPORTED['messages.content']}: {part!r}"
        for i, t in enumerate(self.tools or ()):
            if t.type != "function" or t.function is None:
                return f"tools.{i}", UNSUPPORTED["tools.custom"]
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs=true"
        return self.common_unsupported()

    @property
    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def function_tools(self) -> list[FunctionDef]:
        """Tools as function definitions (the deprecated `functions` included)."""
        return [t.function for t in self.tools or () if t.function] + list(self.functions or ())


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", UNSUPPORTED["suffix"]
        if self.best_of not in (None, 0, 1, self.n_choices):
            return "best_of", UNSUPPORTED["best_of"]
        return self.common_unsupported()

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one or several; an absent or empty one is the document start ('')."""
        p = self.prompt
        if p is None or p == []:
            return [""]
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [p]
        return list(p)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens"

    @property
    def logprobs_k(self) -> int | None:
        return self.logprobs


# -- responses ----------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "indexcache"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
