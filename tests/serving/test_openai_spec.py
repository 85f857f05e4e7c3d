"""A bounded schemathesis run of the official OpenAI spec (tests/openai_spec, pinned) against the
running app: requests generated from the spec's request schemas for chat, completions and models.
Every response must be a non-5xx; a 200 must validate against the spec's response schema (and
streamed chunks against the chunk schema); a 4xx is allowed only when it names a documented
refusal: a field the spec defines but this server does not implement (UNSUPPORTED), a limit of
this deployment (context length, max_tokens_limit, choices per request), or a field the spec does
not define at all. Generation is bounded (examples per operation, a time cap) to keep CI short.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.serving.harness import API_KEY

pytestmark = pytest.mark.ray

SPEC = Path(__file__).resolve().parents[1] / "openai_spec" / "openai-openapi.subset.json"
EXAMPLES = 40  # per operation
TIME_CAP_S = 40.0  # per operation
# 4xx codes that refuse a request for a documented reason (see the module docstring).
DOCUMENTED = {"unsupported_parameter", "context_length_exceeded", "unknown_parameter"}


def _spec() -> dict:
    return json.loads(SPEC.read_text())


def _property_names(node, out: set) -> set:
    if isinstance(node, dict):
        for k, v in (node.get("properties") or {}).items():
            out.add(k)
            _property_names(v, out)
        for v in node.values():
            _property_names(v, out)
    elif isinstance(node, list):
        for v in node:
            _property_names(v, out)
    return out


def _validator(spec: dict, name: str):
    schema = {"$ref": f"#/components/schemas/{name}", "components": _echo_nulls(spec)}
    return jsonschema.Draft202012Validator(schema)


def _echo_nulls(spec: dict) -> dict:
    """The one documented deviation: with `echo` and `logprobs` the first prompt token's logprob
    entries are null (nothing predicts it), as OpenAI and vLLM send them; the spec's item types
    omit that null."""
    comps = json.loads(json.dumps(spec["components"]))
    choice = comps["schemas"]["CreateCompletionResponse"]["properties"]["choices"]["items"]
    obj = next(s for s in choice["properties"]["logprobs"]["anyOf"] if s.get("type") == "object")
    for key in ("token_logprobs", "top_logprobs"):
        item = obj["properties"][key]["items"]
        obj["properties"][key]["items"] = {"anyOf": [item, {"type": "null"}]}
    return comps


def _allowed_refusal(r: httpx.Response, spec_names: set) -> bool:
    if r.status_code not in (400, 404, 413, 422):
        return False
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    code, param = err["code"], err["param"] or ""
    if code == "unknown_parameter":  # only for names the spec does not define
        return param.split(".")[-1] not in spec_names
    if code == "invalid_value" and param.split(".")[0] in (
        "logit_bias",
        "prompt",
        "stop_token_ids",
    ):
        return "token ids" in err["message"]  # the spec's keys/items are the model's token ids
    if code == "invalid_value" and param in ("tool_choice", "function_call"):
        # a forced function must be one of the request's tools (OpenAI refuses it too)
        return "which is not in tools" in err["message"] or "needs tools" in err["message"]
    if code == "invalid_value" and param.split(".")[0] in ("max_tokens", "max_completion_tokens"):
        return "the limit is" in err["message"] or ">= " in err["message"]
    return code in DOCUMENTED


@pytest.mark.parametrize(
    "path, method, response",
    [
        ("/chat/completions", "POST", "CreateChatCompletionResponse"),
        ("/completions", "POST", "CreateCompletionResponse"),
        ("/models", "GET", "ListModelsResponse"),
    ],
)
def test_official_spec_fuzz(apps, path, method, response):
    import schemathesis

    app = apps["unified"]
    spec = _spec()
    names = _property_names(spec["components"], set())
    schema = schemathesis.openapi.from_dict(spec)
    op = schema[path][method]
    whole = _validator(spec, response)
    chunk = _validator(
        spec,
        "CreateChatCompletionStreamResponse" if "chat" in path else "CreateCompletionResponse",
    )
    seen: dict[str, int] = {}
    deadline = time.monotonic() + TIME_CAP_S
    client = httpx.Client(timeout=60, headers={"Authorization": f"Bearer {API_KEY}"})

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],  # no shrinking: the failure message carries the request
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(), budget=st.integers(1, 8))
    def run(case, budget):
        if time.monotonic() > deadline:
            return
        body = case.body if isinstance(case.body, dict) else None
        if body is not None:
            body["model"] = app.model  # this server serves one model
            # bounded work per example: the tiny model on 2 cores
            for k in ("max_tokens", "max_completion_tokens"):
                if isinstance(body.get(k), int) and body[k] > 8:
                    body[k] = budget
            if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
                body["max_tokens"] = budget
        url = app.v1 + path
        r = (
            client.post(url, json=body, headers={"Accept": "*/*"})
            if method == "POST"
            else client.get(url)
        )
        seen[str(r.status_code)] = seen.get(str(r.status_code), 0) + 1
        assert r.status_code < 500, f"{r.status_code} for {json.dumps(body)[:2000]}: {r.text[:500]}"
        if r.status_code == 200:
            if r.headers["content-type"].startswith("text/event-stream"):
                for line in r.text.splitlines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        event = json.loads(line[6:])
                        if "error" not in event:
                            errors = list(chunk.iter_errors(event))
                            assert not errors, f"chunk {event}: {errors[0].message}"
            else:
                errors = list(whole.iter_errors(r.json()))
                assert not errors, f"{r.json()}: {errors[0].message}"
        else:
            assert _allowed_refusal(r, names), (
                f"refused {json.dumps(body)[:1500]}: {r.status_code} {r.text[:500]}"
            )

    run()
    assert sum(seen.values()) >= 5, seen  # the run really exercised the server
    print(path, seen)


def test_app_serves_its_own_openapi(apps):
    """/openapi.json parses as OpenAPI (schemathesis loads it), lists the routes, and its request
    schemas say what the server does: a body they accept is served, one they reject is a 400."""
    import schemathesis

    app = apps["unified"]
    r = httpx.get(app.base_url + "/openapi.json", timeout=30)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    ops = {(p, m.upper()) for p, v in doc["paths"].items() for m in v}
    want = {("/v1/chat/completions", "POST"), ("/v1/completions", "POST"), ("/v1/models", "GET")}
    assert want <= ops, ops
    loaded = schemathesis.openapi.from_dict(doc)
    assert loaded["/v1/chat/completions"]["POST"] is not None
    assert set(doc["x-unsupported-parameters"]) >= {"suffix", "audio", "tools.custom"}
    comps = doc["components"]

    def validator(path: str):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        return jsonschema.Draft202012Validator({**body, "components": comps})

    chat = validator("/v1/chat/completions")
    props = comps["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "tools", "response_format", "top_k", "logit_bias"} <= set(props)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    good = {"model": app.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    bad = {**good, "not_a_field": 1}
    assert chat.is_valid(good) and not chat.is_valid(bad)
    assert (
        httpx.post(app.v1 + "/chat/completions", json=good, headers=headers, timeout=60).status_code
        == 200
    )
    assert (
        httpx.post(app.v1 + "/chat/completions", json=bad, headers=headers, timeout=60).status_code
        == 400
    )
    comp = validator("/v1/completions")
    assert comp.is_valid({"prompt": "x", "echo": True, "logprobs": 2})
    assert not comp.is_valid({"prompt": "x", "logprobs": 6})  # the spec's bound: at most 5
    listing = doc["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]
    models = httpx.get(app.v1 + "/models", headers=headers, timeout=30).json()
    ref = listing["application/json"]["schema"]
    assert jsonschema.Draft202012Validator({**ref, "components": comps}).is_valid(models)
