"""KV payload: contents follow the layout (indexer rows for F layers only), it pickles, and a
decode replica refuses a payload of another plan, layout or version with a ValueError naming it."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from serving.engine import PAYLOAD_VERSION, KVPayload, LLMEngine, SamplingParams
from tests.engine.conftest import GREEDY


@pytest.fixture(scope="module")
def fssf_payload(model_dir, prompts) -> KVPayload:
    pre = LLMEngine.from_pretrained(model_dir(), "FSSF", role="prefill", num_blocks=4)
    return pre.prefill(prompts[:1], SamplingParams(**GREEDY))[0].payload


def test_payload_contents_follow_the_layout(fssf_payload, prompts):
    p = fssf_payload
    n = len(prompts[0])
    assert p.version == PAYLOAD_VERSION and p.num_tokens == n
    assert p.prompt_token_ids == prompts[0]
    assert p.layout["index_layers"] == [0, 3]
    assert [t is not None for t in p.index_k] == [True, False, False, True]
    assert all(tuple(t.shape) == (n, 1, p.layout["k_dim"]) for t in p.attn)
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in p.attn)
    # The indexer part of the payload shrinks with the plan: 2 of 4 layers carry rows.
    index_bytes = sum(t.numel() * t.element_size() for t in p.index_k if t is not None)
    assert index_bytes == n * 2 * p.layout["index_head_dim"] * 4
    again = pickle.loads(pickle.dumps(p))
    assert torch.equal(again.attn[2], p.attn[2]) and again.plan_id == p.plan_id


def test_decode_refuses_another_plan_and_keeps_serving(model_dir, fssf_payload, prompts, reference):
    dec = LLMEngine.from_pretrained(model_dir(), None, role="decode", num_blocks=8)  # all-F plan
    pre = LLMEngine.from_pretrained(model_dir(), None, role="prefill", num_blocks=8)
    sp = SamplingParams(**GREEDY)
    good = pre.prefill(prompts[:1], sp)[0].payload
    dec.import_payload(good, sp, "good")
    tokens = [good.first_token] + [t for o in dec.step() for t in o.token_ids]
    with pytest.raises(ValueError, match="plan_id"):
        dec.import_payload(fssf_payload, sp, "other-plan")
    while dec.has_unfinished():
        tokens += [t for o in dec.step() for t in o.token_ids]
    assert tokens == reference()[0]
    assert dec.block_manager.num_free == 8


@pytest.mark.parametrize(
    "change, field",
    [
        ({"version": PAYLOAD_VERSION + 1}, "version"),
        ({"layout_index_fp8": True}, "index_fp8"),
        ({"layout_dtype": "bfloat16"}, "dtype"),
        ({"layout_page_size": 32}, "page_size"),
        ({"num_tokens": 3}, "num_tokens"),
        ({"attn_truncate": True}, "attn"),
        ({"index_drop": 0}, "index_k"),
    ],
)
def test_mismatches_name_the_field(model_dir, fssf_payload, change, field):
    dec = LLMEngine.from_pretrained(model_dir(), "FSSF", role="decode", num_blocks=4)
    p = fssf_payload
    kw = {}
    for k, v in change.items():
        if k.startswith("layout_"):
            kw["layout"] = {**p.layout, k.removeprefix("layout_"): v}
        elif k == "attn_truncate":
            kw["attn"] = [t[:-1] for t in p.attn]
        elif k == "index_drop":
            kw["index_k"] = [None if i == v else t for i, t in enumerate(p.index_k)]
        else:
            kw[k] = v
    with pytest.raises(ValueError, match=field):
        dec.import_payload(dataclasses.replace(p, **kw), SamplingParams(**GREEDY))
    assert not dec.has_unfinished()


def test_payload_too_long_for_the_decode_pool(model_dir, fssf_payload):
    dec = LLMEngine.from_pretrained(
        model_dir(), "FSSF", role="decode", num_blocks=1, max_model_len=32
    )
    with pytest.raises(ValueError, match=f"payload has {fssf_payload.num_tokens} prompt tokens"):
        dec.import_payload(fssf_payload, SamplingParams(**GREEDY))


def test_first_token_that_finishes_needs_no_decode_forward(model_dir, prompts):
    pre = LLMEngine.from_pretrained(model_dir(), role="prefill", num_blocks=4)
    one = dataclasses.replace(SamplingParams(**GREEDY), max_tokens=1)
    res = pre.prefill(prompts[:1], one)[0]
    assert res.finish_reason == "length"
    dec = LLMEngine.from_pretrained(model_dir(), role="decode", num_blocks=4)
    out = dec.decode([res.payload], one)[0]
    assert out.token_ids == [res.first_token] and out.finish_reason == "length"
    assert not dec.has_unfinished() and dec.block_manager.num_free == 4
