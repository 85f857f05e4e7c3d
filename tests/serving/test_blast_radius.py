"""Blast radius: hostile requests (extreme ints and floats, huge logit_bias maps, lone surrogates,
deep JSON, bad encodings, pathological grammars) run beside normal greedy streams in the same
engine (one app, one engine replica, real Serve and HTTP, all concurrent). The normal streams'
tokens equal a run without the hostile traffic; every hostile request gets an OpenAI 4xx naming
what is wrong, or a correct answer (greedy-equivalent ones the greedy tokens); nothing is a 5xx,
the engine replica is the same one afterwards and holds no KV pages."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serving.harness import API_KEY, metric_sum, scrape, wait_for

pytestmark = pytest.mark.ray

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
# Short prompts (within index_topk: dense prefill, whatever chunks the traffic cuts them into).
NORMAL = ["Once upon a time", "The capital is", "1 2 3 4 5 6"]
N_TOKENS = 24


def normal_body(model: str, prompt: str) -> dict:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": N_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": 0,  # the tokens' strings, to compare token by token
    }


def stream_tokens(client: httpx.Client, url: str, body: dict) -> list[str]:
    tokens: list[str] = []
    generated = None
    with client.stream("POST", url, json=body, headers=AUTH) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                for ch in event["choices"]:
                    tokens += (ch.get("logprobs") or {}).get("tokens", [])
                if event.get("usage"):
                    generated = event["usage"]["completion_tokens"]
    assert generated == N_TOKENS and tokens  # (special tokens are left out of logprobs)
    return tokens


def hostile_cases(model: str) -> list[tuple[str, str, bytes | dict, object]]:
    """(name, path, body, expected): expected is a 4xx status, "greedy:<prompt>" (200 with the
    greedy answer) or 200 (any well-formed answer)."""
    p = NORMAL[0]
    comp = {"model": model, "prompt": p, "max_tokens": 4}
    greedy = {**comp, "temperature": 0, "max_tokens": N_TOKENS, "ignore_eos": True}
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    deep = b'{"model": "m", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    # Every token id the tokenizer has (the model's padded vocabulary has more), biased by 0.
    big_bias = {str(t): 0.0 for t in range(261)}

    def schema(s: dict) -> dict:
        fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": s}}
        return {**chat, "response_format": fmt}

    cases = [
        ("top_k 2**63", "/completions", {**comp, "top_k": 2**63}, 400),
        ("top_k 2**31-1", "/completions", {**greedy, "top_k": 2**31 - 1}, f"greedy:{p}"),
        ("seed 2**70", "/completions", {**comp, "seed": 2**70}, 400),
        ("seed -2**63, n 3", "/completions", {**comp, "seed": -(2**63), "n": 3}, 200),
        ("seed 2**63-1, n 3", "/completions", {**comp, "seed": 2**63 - 1, "n": 3}, 200),
        ("temperature 1e-38", "/completions", {**greedy, "temperature": 1e-38}, f"greedy:{p}"),
        ("temperature 1e308", "/completions", {**comp, "temperature": 1e308}, 400),
        (
            "temperature 2, top_p 1e-38",
            "/completions",
            {**comp, "temperature": 2, "top_p": 1e-38},
            200,
        ),
        ("top_p 0", "/completions", {**greedy, "temperature": 1, "top_p": 0}, f"greedy:{p}"),
        ("presence 1e308", "/completions", {**comp, "presence_penalty": 1e308}, 400),
        ("repetition 1e-300", "/completions", {**comp, "repetition_penalty": 1e-300}, 400),
        ("repetition 0.01", "/completions", {**comp, "repetition_penalty": 0.01}, 200),
        ("max_tokens 2**63", "/completions", {**comp, "max_tokens": 2**63}, 400),
        ("n 2**31", "/completions", {**comp, "n": 2**31}, 400),
        ("logit_bias 261 keys", "/completions", {**greedy, "logit_bias": big_bias}, f"greedy:{p}"),
        (
            "logit_bias 5000 keys",
            "/completions",
            {**comp, "logit_bias": {str(10**6 + i): 1 for i in range(5000)}},
            400,
        ),
        ("logit_bias 1e308", "/completions", {**comp, "logit_bias": {"5": 1e308}}, 400),
        ("token id 2**63", "/completions", {**comp, "prompt": [1, 2**63 - 1]}, 400),
        ("token id -1", "/completions", {**comp, "prompt": [5, -1]}, 400),
        ("stop_token_ids 2**40", "/completions", {**comp, "stop_token_ids": [2**40]}, 400),
        ("stop 20k chars", "/completions", {**comp, "stop": ["x" * 20000]}, 200),
        ("prompt too long", "/completions", {**comp, "prompt": [5] * 5000}, 400),
        ("NaN", "/completions", b'{"prompt": "hi", "temperature": NaN}', 400),
        ("Infinity bias", "/completions", b'{"prompt": "hi", "logit_bias": {"5": Infinity}}', 400),
        ("lone surrogate", "/completions", b'{"prompt": "a\\ud800b"}', 400),
        (
            "surrogate key",
            "/chat/completions",
            b'{"messages": [{"role": "user", "content": "x", "\\udfff": 1}]}',
            400,
        ),
        ("deep JSON", "/completions", deep, 400),
        ("invalid UTF-8", "/completions", b'{"prompt": "\xff\xfe\xfa"}', 400),
        ("latin-1", "/completions", '{"prompt": "caf\u00e9"}'.encode("latin-1"), 400),
        (
            "UTF-16 JSON",
            "/completions",
            json.dumps({**comp, "max_tokens": 2}).encode("utf-16"),
            200,
        ),
        ("empty body", "/completions", b"", 400),
        ("null body", "/chat/completions", b"null", 400),
        (
            "echo, logprobs 5, max_tokens 0",
            "/completions",
            {**comp, "echo": True, "logprobs": 5, "max_tokens": 0},
            200,
        ),
        (
            "huge enum schema",
            "/chat/completions",
            schema({"enum": [f"v{i}" * 4 for i in range(500)]}),
            200,
        ),
        (
            "schema 60 deep",  # the body is 64 levels deep: the most the edge accepts
            "/chat/completions",
            schema(nested_arrays(60)),
            200,
        ),
        ("schema 70 deep", "/chat/completions", schema(nested_arrays(70)), 400),
        (
            "bad regex schema",
            "/chat/completions",
            schema({"type": "string", "pattern": "(((("}),
            400,
        ),
    ]
    return cases


def nested_arrays(depth: int) -> dict:
    return json.loads('{"type": "array", "items": ' * depth + "{}" + "}" * depth)


def send(client: httpx.Client, url: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post(url, content=body, headers=AUTH)
    return client.post(url, json=body, headers=AUTH)


def check(name: str, r: httpx.Response, expected, greedy_text: dict[str, str]) -> None:
    assert r.status_code < 500, f"{name}: {r.status_code} {r.text[:300]}"
    if isinstance(expected, int) and expected >= 400:
        assert r.status_code == expected, f"{name}: {r.status_code} {r.text[:300]}"
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], name
        return
    assert r.status_code == 200, f"{name}: {r.status_code} {r.text[:300]}"
    body = r.json()
    assert body["choices"] and all(
        c["finish_reason"] in ("stop", "length") for c in body["choices"]
    )
    if isinstance(expected, str):
        prompt = expected.split(":", 1)[1]
        assert body["choices"][0]["text"] == greedy_text[prompt], name


def engine_replicas(app) -> dict[str, float]:
    samples = scrape(app.metrics_url)
    return {
        lab["replica"]: v
        for n, lab, v in samples
        if n == "indexcache_generation_tokens_total" and lab.get("role") == "unified"
    }


def test_hostile_requests_leave_normal_streams_untouched(apps):
    app = apps["unified"]
    url = app.v1
    client = httpx.Client(timeout=120)
    with ThreadPoolExecutor(len(NORMAL)) as pool:  # the baseline: normal streams alone
        alone = list(
            pool.map(
                lambda q: stream_tokens(client, url + "/completions", normal_body(app.model, q)),
                NORMAL,
            )
        )
    plain = {"model": app.model, "prompt": NORMAL[0], "max_tokens": N_TOKENS, "temperature": 0}
    r = client.post(url + "/completions", json={**plain, "ignore_eos": True}, headers=AUTH)
    greedy_text = {NORMAL[0]: r.json()["choices"][0]["text"]}
    before = wait_for(lambda: engine_replicas(app), 30, "the engine replica's metrics")
    cases = hostile_cases(app.model)
    results: dict[str, httpx.Response] = {}
    stop = threading.Event()

    def hostile(who: int) -> None:
        rounds = 0
        while not stop.is_set() or rounds == 0:  # every case at least once, more while streams run
            for name, path, body, _ in cases[who::2] + cases[1 - who :: 2]:
                results[f"{name}#{who}.{rounds}"] = send(client, url + path, body)
            rounds += 1

    with ThreadPoolExecutor(len(NORMAL) + 2) as pool:
        attackers = [pool.submit(hostile, who) for who in range(2)]
        normals = [
            pool.submit(stream_tokens, client, url + "/completions", normal_body(app.model, q))
            for q in NORMAL
        ]
        beside = [f.result(timeout=300) for f in normals]
        stop.set()
        for f in attackers:
            f.result(timeout=300)
    assert beside == alone
    expected = {name: exp for name, _, _, exp in cases}
    for key, r in results.items():
        check(key, r, expected[key.rsplit("#", 1)[0]], greedy_text)
    assert len(results) >= 2 * len(cases)
    # The same engine replica served throughout (a restart would reset its counters), it still
    # answers, and nothing is left allocated.
    after = engine_replicas(app)
    assert set(after) == set(before) and all(after[k] >= before[k] for k in before)
    assert (
        stream_tokens(client, url + "/completions", normal_body(app.model, NORMAL[1])) == alone[1]
    )
    wait_for(
        lambda: metric_sum(scrape(app.metrics_url), "indexcache_kv_cache_usage_ratio") == 0,
        30,
        "KV usage back to 0",
    )
