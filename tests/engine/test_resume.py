"""A request resumed on a fresh engine (its replica died mid-stream) continues exactly: the
tokens and the text after the break are those of an uninterrupted run, for unified and for
prefill -> payload -> decode, with a stop-string holdback straddling the break."""

from __future__ import annotations

import pytest

from serving.engine import LLMEngine, Resume, SamplingParams

N = 12
PARAMS = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, stop=("\x00\x00\x00",))


def stream(engine: LLMEngine, rid: str) -> list[tuple[list[int], str]]:
    """Step an engine until `rid` finishes; its (token_ids, text) deltas in order."""
    out = []
    while True:
        for o in engine.step():
            if o.request_id == rid:
                out.append((o.token_ids, o.text))
                if o.finish_reason is not None:
                    return out


def seen_after(deltas, k: int) -> tuple[list[int], int]:
    """What a client holds once `k` tokens arrived: their ids and the characters sent so far."""
    ids, chars = [], 0
    for toks, text in deltas:
        if len(ids) >= k:
            break
        ids += toks
        chars += len(text)
    return ids, chars


def text_of(deltas) -> str:
    return "".join(t for _, t in deltas)


@pytest.fixture(scope="module")
def full(model_dir, prompts):
    eng = LLMEngine.from_pretrained(model_dir(), num_blocks=16)
    eng.add_request("r", prompts[0], PARAMS)
    deltas = stream(eng, "r")
    assert sum(len(t) for t, _ in deltas) == N
    return deltas


@pytest.mark.parametrize("k", [1, 5, N - 1])
def test_unified_resume_continues_exactly(model_dir, prompts, full, k):
    ids, chars = seen_after(full, k)
    eng = LLMEngine.from_pretrained(model_dir(), num_blocks=16)
    eng.add_request("r2", prompts[0], PARAMS, Resume(tuple(ids), chars))
    rest = stream(eng, "r2")
    all_ids = [t for toks, _ in full for t in toks]
    assert ids + [t for toks, _ in rest for t in toks] == all_ids
    assert text_of(full)[:chars] + text_of(rest) == text_of(full)
    assert eng.block_manager.num_free == eng.block_manager.num_blocks


@pytest.mark.parametrize("k", [1, 6])
def test_prefill_decode_resume_continues_exactly(model_dir, prompts, full, k):
    ids, chars = seen_after(full, k)
    resume = Resume(tuple(ids), chars)
    pre = LLMEngine.from_pretrained(model_dir(), role="prefill", num_blocks=16)
    pre.add_request("p", prompts[0], PARAMS, resume)
    [res] = _prefill(pre, "p")
    assert res.payload.num_tokens == len(prompts[0]) + k  # the resumed tokens travel as KV
    dec = LLMEngine.from_pretrained(model_dir(), role="decode", num_blocks=16)
    dec.import_payload(res.payload, PARAMS, "d", resume)
    rest = [([res.first_token], res.text), *stream(dec, "d")]
    all_ids = [t for toks, _ in full for t in toks]
    assert ids + [t for toks, _ in rest for t in toks] == all_ids
    assert text_of(full)[:chars] + text_of(rest) == text_of(full)


def _prefill(engine: LLMEngine, rid: str):
    while True:
        done = [o.prefill for o in engine.step() if o.request_id == rid and o.prefill]
        if done:
            return done


def test_resume_that_leaves_nothing_to_do_is_refused(model_dir, prompts):
    eng = LLMEngine.from_pretrained(model_dir(), num_blocks=16)
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add_request("x", prompts[0], PARAMS, Resume(tuple(range(N)), 0))
    with pytest.raises(ValueError, match="token_ids"):
        Resume((), 0)
    dec = LLMEngine.from_pretrained(model_dir(), role="decode", num_blocks=16)
    pre = LLMEngine.from_pretrained(model_dir(), role="prefill", num_blocks=16)
    [res] = pre.prefill([prompts[0]], PARAMS)
    with pytest.raises(ValueError, match="tail"):
        dec.import_payload(res.payload, PARAMS, "d", Resume((1, 2), 0))


def _grammar() -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})


@pytest.mark.parametrize(
    "kw, which",
    [
        # prompts[0] greedily repeats its first token at the 6th: the penalty must see it
        ({"frequency_penalty": 2.0, "presence_penalty": 2.0, "ignore_eos": True}, 0),
        ({"grammar": "json"}, 1),
    ],
    ids=["penalties", "grammar"],
)
def test_resume_replays_sampler_state(model_dir, prompts, kw, which):
    """Penalties count the resumed tokens and the grammar has consumed them: the resumed run
    samples what an uninterrupted one does (unified, and prefill -> decode)."""
    if kw.get("grammar") == "json":
        kw = {**kw, "grammar": _grammar()}
    params = SamplingParams(temperature=0, max_tokens=N, **kw)
    prompt = prompts[which]
    eng = LLMEngine.from_pretrained(model_dir(), num_blocks=16)
    eng.add_request("r", prompt, params)
    full = stream(eng, "r")
    all_ids = [t for toks, _ in full for t in toks]
    k = min(4, len(all_ids) - 1)
    assert k >= 2, all_ids
    ids, chars = seen_after(full, k)
    eng.add_request("r2", prompt, params, Resume(tuple(ids), chars))
    rest = stream(eng, "r2")
    assert ids + [t for toks, _ in rest for t in toks] == all_ids
    pre = LLMEngine.from_pretrained(model_dir(), role="prefill", num_blocks=16)
    pre.add_request("p", prompt, params, Resume(tuple(ids), chars))
    [res] = _prefill(pre, "p")
    dec = LLMEngine.from_pretrained(model_dir(), role="decode", num_blocks=16)
    dec.import_payload(res.payload, params, "d", Resume(tuple(ids), chars))
    rest = [([res.first_token], res.text), *stream(dec, "d")]
    assert ids + [t for toks, _ in rest for t in toks] == all_ids
