"""OpenAI requests in, engine requests out: parse and validate, template and tokenize once, apply
every limit, and plan the choices (n per prompt) with their sampling parameters.

No Ray and no FastAPI: the ingress calls these, tests call them directly. Every limit is checked
before any engine sees the request; the errors use OpenAI's (and vLLM's) wording and fields, so
client libraries that parse them (litellm's context-window fallbacks) react as they do there.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import jinja2
from pydantic import ValidationError

from serving.errors import BadRequest, NotFound, PayloadTooLarge, Unprocessable
from serving.openai_schema import ChatCompletionRequest, CompletionRequest
from serving.structured import check as check_grammar
from serving.structured import request_grammar, tool_plan
from serving.tool_calls import ToolFormat

MAX_JSON_DEPTH = 64


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int
    max_prompt_tokens: int
    max_model_len: int  # what the deployed engines hold for one request (prompt + output)
    max_tokens_limit: int
    default_max_tokens: int
    max_choices: int = 16  # n x prompts


@dataclass
class Choice:
    index: int
    prompt_ids: list[int]
    params: dict[str, Any]  # SamplingParams keyword arguments
    echo: str = ""


@dataclass
class Plan:
    """What the ingress runs for one request."""

    choices: list[Choice]
    num_prompt_tokens: int  # each distinct prompt once, as OpenAI counts usage
    tool_format: ToolFormat | None = None  # parse tool calls out of the output
    tools_forced: bool = False
    no_engine: bool = False  # max_tokens 0: the answer is the (echoed) prompt alone
    prompt_only: bool = False  # ... but its logprobs were asked for: one token scores it
    extra: dict[str, Any] = field(default_factory=dict)


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
    except RecursionError as e:
        raise BadRequest(
            f"request body is nested more than {MAX_JSON_DEPTH} levels deep", code="invalid_json"
        ) from e
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    check_json(data)
    try:
        req = cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = _body_path(data, err["loc"], missing=err["type"] == "missing")
        param = ".".join(loc) if loc else None  # a field named "" is still named
        if err["type"] == "extra_forbidden":  # OpenAI's wording for a field it does not define
            shown = param if loc and loc[-1] else f"{param or ''}''"  # an empty name, visibly
            raise BadRequest(
                f"Unrecognized request argument supplied: {shown}",
                param=param,
                code="unknown_parameter",
            ) from e
        raise BadRequest(
            f"{param}: {err['msg']}" if param else err["msg"], param=param, code="invalid_value"
        ) from e
    unsupported = req.unsupported()
    if unsupported is not None:
        raise BadRequest(unsupported[1], param=unsupported[0], code="unsupported_parameter")
    return req


def _body_path(data: Any, loc: tuple, missing: bool = False) -> list[str]:
    """pydantic's error location as a path into the body: the names of the union members it
    tried ("str", "list[int]", a tagged union's tag) sit between the keys; keep only the steps
    that exist in the body (so a field named "[x" or "" is still named), and a missing field's
    name."""
    path, node = [], data
    if missing and loc:
        *loc, last = loc
        return _body_path(data, tuple(loc)) + [str(last)]
    for p in loc:
        if isinstance(node, dict) and isinstance(p, str) and p in node:
            node = node[p]
        elif isinstance(node, list) and isinstance(p, int) and 0 <= p < len(node):
            node = node[p]
        else:
            continue  # a union member's name
        path.append(str(p))
    return path


def check_json(data: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Depth and text encoding of a parsed body: 400 naming the field, before anything recurses
    over it or encodes its strings (a lone surrogate such as \\ud800 is valid JSON, not UTF-8)."""
    stack = [(data, (), 1)]
    while stack:
        node, path, depth = stack.pop()
        if depth > max_depth:
            raise BadRequest(
                f"{_path(path)}: JSON is nested more than {max_depth} levels deep",
                param=_path(path),
                code="invalid_value",
            )
        if isinstance(node, dict):
            for k, v in node.items():
                _utf8(k, path)
                stack.append((v, (*path, k), depth + 1))
        elif isinstance(node, list):
            stack.extend((v, (*path, i), depth + 1) for i, v in enumerate(node))
        elif isinstance(node, str):
            _utf8(node, path)


def _utf8(s: str, path: tuple) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(
            f"{_path(path) or 'body'}: text is not valid Unicode ({e.reason} at {e.start})",
            param=_path(path) or None,
            code="invalid_value",
        ) from e


def _path(path: tuple) -> str:
    parts = [str(p) for p in path]
    return ".".join(parts if len(parts) <= 8 else [*parts[:8], "..."])


def check_model(req: ChatCompletionRequest | CompletionRequest, served: str) -> None:
    if req.model is not None and req.model != served:
        raise NotFound(
            f"The model `{req.model}` does not exist; this server serves `{served}`",
            param="model",
            code="model_not_found",
        )


# -- prompts ------------------------------------------------------------------------------------
def chat_messages(req: ChatCompletionRequest, fmt: ToolFormat | None, tools, native: bool):
    """Messages for the chat template: `developer` is `system`, `function` is `tool`; tool calls
    of earlier turns as the template expects them, or (templates without tool support) as text
    in the model's format, with the tool list in a system message."""
    out = []
    for i, m in enumerate(req.messages):
        role = {"developer": "system", "function": "tool"}.get(m.role, m.role)
        msg: dict[str, Any] = {"role": role, "content": m.text()}
        calls = [
            (c.function, f"messages.{i}.tool_calls.{j}.function.arguments")
            for j, c in enumerate(m.tool_calls or ())
            if c.function
        ] + (
            [(m.function_call, f"messages.{i}.function_call.arguments")] if m.function_call else []
        )
        calls = [(c.name, _args(c.arguments, where)) for c, where in calls]
        if calls and native:
            msg["tool_calls"] = [
                {"type": "function", "function": {"name": name, "arguments": args}}
                for name, args in calls
            ]
        elif calls and fmt is not None:
            text = "\n".join(fmt.render_call(name, args) for name, args in calls)
            msg["content"] = (msg["content"] + "\n" + text).strip()
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    if tools and fmt is not None and not native:
        prompt = fmt.system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _args(arguments: str, param: str) -> dict[str, Any]:
    """An earlier turn's call arguments as the object templates and tool formats render key by
    key (as vLLM does, which fails on anything else); a clear 400 instead of a broken prompt."""
    try:
        args = json.loads(arguments) if arguments else {}
    except ValueError:
        args = None
    if not isinstance(args, dict):
        raise BadRequest(
            f"{param} must be a JSON object, got {arguments[:80]!r}",
            param=param,
            code="invalid_value",
        )
    return args


def tokenize_chat(req: ChatCompletionRequest, tokenizer, fmt, tools) -> list[int]:
    if tokenizer.chat_template is None:
        raise Unprocessable(
            "this model has no chat template; use /v1/completions",
            param="messages",
            code="no_chat_template",
        )
    native = "tools" in tokenizer.chat_template
    messages = chat_messages(req, fmt, tools, native)
    extra = {"tools": [{"type": "function", "function": t.model_dump()} for t in tools]}
    try:
        text = tokenizer.apply_chat_template(messages, **(extra if native and tools else {}))
    except jinja2.TemplateError as e:
        raise BadRequest(f"messages rejected by the chat template: {e}", param="messages") from e
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise BadRequest(f"messages rejected by the chat template: {e}", param="messages") from e
    return tokenizer.encode(text)


def tokenize_prompt(prompt: str | list[int], tokenizer, index: int, multi: bool) -> list[int]:
    param = f"prompt.{index}" if multi else "prompt"
    if isinstance(prompt, str):
        if not prompt:  # the document start, as OpenAI's default prompt <|endoftext|>
            start = tokenizer.bos_token or tokenizer.eos_token
            tid = tokenizer.tok.token_to_id(start) if start else None
            if tid is None:
                raise BadRequest("the prompt is empty", param=param, code="invalid_value")
            return [tid]
        return tokenizer.encode(prompt)
    vocab = tokenizer.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise BadRequest(
            f"prompt token ids must be in [0, {vocab}), got {bad[:5]}",
            param=param,
            code="invalid_value",
        )
    if not prompt:
        raise BadRequest("the prompt is empty", param=param, code="invalid_value")
    return list(prompt)


# -- limits and sampling ------------------------------------------------------------------------
def context_error(limit: int, n_prompt: int, max_tokens: int | None, param: str) -> BadRequest:
    """vLLM's and OpenAI's wording (client libraries match on it), code context_length_exceeded."""
    what = "messages" if param == "messages" else "prompt"
    if max_tokens is None:
        msg = (
            f"This model's maximum context length is {limit} tokens. However, your {what} "
            f"resulted in {n_prompt} tokens. Please reduce the length of the {what}."
        )
    else:
        msg = (
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the {what}, {max_tokens} in the "
            f"completion). Please reduce the length of the {what} or completion."
        )
    return BadRequest(msg, param=param, code="context_length_exceeded")


def max_tokens_for(
    req: ChatCompletionRequest | CompletionRequest, n_prompt: int, limits: Limits, param: str
) -> int:
    limit = limits.max_model_len
    if n_prompt > min(limits.max_prompt_tokens, limit - 1):
        err = context_error(limit, n_prompt, None, param)
        if limits.max_prompt_tokens < limit - 1:
            err.message += f" This server accepts at most {limits.max_prompt_tokens} prompt tokens."
        raise err
    room = limit - n_prompt
    asked = req.requested_max_tokens
    if asked is None:
        return min(limits.default_max_tokens, room)
    lowest = 0 if isinstance(req, CompletionRequest) else 1
    if asked < lowest:
        raise BadRequest(
            f"{req.max_tokens_param} must be >= {lowest}, got {asked}",
            param=req.max_tokens_param,
            code="invalid_value",
        )
    if asked > limits.max_tokens_limit:
        raise BadRequest(
            f"{req.max_tokens_param} is {asked}; the limit is {limits.max_tokens_limit}",
            param=req.max_tokens_param,
            code="invalid_value",
        )
    if asked > room:
        raise context_error(limit, n_prompt, asked, param)
    return asked


def base_params(req: ChatCompletionRequest | CompletionRequest, vocab: int) -> dict[str, Any]:
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0:  # the smallest nucleus is the most likely token
        temperature, top_p = 0.0, 1.0
    bias = {}
    for k, v in (req.logit_bias or {}).items():
        if not k.lstrip("-").isdigit() or not 0 <= int(k) < vocab:
            raise BadRequest(
                f"logit_bias keys must be token ids in [0, {vocab}), got {k!r}",
                param="logit_bias",
                code="invalid_value",
            )
        if not -100 <= v <= 100:
            raise BadRequest(
                f"logit_bias values must be in [-100, 100], got {v!r} for token {k}",
                param="logit_bias",
                code="invalid_value",
            )
        bias[int(k)] = float(v)
    stop_ids = tuple(req.stop_token_ids or ())
    if any(not 0 <= t < vocab for t in stop_ids):
        raise BadRequest(
            f"stop_token_ids must be token ids in [0, {vocab})",
            param="stop_token_ids",
            code="invalid_value",
        )
    return {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": -1 if req.top_k is None else req.top_k,
        "seed": None if req.seed is None else _wrap_int64(req.seed),
        "stop": req.stop_list,
        "stop_token_ids": stop_ids,
        "ignore_eos": bool(req.ignore_eos),
        "logprobs": req.logprobs_k,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "repetition_penalty": req.repetition_penalty or 1.0,
        "logit_bias": tuple(sorted(bias.items())),
    }


def _seeded(params: dict[str, Any], i: int) -> dict[str, Any]:
    """Choice i of n: its own seed (seed + i), so choices differ and each reproduces."""
    if params["seed"] is None or i == 0:
        return params
    return {**params, "seed": _wrap_int64(params["seed"] + i)}


def _wrap_int64(x: int) -> int:
    """Two's-complement wrap into int64: the sampler's generator takes 64-bit seeds."""
    return (x + 2**63) % 2**64 - 2**63


def plan(
    req: ChatCompletionRequest | CompletionRequest,
    tokenizer,
    limits: Limits,
    tool_format: ToolFormat | None,
    lltok=None,
) -> Plan:
    """Tokenize, apply the limits, and lay out the choices (blocking: run it off the loop)."""
    vocab = tokenizer.vocab_size
    params = base_params(req, vocab)
    if isinstance(req, ChatCompletionRequest):
        tools, mode, _ = tool_plan(req)
        offered = tools if mode != "none" else []
        ids = tokenize_chat(req, tokenizer, tool_format, offered)
        grammar, gparam = request_grammar(req, tool_format, tools, mode)
        if grammar is not None:
            if lltok is not None:
                check_grammar(grammar, gparam, lltok)
            params["grammar"] = grammar
        if offered:  # markers of the format (special tokens included) must reach the parser
            params["skip_special_tokens"] = False
        prompts, echoes, param = [ids], [""], "messages"
        fmt = tool_format if offered else None
    else:
        raw = req.prompts()
        multi = len(raw) > 1
        prompts = [tokenize_prompt(p, tokenizer, i, multi) for i, p in enumerate(raw)]
        echoes = [
            (p if isinstance(p, str) else tokenizer.decode(p)) if req.echo else "" for p in raw
        ]
        param, fmt, mode = "prompt", None, "none"
        if req.echo and req.logprobs is not None:  # the prompt's logprobs lead the answer
            params["prompt_logprobs"] = req.logprobs
    n = req.n_choices
    if n * len(prompts) > limits.max_choices:
        raise BadRequest(
            f"n ({n}) x prompts ({len(prompts)}) is more than this server's limit of "
            f"{limits.max_choices} choices per request",
            param="n",
            code="unsupported_parameter",
        )
    choices, n_prompt = [], 0
    for pi, ids in enumerate(prompts):
        mt = max_tokens_for(req, len(ids), limits, param)
        n_prompt += len(ids)
        for j in range(n):
            kw = {**_seeded(params, j), "max_tokens": max(mt, 1)}
            choices.append(Choice(pi * n + j, ids, kw, echoes[pi]))
    zero = req.requested_max_tokens == 0
    scores = params.get("prompt_logprobs") is not None
    forced = mode in ("required", "named")
    return Plan(choices, n_prompt, fmt, forced, zero and not scores, zero and scores)


def replace_params(choice: Choice, **kw) -> Choice:
    return dataclasses.replace(choice, params={**choice.params, **kw})
