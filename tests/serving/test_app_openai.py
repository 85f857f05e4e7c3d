"""Acceptance: the official `openai` client against the running app, in both modes."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.serving.harness import API_KEY

pytestmark = pytest.mark.ray

PROMPTS = ["The capital of France is", "Once upon a time", "1 2 3 4", "abc"]


def client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.v1, api_key=API_KEY, max_retries=0, timeout=60)


def offline(engine, prompt, **kw):
    from serving.engine import SamplingParams

    return engine.generate([prompt], SamplingParams(temperature=0, **kw))[0]


def test_models_list(app):
    models = client(app).models.list()
    assert [m.id for m in models.data] == [app.model]
    assert client(app).models.retrieve(app.model).id == app.model


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_completion_greedy_equals_offline_generate(app, offline_engine, prompt):
    ref = offline(offline_engine, prompt, max_tokens=12)
    r = client(app).completions.create(model=app.model, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason == "length"
    n_prompt = len(offline_engine.tokenizer.encode(prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 12)


def test_completion_token_ids_prompt(app, offline_engine):
    ids = offline_engine.tokenizer.encode(PROMPTS[2])
    ref = offline(offline_engine, ids, max_tokens=6)
    r = client(app).completions.create(model=app.model, prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == ref.text
    assert r.usage.prompt_tokens == len(ids)


def test_chat_greedy_equals_offline_generate(app, offline_engine):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Once upon a time"},
    ]
    text = offline_engine.tokenizer.apply_chat_template(messages)
    ref = offline(offline_engine, text, max_tokens=10)
    r = client(app).chat.completions.create(
        model=app.model, messages=messages, max_tokens=10, temperature=0
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(offline_engine.tokenizer.encode(text))
    assert r.usage.completion_tokens == len(ref.token_ids)


def test_max_tokens_is_honoured(app):
    for n in (1, 3):
        r = client(app).completions.create(
            model=app.model, prompt=PROMPTS[0], max_tokens=n, temperature=0
        )
        assert r.usage.completion_tokens == n
        assert r.choices[0].finish_reason == "length"


def test_streaming_with_usage_chunk(app, offline_engine):
    ref = offline(offline_engine, PROMPTS[1], max_tokens=12)
    stream = client(app).completions.create(
        model=app.model,
        prompt=PROMPTS[1],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    usage = [c for c in chunks if c.usage is not None]
    assert len(usage) == 1 and chunks[-1] is usage[0] and usage[0].choices == []
    assert usage[0].usage.completion_tokens == 12
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_streaming(app, offline_engine):
    messages = [{"role": "user", "content": "1 2 3 4"}]
    ref = offline(
        offline_engine, offline_engine.tokenizer.apply_chat_template(messages), max_tokens=8
    )
    chunks = list(
        client(app).chat.completions.create(
            model=app.model, messages=messages, max_tokens=8, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def _stop_case(engine):
    """A prompt whose greedy text is long enough to cut, and a stop string inside it."""
    for p in PROMPTS:
        text = offline(engine, p, max_tokens=16).text
        if len(text) >= 4:
            return p, text[2:4]
    pytest.fail("no prompt in PROMPTS gives a 4-character greedy text with this tiny model")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string(app, offline_engine, stream):
    prompt, stop = _stop_case(offline_engine)
    ref = offline(offline_engine, prompt, max_tokens=16, stop=(stop,))
    assert ref.finish_reason == "stop" and stop not in ref.text
    kw = dict(model=app.model, prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    if stream:
        chunks = list(client(app).completions.create(stream=True, **kw))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = chunks[-1].choices[0].finish_reason
    else:
        r = client(app).completions.create(**kw)
        text, finish = r.choices[0].text, r.choices[0].finish_reason
    assert (text, finish) == (ref.text, "stop")


def test_seeded_sampling_is_reproducible(app):
    kw = dict(model=app.model, prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=1234)
    a = client(app).completions.create(**kw)
    b = client(app).completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text


def test_echo_with_logprobs_returns_the_prompts_logprobs(app, tiny_model, offline_engine):
    """Completions `echo` + `logprobs`: the prompt's tokens lead the logprobs (the first one
    null), equal to a full recomputation of the prompt's log-softmax with the plain model;
    max_tokens 0 scores the prompt alone; streamed, they come with the echo."""
    import torch

    from model import load_model

    prompt = PROMPTS[1]  # 16 byte tokens: within index_topk, so attention is dense
    ids = offline_engine.tokenizer.encode(prompt)
    model = load_model(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        lp = model(torch.tensor(ids)).float().log_softmax(-1)
    want = [None] + [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]
    top = [None] + [lp[i - 1].topk(2).values.tolist() for i in range(1, len(ids))]

    def check_prompt_part(lps, n_gen):
        assert len(lps.tokens) == len(ids) + n_gen
        assert "".join(lps.tokens[: len(ids)]) == prompt
        assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
        assert lps.token_logprobs[1 : len(ids)] == pytest.approx(want[1:], abs=1e-3)
        for i in range(1, len(ids)):
            assert sorted(lps.top_logprobs[i].values(), reverse=True) == pytest.approx(
                top[i], abs=1e-3
            )
        assert lps.text_offset[: len(ids)] == list(range(len(ids)))  # one character each

    c = client(app)
    r = c.completions.create(
        model=app.model, prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=2
    )
    ch = r.choices[0]
    assert ch.text.startswith(prompt) and r.usage.completion_tokens == 2
    check_prompt_part(ch.logprobs, 2)
    assert ch.logprobs.text_offset[len(ids)] == len(prompt)
    r0 = c.completions.create(
        model=app.model, prompt=prompt, max_tokens=0, temperature=0, echo=True, logprobs=2
    )
    assert r0.choices[0].text == prompt and r0.usage.completion_tokens == 0
    check_prompt_part(r0.choices[0].logprobs, 0)
    # Streamed: the first chunk carries the echo and the prompt's logprobs.
    with httpx.stream(
        "POST",
        app.v1 + "/completions",
        json={
            "model": app.model,
            "prompt": prompt,
            "max_tokens": 2,
            "temperature": 0,
            "echo": True,
            "logprobs": 2,
            "stream": True,
        },
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    ) as s:
        events = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
    first = events[0]["choices"][0]
    assert first["text"].startswith(prompt)
    assert first["logprobs"]["token_logprobs"][0] is None
    assert first["logprobs"]["token_logprobs"][1 : len(ids)] == pytest.approx(want[1:], abs=1e-3)
