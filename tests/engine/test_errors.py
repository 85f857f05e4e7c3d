"""Bad requests raise ValueError naming the field, leave nothing allocated, and the engine keeps
serving the requests around them."""

from __future__ import annotations

import dataclasses

import pytest

from serving.engine import LLMEngine, SamplingParams
from tests.engine.conftest import GREEDY


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"seed": "x"}, "seed"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
        ({"stop": ("",)}, "stop"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": 1.5}, "prompt_logprobs"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty"),  # would overflow fp32 logits
    ],
)
def test_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_lists():
    p = SamplingParams(stop="##", stop_token_ids=[3, 4])
    assert p.stop == ("##",) and p.stop_token_ids == (3, 4)
    hash(p)  # frozen and hashable


def test_bad_requests_do_not_disturb_others(model_dir, prompts, reference):
    eng = LLMEngine.from_pretrained(
        model_dir(), max_num_batched_tokens=64, num_blocks=8, max_model_len=120
    )
    sp = SamplingParams(**GREEDY)
    eng.add_request("good", prompts[0], sp)
    done = {"good": [t for o in eng.step() for t in o.token_ids]}  # mid-flight from here on
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request("long", prompts[2], sp)  # 126 tokens > max_model_len 120
    with pytest.raises(ValueError, match="prompt is empty"):
        eng.add_request("empty", [], sp)
    with pytest.raises(ValueError, match="prompt token ids"):
        eng.add_request("oov", [1, 2, 10**6], sp)
    with pytest.raises(ValueError, match="request_id"):
        eng.add_request("good", prompts[1], sp)
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add_request("zero", prompts[1], dataclasses.replace(sp, max_tokens=0))
    with pytest.raises(ValueError, match="params"):
        eng.add_request("dict", prompts[1], {"max_tokens": 3})
    with pytest.raises(ValueError, match="prompt"):  # one bad prompt rejects the whole batch
        eng.generate([prompts[1], prompts[2]], sp)
    assert set(eng.seqs) == {"good"}
    while eng.has_unfinished():
        for o in eng.step():
            done.setdefault(o.request_id, []).extend(o.token_ids)
    assert done == {"good": reference()[0]}
    assert eng.block_manager.num_free == eng.block_manager.num_blocks


def test_prompt_larger_than_the_pool_is_refused(model_dir, prompts):
    eng = LLMEngine.from_pretrained(model_dir(), num_blocks=1)  # 64 token slots
    with pytest.raises(ValueError, match="KV cache holds"):
        eng.generate([prompts[1]], SamplingParams(**GREEDY))
    out = eng.generate([prompts[0][:30]], SamplingParams(**GREEDY))[0]
    assert len(out.token_ids) == 6


def test_generation_stops_at_max_model_len(model_dir, prompts):
    eng = LLMEngine.from_pretrained(model_dir(), num_blocks=4, max_model_len=len(prompts[0]) + 3)
    out = eng.generate([prompts[0]], SamplingParams(**GREEDY))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_engine_config_errors(model_dir):
    with pytest.raises(ValueError, match="role"):
        LLMEngine.from_pretrained(model_dir(), role="both")
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLMEngine.from_pretrained(model_dir(), max_num_batched_tokens=0)
    with pytest.raises(ValueError, match="kv_memory_bytes"):
        LLMEngine.from_pretrained(model_dir(), kv_memory_bytes=1000)
    with pytest.raises(ValueError, match="max_model_len"):
        LLMEngine.from_pretrained(model_dir(), max_model_len=10**6)


def test_roles_refuse_the_wrong_calls(model_dir, prompts, reference):
    sp = SamplingParams(**GREEDY)
    pre = LLMEngine.from_pretrained(model_dir(), role="prefill", num_blocks=4)
    dec = LLMEngine.from_pretrained(model_dir(), role="decode", num_blocks=4)
    with pytest.raises(ValueError, match="role"):
        pre.generate(prompts[:1], sp)
    # A decode engine prefills a prompt sent straight to it (selective disaggregation).
    dec.add_request("x", prompts[0], sp)
    got: list[int] = []
    while dec.has_unfinished():
        got += [t for o in dec.step() for t in o.token_ids]
    assert got == reference()[0]
    payload = pre.prefill(prompts[:1], sp)[0].payload
    with pytest.raises(ValueError, match="role"):
        pre.import_payload(payload, sp)


def _lexer_limited(eng: LLMEngine, rid: str, grammar: str) -> None:
    """Give request `rid` a matcher with a tiny lexer budget: llguidance then hits a resource
    limit a few tokens in (as a pathological grammar does under the default limits), and the
    matcher goes into its error state mid-decode."""
    import llguidance

    from serving.engine.grammar import ll_tokenizer

    st = eng.seqs[rid].sampling
    st.mask[0].result()
    lltok = ll_tokenizer(eng.tokenizer, eng.model.config.vocab_size, sorted(eng.eos_token_ids))
    limits = llguidance.LLParserLimits(step_lexer_fuel=200)
    st.matcher = llguidance.LLMatcher(lltok, grammar, log_level=0, limits=limits)
    st.mask = (eng.sampler._worker().submit([st.matcher]), 0)


def _drain(eng: LLMEngine) -> tuple[dict[str, list[int]], dict[str, BaseException]]:
    toks: dict[str, list[int]] = {}
    errors: dict[str, BaseException] = {}
    for _ in range(200):
        if not eng.has_unfinished():
            break
        for o in eng.step():
            toks.setdefault(o.request_id, []).extend(o.token_ids)
            if o.error is not None:
                errors[o.request_id] = o.error
    assert not eng.has_unfinished()
    return toks, errors


def test_a_request_whose_sampler_state_fails_fails_alone(model_dir, prompts, reference):
    from serving.structured import _json_grammar

    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    grammar = _json_grammar(schema)
    eng = LLMEngine.from_pretrained(model_dir(), num_blocks=16)
    sp = SamplingParams(**GREEDY)
    structured = SamplingParams(temperature=0.0, max_tokens=12, grammar=grammar)
    penalised = SamplingParams(**{**GREEDY, "frequency_penalty": 1.0})
    alone = {
        "json": eng.generate([prompts[1]], structured)[0].token_ids,
        "pen": eng.generate([prompts[2]], penalised)[0].token_ids,
    }
    for rid, p, params in [
        ("plain", prompts[0], sp),
        ("json", prompts[1], structured),
        ("bad", prompts[1], structured),
        ("pen", prompts[2], penalised),
    ]:
        eng.add_request(rid, p, params)
    _lexer_limited(eng, "bad", grammar)
    toks, errors = _drain(eng)
    assert set(errors) == {"bad"} and "grammar" in str(errors["bad"]), errors
    assert 0 < len(toks["bad"]) < 12  # it ran a few tokens, then its grammar failed
    assert toks["plain"] == reference()[0]
    assert toks["json"] == alone["json"] and toks["pen"] == alone["pen"]
    assert eng.block_manager.num_free == eng.block_manager.num_blocks and not eng.seqs


def test_a_row_that_breaks_the_batched_sampler_fails_alone(model_dir, prompts, reference):
    """A grammar mask of the wrong width (say a tokenizer built for another vocabulary) raises
    inside the batched sampler; rows are then sampled one by one and only that request fails."""
    from concurrent.futures import Future

    import torch

    from serving.engine.grammar import mask_words
    from serving.structured import _json_grammar

    eng = LLMEngine.from_pretrained(model_dir(), num_blocks=16)
    sp = SamplingParams(**GREEDY)
    eng.add_request("a", prompts[0], sp)
    eng.add_request("bad", prompts[1], SamplingParams(**GREEDY, grammar=_json_grammar({})))
    eng.add_request("c", prompts[2], sp)
    st = eng.seqs["bad"].sampling
    st.mask[0].result()
    wrong: Future = Future()
    wrong.set_result(torch.zeros(1, mask_words(eng.model.config.vocab_size) + 1, dtype=torch.int32))
    st.mask = (wrong, 0)
    toks, errors = _drain(eng)
    assert set(errors) == {"bad"} and "width" in str(errors["bad"]), errors
    assert toks["a"] == reference()[0] and toks["c"] == reference()[2]
    assert eng.block_manager.num_free == eng.block_manager.num_blocks and not eng.seqs
