"""Agents' clients against the running app: the official `openai` client, litellm and
langchain-openai. The tiny test model has random weights, so nothing here claims it *chooses* to
call a tool: forced tool choices and JSON schemas are enforced by the grammar, and what is proven
is the protocol (well-formed calls, parsed and streamed; results going back into the prompt;
outputs that validate every time), not the model's judgement."""

from __future__ import annotations

import json
import os

import jsonschema
import openai
import pytest

from tests.serving.harness import API_KEY

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no cost-map download at import

pytestmark = pytest.mark.ray

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.v1, api_key=API_KEY, max_retries=0, timeout=120)


def test_forced_tool_call_round_trip_reaches_the_prompt(app):
    c = client(app)
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = c.chat.completions.create(
        model=app.model, messages=ASK, tools=[WEATHER], tool_choice=named, max_tokens=200
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    result = {"city": args["city"], "temperature_c": 21}
    messages = [
        *ASK,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)},
    ]
    # The answer is held to the tool's result by a schema (the model cannot read); what this
    # shows is that the result went back into the prompt and the answer carries it.
    answer = {"type": "object", "properties": {"temperature_c": {"const": 21}}}
    answer |= {"required": ["temperature_c"], "additionalProperties": False}
    r2 = c.chat.completions.create(
        model=app.model,
        messages=messages,
        tools=[WEATHER],
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": answer}},
    )
    assert json.loads(r2.choices[0].message.content) == {"temperature_c": 21}
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens + len(json.dumps(result)) // 2


def test_streamed_tool_calls_assemble_into_the_call(app):
    chunks = list(
        client(app).chat.completions.create(
            model=app.model,
            messages=ASK,
            tools=[WEATHER],
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=200,
            stream=True,
        )
    )
    calls: dict[int, dict] = {}
    for ch in chunks:
        for d in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            got = calls.setdefault(d.index, {"name": "", "arguments": ""})
            got["name"] += d.function.name or ""
            got["arguments"] += d.function.arguments or ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [c["name"] for c in calls.values()] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])


def test_json_schema_output_validates_every_time(apps):
    app = apps["unified"]
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}
    outs = []
    for i in range(10):  # 100 samples at temperature 1
        r = client(app).chat.completions.create(
            model=app.model,
            messages=[{"role": "user", "content": f"A person, please ({i})"}],
            response_format=rf,
            temperature=1.0,
            n=10,
            max_tokens=120,
        )
        outs += [c.message.content for c in r.choices]
        assert all(c.finish_reason == "stop" for c in r.choices), r.choices
    assert len(outs) == 100
    for text in outs:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(outs)) > 10  # really sampled


def test_n_with_a_seed_is_reproducible(app):
    kw = dict(model=app.model, messages=ASK, max_tokens=8, temperature=1.0, n=3, seed=42)
    a = client(app).chat.completions.create(**kw)
    b = client(app).chat.completions.create(**kw)
    texts = [c.message.content for c in sorted(a.choices, key=lambda c: c.index)]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # each choice has its own seed
    assert a.usage.completion_tokens == sum(8 for _ in texts)


def test_litellm_context_window_fallback_fires(apps):
    import litellm

    app = apps["unified"]
    router = litellm.Router(
        model_list=[
            {
                "model_name": "primary",
                "litellm_params": {
                    "model": f"openai/{app.model}",
                    "api_base": app.v1,
                    "api_key": API_KEY,
                },
            },
            {
                "model_name": "bigger",
                "litellm_params": {"model": "openai/bigger", "mock_response": "from the fallback"},
            },
        ],
        context_window_fallbacks=[{"primary": ["bigger"]}],
        num_retries=0,
    )
    long = [{"role": "user", "content": "word " * 600}]
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(
            model=f"openai/{app.model}", api_base=app.v1, api_key=API_KEY, messages=long
        )
    r = router.completion(model="primary", messages=long)
    assert r.choices[0].message.content == "from the fallback"
    ok = router.completion(model="primary", messages=ASK, max_tokens=3)
    assert ok.choices[0].message.content != "from the fallback"


def test_langchain_openai_tools_and_structured_output(apps):
    from langchain_openai import ChatOpenAI

    app = apps["unified"]
    llm = ChatOpenAI(
        model=app.model, base_url=app.v1, api_key=API_KEY, max_tokens=200, max_retries=0
    )
    msg = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Rome?")
    assert [c["name"] for c in msg.tool_calls] == ["get_weather"]
    jsonschema.validate(msg.tool_calls[0]["args"], WEATHER["function"]["parameters"])
    person = llm.with_structured_output(PERSON | {"title": "Person"}, method="json_schema")
    jsonschema.validate(person.invoke("A person"), PERSON)
