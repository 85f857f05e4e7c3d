"""OpenAI requests in, engine requests out; engine deltas in, OpenAI responses and SSE out.

No Ray and no FastAPI: the ingress calls these, tests call them directly. The prompt is
tokenized here, once; every limit is checked before any engine sees the request.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jinja2
from pydantic import ValidationError

from serving.errors import BadRequest, NotFound, PayloadTooLarge, Unprocessable
from serving.openai_schema import ChatCompletionRequest, CompletionRequest, Usage


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int
    max_prompt_tokens: int
    max_model_len: int
    max_tokens_limit: int
    default_max_tokens: int


def parse(body: bytes, cls: type, limits: Limits) -> ChatCompletionRequest | CompletionRequest:
    if len(body) > limits.max_body_bytes:
        raise PayloadTooLarge(
            f"request body is {len(body)} bytes; the limit is {limits.max_body_bytes}",
            code="request_too_large",
        )
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    try:
        req = cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise BadRequest(
            f"{param}: {err['msg']}" if param else err["msg"], param=param, code="invalid_value"
        ) from e
    unsupported = req.unsupported()
    if unsupported is not None:
        raise BadRequest(unsupported[1], param=unsupported[0], code="unsupported_parameter")
    return req


def check_model(req: ChatCompletionRequest | CompletionRequest, served: str) -> None:
    if req.model is not None and req.model != served:
        raise NotFound(
            f"The model `{req.model}` does not exist; this server serves `{served}`",
            param="model",
            code="model_not_found",
        )


def tokenize(req: ChatCompletionRequest | CompletionRequest, tokenizer) -> list[int]:
    if isinstance(req, ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        if tokenizer.chat_template is None:
            raise Unprocessable(
                "this model has no chat template; use /v1/completions",
                param="messages",
                code="no_chat_template",
            )
        try:
            text = tokenizer.apply_chat_template(messages)
        except jinja2.TemplateError as e:
            raise BadRequest(
                f"messages rejected by the chat template: {e}", param="messages"
            ) from e
        return tokenizer.encode(text)
    prompt = req.single_prompt()
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    vocab = tokenizer.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise BadRequest(
            f"prompt token ids must be in [0, {vocab}), got {bad[:5]}",
            param="prompt",
            code="invalid_value",
        )
    return list(prompt)


def sampling_kwargs(
    req: ChatCompletionRequest | CompletionRequest, num_prompt: int, limits: Limits
) -> dict[str, Any]:
    """Keyword arguments for the engine's SamplingParams, after every length limit."""
    param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    if num_prompt == 0:
        raise BadRequest("the prompt is empty", param=param, code="invalid_value")
    if num_prompt > limits.max_prompt_tokens:
        raise BadRequest(
            f"the prompt has {num_prompt} tokens; the limit is {limits.max_prompt_tokens}",
            param=param,
            code="context_length_exceeded",
        )
    room = limits.max_model_len - num_prompt
    max_tokens = req.requested_max_tokens
    mt_param = (
        "max_completion_tokens"
        if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens
        else "max_tokens"
    )
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, room)
    elif max_tokens > limits.max_tokens_limit:
        raise BadRequest(
            f"{mt_param} is {max_tokens}; the limit is {limits.max_tokens_limit}",
            param=mt_param,
            code="invalid_value",
        )
    if max_tokens > room:
        raise BadRequest(
            f"the prompt ({num_prompt} tokens) plus {mt_param} ({max_tokens}) "
            f"exceeds the context length {limits.max_model_len}",
            param=mt_param,
            code="context_length_exceeded",
        )
    return {
        "max_tokens": max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "seed": req.seed,
        "stop": req.stop_list,
        "stop_token_ids": tuple(req.stop_token_ids or ()),
        "ignore_eos": req.ignore_eos,
        "logprobs": req.logprobs_k,
    }


# -- responses ----------------------------------------------------------------------------------
class ResponseBuilder:
    """OpenAI JSON for one request: whole responses, stream chunks, the usage chunk."""

    def __init__(self, chat: bool, model: str, tokenizer, echo: str = ""):
        self.chat, self.model, self.tokenizer = chat, model, tokenizer
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.echo = echo
        self._offset = 0  # completions logprobs: text_offset of the next token

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(
        self, text: str, finish_reason: str | None, usage: Usage, logprobs: list | None
    ) -> dict[str, Any]:
        lp = self.logprobs(logprobs) if logprobs is not None else None
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": lp,
                "finish_reason": finish_reason,
            }
        else:
            choice = {
                "index": 0,
                "text": self.echo + text,
                "logprobs": lp,
                "finish_reason": finish_reason,
            }
        return {**self._base(self.object), "choices": [choice], "usage": usage.model_dump()}

    def chunk(
        self,
        text: str,
        finish_reason: str | None = None,
        logprobs: list | None = None,
        first: bool = False,
    ) -> dict[str, Any]:
        lp = self.logprobs(logprobs) if logprobs else None
        if self.chat:
            delta: dict[str, Any] = (
                {"role": "assistant", "content": text}
                if first
                else ({"content": text} if text or finish_reason is None else {})
            )
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        text = (self.echo + text) if first else text
        choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish_reason}
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(obj), "choices": [], "usage": usage.model_dump()}

    def logprobs(self, items: list) -> dict[str, Any]:
        """Engine `Logprob`s -> OpenAI's chat or completions logprobs object."""
        tok = self.tokenizer
        if self.chat:

            def entry(tid: int, lp: float) -> dict[str, Any]:
                s = tok.decode([tid], skip_special_tokens=False)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}

            return {
                "content": [
                    {
                        **entry(x.token_id, x.logprob),
                        "top_logprobs": [entry(t, lp) for t, lp in x.top],
                    }
                    for x in items
                ]
            }
        out: dict[str, list] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        for x in items:
            s = tok.decode([x.token_id], skip_special_tokens=False)
            out["tokens"].append(s)
            out["token_logprobs"].append(x.logprob)
            out["top_logprobs"].append(
                {tok.decode([t], skip_special_tokens=False): lp for t, lp in x.top}
            )
            out["text_offset"].append(self._offset)
            self._offset += len(s)
        return out


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
