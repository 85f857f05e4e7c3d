"""OpenAI request parsing, limits, choice plans and response shapes, without Ray."""

from __future__ import annotations

import json

import pytest

from model.tokenizer import Tokenizer
from serving.engine import Logprob, SamplingParams
from serving.engine.grammar import ll_tokenizer
from serving.errors import BadRequest, NotFound, PayloadTooLarge
from serving.openai_adapter import Limits, check_model, parse, plan
from serving.openai_response import ChoiceResult, ResponseBuilder
from serving.openai_schema import ChatCompletionRequest, CompletionRequest, Usage
from serving.streaming import sse
from serving.tool_calls import tool_format

LIMITS = Limits(
    max_body_bytes=10_000,
    max_prompt_tokens=50,
    max_model_len=64,
    max_tokens_limit=40,
    default_max_tokens=16,
)


def chat(**kw) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], **kw}).encode()


def completion(**kw) -> bytes:
    return json.dumps({"prompt": "hi", **kw}).encode()


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer.from_pretrained(tiny_dir("glm_moe_dsa"))


@pytest.fixture(scope="module")
def lltok(tok):
    return ll_tokenizer(tok, 320, [4])


def plan_chat(tok, lltok, body: bytes, limits: Limits = LIMITS):
    fmt = tool_format("auto", "glm_moe_dsa", tok.special_tokens)
    return plan(parse(body, ChatCompletionRequest, limits), tok, limits, fmt, lltok)


@pytest.mark.parametrize(
    "body, param, code",
    [
        (b"{not json", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_json"),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content", None),
        (b'{"messages": [{"role": "user", "content": "x"}], "user": "a\\udfff"}', "user", None),
        (chat(metadata={"a": json.loads("[" * 70 + "]" * 70)}), None, "invalid_value"),
        (b'{"messages": ' + b"[" * 4000 + b"]" * 4000 + b"}", None, "invalid_json"),
        (chat(temperature=3), "temperature", "invalid_value"),
        (chat(top_k=0), "top_k", "unsupported_parameter"),
        (chat(top_k=2**63), "top_k", "invalid_value"),
        (chat(seed=9223372036854776001), "seed", "invalid_value"),  # past the spec's bound
        (chat(n=129), "n", "invalid_value"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop", "unsupported_parameter"),
        (chat(bogus=True), "bogus", "unknown_parameter"),
        (chat(audio={"voice": "x", "format": "wav"}), "audio", "unsupported_parameter"),
        (
            chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
            "messages.0.content",
            "unsupported_parameter",
        ),
        (chat(tools=[{"type": "custom", "custom": {"name": "x"}}]), "tools.0", None),
        (chat(stream_options={"include_usage": True}), None, None),  # allowed (ignored)
        (json.dumps({"messages": []}).encode(), "messages", "invalid_value"),
    ],
)
def test_bad_requests_name_the_field(body, param, code):
    if param is None and code is None:
        parse(body, ChatCompletionRequest, LIMITS)
        return
    with pytest.raises(BadRequest) as e:
        parse(body, ChatCompletionRequest, LIMITS)
    assert e.value.status == 400
    if param is not None:
        assert e.value.param == param
    if code is not None:
        assert e.value.code == code
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_explicit_nulls_mean_the_defaults(tok, lltok):
    nulls = dict.fromkeys(
        [
            "temperature",
            "top_p",
            "n",
            "stream",
            "presence_penalty",
            "frequency_penalty",
            "logprobs",
            "top_logprobs",
            "seed",
            "stop",
            "max_tokens",
            "logit_bias",
            "response_format",
            "tools",
            "tool_choice",
        ]
    )
    p = plan_chat(tok, lltok, chat(**nulls))
    assert len(p.choices) == 1
    sp = SamplingParams(**p.choices[0].params)
    assert (sp.temperature, sp.top_p, sp.max_tokens, sp.logprobs) == (1.0, 1.0, 16, None)
    for body in (completion(prompt=None, echo=None, logprobs=None), completion(prompt=[])):
        c = plan(parse(body, CompletionRequest, LIMITS), tok, LIMITS, None, lltok)
        assert c.choices[0].prompt_ids == [tok.tok.token_to_id("<|endoftext|>")]


def test_developer_is_system_and_tiny_temperature_is_greedy(tok, lltok):
    dev = plan_chat(tok, lltok, chat(messages=[{"role": "developer", "content": "x"}]))
    sys_ = plan_chat(tok, lltok, chat(messages=[{"role": "system", "content": "x"}]))
    assert dev.choices[0].prompt_ids == sys_.choices[0].prompt_ids
    assert SamplingParams(temperature=1e-38).greedy and not SamplingParams(temperature=0.1).greedy
    assert SamplingParams(**plan_chat(tok, lltok, chat(top_p=0)).choices[0].params).greedy


def test_model_check():
    req = parse(chat(model="other"), ChatCompletionRequest, LIMITS)
    with pytest.raises(NotFound, match="other"):
        check_model(req, "tiny")
    check_model(parse(chat(), ChatCompletionRequest, LIMITS), "tiny")  # omitted: the one served


def test_body_limit():
    with pytest.raises(PayloadTooLarge):
        parse(b"x" * 10_001, ChatCompletionRequest, LIMITS)


def test_context_length_errors_use_vllms_wording(tok, lltok):
    with pytest.raises(BadRequest) as e:
        plan(parse(completion(prompt="a" * 51), CompletionRequest, LIMITS), tok, LIMITS, None)
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"
    assert e.value.message.startswith("This model's maximum context length is 64 tokens.")
    with pytest.raises(BadRequest) as e:
        plan_chat(
            tok,
            lltok,
            chat(max_completion_tokens=40, messages=[{"role": "user", "content": "a" * 30}]),
        )
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    assert "in the messages, 40 in the completion" in e.value.message
    with pytest.raises(BadRequest) as e:
        plan_chat(tok, lltok, chat(max_tokens=41))
    assert e.value.param == "max_tokens"
    room = plan(parse(completion(prompt="a" * 50), CompletionRequest, LIMITS), tok, LIMITS, None)
    assert room.choices[0].params["max_tokens"] == 14  # the default, cut to what fits


def test_choices_n_prompts_and_seeds(tok, lltok):
    p = plan(
        parse(completion(prompt=["ab", "cd"], n=2, seed=7, echo=True), CompletionRequest, LIMITS),
        tok,
        LIMITS,
        None,
    )
    assert [c.index for c in p.choices] == [0, 1, 2, 3]
    assert [c.params["seed"] for c in p.choices] == [7, 8, 7, 8]
    assert [c.echo for c in p.choices] == ["ab", "ab", "cd", "cd"]
    assert p.num_prompt_tokens == 4  # each prompt once
    # the spec's published bound (int64's limit through a float) is served, wrapped into int64
    top = 9223372036854776000
    for seed, want in [(top, [top - 2**64, top + 1 - 2**64]), (2**63 - 1, [2**63 - 1, -(2**63)])]:
        req = parse(completion(n=2, seed=seed), CompletionRequest, LIMITS)
        assert [c.params["seed"] for c in plan(req, tok, LIMITS, None).choices] == want
    with pytest.raises(BadRequest) as e:
        plan_chat(tok, lltok, chat(n=17))
    assert (e.value.param, e.value.code) == ("n", "unsupported_parameter")
    zero = plan(parse(completion(max_tokens=0), CompletionRequest, LIMITS), tok, LIMITS, None)
    assert zero.no_engine


def test_logit_bias_and_penalties_are_bounded_and_passed(tok, lltok):
    p = plan_chat(tok, lltok, chat(logit_bias={"5": -100, "7": 3}, presence_penalty=1.5))
    sp = SamplingParams(**p.choices[0].params)
    assert sp.logit_bias == ((5, -100.0), (7, 3.0)) and sp.presence_penalty == 1.5
    for bias in ({"x": 1}, {"100000": 1}, {"5": 101}):
        with pytest.raises(BadRequest) as e:
            plan_chat(tok, lltok, chat(logit_bias=bias))
        assert e.value.param == "logit_bias"


def test_structured_output_and_forced_tools_compile_a_grammar(tok, lltok):
    big = Limits(10_000, 2000, 4096, 40, 16)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert plan_chat(tok, lltok, chat(response_format=rf)).choices[0].params["grammar"]
    assert (
        plan_chat(tok, lltok, chat(response_format={"type": "json_object"}))
        .choices[0]
        .params["grammar"]
    )
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    with pytest.raises(BadRequest) as e:
        plan_chat(tok, lltok, chat(response_format=bad))
    assert e.value.param.startswith("response_format")
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    forced = plan_chat(tok, lltok, chat(tools=tools, tool_choice="required"), big)
    assert forced.tools_forced and forced.choices[0].params["grammar"]
    auto = plan_chat(tok, lltok, chat(tools=tools), big)
    assert not auto.tools_forced and "grammar" not in auto.choices[0].params
    with pytest.raises(BadRequest) as e:
        plan_chat(
            tok,
            lltok,
            chat(tools=tools, tool_choice={"type": "function", "function": {"name": "g"}}),
        )
    assert e.value.param == "tool_choice"


def test_response_shapes(tok):
    b = ResponseBuilder(chat=True, model="tiny", tokenizer=tok)
    full = b.full([ChoiceResult(0, "hey", "stop")], Usage.of(3, 2))
    assert full["object"] == "chat.completion" and full["id"].startswith("chatcmpl-")
    msg = full["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": "hey", "refusal": None}
    assert full["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert b.chunk(0, "", role=True)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert b.chunk(1, None, "length")["choices"][0] == {
        "index": 1,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert b.usage_chunk(Usage.of(1, 1))["choices"] == []
    c = ResponseBuilder(chat=False, model="tiny", tokenizer=tok)
    assert c.chunk(0, "x", echo="pre")["choices"][0]["text"] == "prex"
    assert (
        c.full([ChoiceResult(0, "x", "stop", echo="pre")], Usage.of(1, 1))["choices"][0]["text"]
        == "prex"
    )
    assert sse({"a": 1}) == 'data: {"a": 1}\n\n' and sse("[DONE]") == "data: [DONE]\n\n"


def test_logprobs_bytes_of_partial_characters_and_hidden_specials(tok, lltok):
    ids = tok.encode("é")  # two byte tokens: each holds half of the character
    assert len(ids) == 2
    eos = 4
    items = [Logprob(ids[0], -0.5, ((ids[0], -0.5),)), Logprob(ids[1], -0.1), Logprob(eos, -0.2)]
    b = ResponseBuilder(True, "tiny", tok, lltok, frozenset({eos}))
    lp = b.logprobs(0, items)
    assert lp["refusal"] is None and len(lp["content"]) == 2  # EOS is not part of the text
    first, second = lp["content"]
    assert bytes(first["bytes"] + second["bytes"]).decode() == "é"
    assert first["token"] == "bytes:\\xc3" and first["top_logprobs"][0]["bytes"] == [0xC3]
    c = ResponseBuilder(False, "tiny", tok, lltok).logprobs(0, [Logprob(ids[0], -1.0)] * 2, "ab")
    assert c["text_offset"][0] == 2  # after the echoed prompt


def test_echo_with_logprobs_asks_for_prompt_logprobs(tok, lltok):
    def plan_completion(**kw):
        return plan(parse(completion(**kw), CompletionRequest, LIMITS), tok, LIMITS, None, lltok)

    p = plan_completion(echo=True, logprobs=2, max_tokens=3)
    assert p.choices[0].params["prompt_logprobs"] == 2 and not p.no_engine and not p.prompt_only
    assert "prompt_logprobs" not in plan_completion(logprobs=2).choices[0].params
    assert "prompt_logprobs" not in plan_completion(echo=True).choices[0].params
    zero = plan_completion(echo=True, logprobs=0, max_tokens=0)
    assert zero.prompt_only and not zero.no_engine  # one engine token scores the prompt
    assert zero.choices[0].params["max_tokens"] == 1
    assert plan_completion(echo=True, max_tokens=0).no_engine
    SamplingParams(**p.choices[0].params)


def test_echoed_prompt_logprobs_lead_the_completion_logprobs(tok):
    ids = tok.encode("ab")
    bos = 0
    prompt = [
        (bos, None),
        (ids[0], Logprob(ids[0], -2.0, ((7, -1.0),))),
        (ids[1], Logprob(ids[1], -3.0)),
    ]
    b = ResponseBuilder(False, "tiny", tok, hidden_ids=frozenset({bos}))
    lp = b.logprobs(0, [Logprob(9, -0.5)], "ab", prompt)
    assert lp["tokens"][:2] == ["a", "b"]  # the hidden BOS is left out, as in the text
    assert lp["token_logprobs"] == [-2.0, -3.0, -0.5]
    assert lp["top_logprobs"][0] == {b.token_text(7)[0]: -1.0}
    assert lp["text_offset"] == [0, 1, 2]
    first = b.logprobs(1, [], "a", [(ids[0], None)])
    assert first["token_logprobs"] == [None] and first["top_logprobs"] == [None]


def test_a_forced_function_must_be_a_tool_and_the_error_names_the_field_sent(tok, lltok):
    for field in ("tool_choice", "function_call"):
        body = chat(**{field: {"type": "function", "function": {"name": "x"}, "name": "x"}})
        with pytest.raises(BadRequest) as e:
            plan_chat(tok, lltok, body)
        assert (e.value.param, e.value.code) == (field, "invalid_value")
        assert "'x', which is not in tools" in e.value.message
