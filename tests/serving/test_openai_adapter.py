"""OpenAI request parsing, limits and response shapes, without Ray."""

from __future__ import annotations

import json

import pytest

from model.tokenizer import Tokenizer
from serving.errors import BadRequest, NotFound, PayloadTooLarge
from serving.openai_adapter import (
    Limits,
    ResponseBuilder,
    check_model,
    parse,
    sampling_kwargs,
    sse,
    tokenize,
)
from serving.openai_schema import ChatCompletionRequest, CompletionRequest, Usage

LIMITS = Limits(
    max_body_bytes=10_000,
    max_prompt_tokens=50,
    max_model_len=64,
    max_tokens_limit=40,
    default_max_tokens=16,
)


def chat(**kw) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], **kw}).encode()


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer.from_pretrained(tiny_dir("glm_moe_dsa"))


@pytest.mark.parametrize(
    "body, param, code",
    [
        (b"{not json", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_json"),
        (chat(max_tokens=-1), "max_tokens", "invalid_value"),
        (chat(temperature=3), "temperature", "invalid_value"),
        (chat(top_k=0), "top_k", "invalid_value"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop", "invalid_value"),
        (chat(bogus=True), "bogus", "invalid_value"),
        (chat(n=2), "n", "unsupported_parameter"),
        (chat(presence_penalty=0.5), "presence_penalty", "unsupported_parameter"),
        (chat(tools=[{"type": "function"}]), "tools", "unsupported_parameter"),
        (chat(stream_options={"include_usage": True}), "stream_options", "unsupported_parameter"),
        (json.dumps({"messages": []}).encode(), "messages", "invalid_value"),
    ],
)
def test_bad_requests_name_the_field(body, param, code):
    with pytest.raises(BadRequest) as e:
        parse(body, ChatCompletionRequest, LIMITS)
    assert (e.value.param, e.value.code, e.value.status) == (param, code, 400)
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_body_limit():
    with pytest.raises(PayloadTooLarge):
        parse(b"x" * 10_001, ChatCompletionRequest, LIMITS)


def test_model_check():
    req = parse(chat(model="other"), ChatCompletionRequest, LIMITS)
    with pytest.raises(NotFound, match="other"):
        check_model(req, "tiny")
    check_model(parse(chat(), ChatCompletionRequest, LIMITS), "tiny")  # omitted: the one served


def test_tokenize_chat_and_completions(tok):
    req = parse(chat(), ChatCompletionRequest, LIMITS)
    assert tokenize(req, tok) == tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    )
    ids = tok.encode("hello")
    for prompt in ("hello", ids, ["hello"], [ids]):
        req = parse(json.dumps({"prompt": prompt}).encode(), CompletionRequest, LIMITS)
        assert tokenize(req, tok) == ids
    req = parse(json.dumps({"prompt": [5, 10**6]}).encode(), CompletionRequest, LIMITS)
    with pytest.raises(BadRequest, match="token ids"):
        tokenize(req, tok)


def test_length_limits():
    req = parse(chat(), ChatCompletionRequest, LIMITS)
    assert sampling_kwargs(req, 10, LIMITS)["max_tokens"] == 16  # the default
    assert sampling_kwargs(req, 60, Limits(10_000, 60, 64, 40, 16))["max_tokens"] == 4  # room
    with pytest.raises(BadRequest, match="51 tokens") as e:
        sampling_kwargs(req, 51, LIMITS)
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    with pytest.raises(BadRequest) as e:
        sampling_kwargs(parse(chat(max_tokens=41), ChatCompletionRequest, LIMITS), 5, LIMITS)
    assert e.value.param == "max_tokens"
    with pytest.raises(BadRequest, match="context length") as e:
        sampling_kwargs(
            parse(chat(max_completion_tokens=40), ChatCompletionRequest, LIMITS), 30, LIMITS
        )
    assert e.value.param == "max_completion_tokens"


def test_sampling_fields_map_to_engine_params():
    from serving.engine import SamplingParams

    req = parse(
        chat(
            temperature=0,
            top_p=0.5,
            top_k=3,
            seed=7,
            stop="x",
            stop_token_ids=[4],
            ignore_eos=True,
            logprobs=True,
            top_logprobs=2,
        ),
        ChatCompletionRequest,
        LIMITS,
    )
    p = SamplingParams(**sampling_kwargs(req, 5, LIMITS))
    assert (
        p.temperature,
        p.top_p,
        p.top_k,
        p.seed,
        p.stop,
        p.stop_token_ids,
        p.ignore_eos,
        p.logprobs,
    ) == (0, 0.5, 3, 7, ("x",), (4,), True, 2)


def test_response_shapes(tok):
    b = ResponseBuilder(chat=True, model="tiny", tokenizer=tok)
    full = b.full("hey", "stop", Usage.of(3, 2), None)
    assert full["object"] == "chat.completion" and full["id"].startswith("chatcmpl-")
    assert full["choices"][0]["message"] == {"role": "assistant", "content": "hey"}
    assert full["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert b.chunk("", first=True)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert b.chunk("", "length")["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert b.usage_chunk(Usage.of(1, 1))["choices"] == []
    c = ResponseBuilder(chat=False, model="tiny", tokenizer=tok, echo="pre")
    assert c.chunk("x", first=True)["choices"][0]["text"] == "prex"
    assert c.full("x", "stop", Usage.of(1, 1), None)["choices"][0]["text"] == "prex"
    assert sse({"a": 1}) == 'data: {"a": 1}\n\n' and sse("[DONE]") == "data: [DONE]\n\n"


def test_logprobs_formats(tok):
    from serving.engine import Logprob

    items = [
        Logprob(
            token_id=tok.encode("a")[0],
            logprob=-0.5,
            top=((tok.encode("a")[0], -0.5), (tok.encode("b")[0], -1.5)),
        )
    ]
    lp = ResponseBuilder(True, "tiny", tok).logprobs(items)
    assert lp["content"][0]["token"] == "a" and lp["content"][0]["logprob"] == -0.5
    assert [t["token"] for t in lp["content"][0]["top_logprobs"]] == ["a", "b"]
    lp = ResponseBuilder(False, "tiny", tok).logprobs(items * 2)
    assert lp["tokens"] == ["a", "a"] and lp["text_offset"] == [0, 1]
    assert lp["top_logprobs"][0] == {"a": -0.5, "b": -1.5}
