"""Acceptance: bad requests get the right 4xx with OpenAI error JSON, and the server keeps
answering."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.serving.harness import API_KEY

pytestmark = pytest.mark.ray

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def post(app, path: str, body, headers=None, raw: bool = False) -> httpx.Response:
    h = {**AUTH, "Content-Type": "application/json", **(headers or {})}
    kw = {"content": body} if raw else {"json": body}
    return httpx.post(app.v1 + path, headers=h, timeout=60, **kw)


def assert_error(r: httpx.Response, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def still_answers(app) -> None:
    r = post(
        app,
        "/completions",
        {"model": app.model, "prompt": "hi", "max_tokens": 2, "ignore_eos": True},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_malformed_json(app):
    assert_error(
        post(app, "/chat/completions", b'{"model": "x", "messages": [', raw=True),
        400,
        code="invalid_json",
    )
    still_answers(app)


def test_unknown_model(app):
    err = assert_error(
        post(app, "/completions", {"model": "no-such-model", "prompt": "hi"}),
        404,
        param="model",
        code="model_not_found",
    )
    assert "no-such-model" in err["message"]
    still_answers(app)


def test_negative_max_tokens(app):
    assert_error(
        post(
            app,
            "/chat/completions",
            {"model": app.model, "max_tokens": -3, "messages": [{"role": "user", "content": "x"}]},
        ),
        400,
        param="max_tokens",
    )
    still_answers(app)


def test_prompt_over_the_limit(app):
    limit = app.config.ingress.max_prompt_tokens
    err = assert_error(
        post(app, "/completions", {"model": app.model, "prompt": "a" * (limit + 1)}),
        400,
        param="prompt",
        code="context_length_exceeded",
    )
    assert str(limit) in err["message"]
    still_answers(app)


def test_max_tokens_over_the_limit(app):
    assert_error(
        post(app, "/completions", {"model": app.model, "prompt": "hi", "max_tokens": 4001}),
        400,
        param="max_tokens",
    )
    still_answers(app)


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer wrong-key"}, {"Authorization": ""}])
def test_bad_api_key(app, headers):
    assert_error(
        post(app, "/completions", {"model": app.model, "prompt": "hi"}, headers=headers),
        401,
        code="invalid_api_key",
    )
    r = httpx.get(app.v1 + "/models", headers=headers, timeout=30)
    assert_error(r, 401, code="invalid_api_key")
    still_answers(app)


def test_openai_client_raises_typed_errors(app):
    c = openai.OpenAI(base_url=app.v1, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()
    c = openai.OpenAI(base_url=app.v1, api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=app.model, prompt="hi", max_tokens=2, suffix="x")


def test_body_too_large(app):
    body = {"model": app.model, "prompt": "hi", "user": "x" * app.config.ingress.max_body_bytes}
    assert_error(post(app, "/completions", body), 413, code="request_too_large")
    still_answers(app)


def test_unknown_field_and_route(app):
    assert_error(
        post(app, "/completions", {"model": app.model, "prompt": "hi", "bogus": 1}),
        400,
        param="bogus",
    )
    assert_error(httpx.get(app.v1 + "/nothing-here", headers=AUTH, timeout=30), 404)
    still_answers(app)


def test_health(app):
    r = httpx.get(app.base_url + "/health", timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok" and body["mode"] == app.mode
    roles = sorted(e["role"] for e in body["engines"])
    assert roles == (["unified"] if app.mode == "unified" else ["decode", "prefill"])
