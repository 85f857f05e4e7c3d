"""KV payload: contents follow the layout (indexer rows for F layers only) in one flat tensor, it
pickles, and a decode replica refuses a payload of another plan, layout or version, or bytes that
are not what its header announced, with a ValueError naming it."""

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
    h, n = p.header, len(prompts[0])
    assert h.version == PAYLOAD_VERSION and p.num_tokens == n
    assert h.prompt_token_ids == prompts[0]
    assert h.layout["index_layers"] == [0, 3]
    assert [t is not None for t in p.index_k] == [True, False, False, True]
    assert all(tuple(t.shape) == (n, 1, h.layout["k_dim"]) for t in p.attn)
    # One flat host tensor holds everything; the per-layer tensors are views of it.
    assert p.data.device.type == "cpu" and p.data.dtype == torch.uint8
    assert p.nbytes == h.nbytes == p.data.numel()
    assert all(t.untyped_storage().data_ptr() == p.data.data_ptr() for t in p.attn)
    # The indexer part of the payload shrinks with the plan: 2 of 4 layers carry rows.
    index_bytes = sum(t.numel() * t.element_size() for t in p.index_k if t is not None)
    assert index_bytes == n * 2 * h.layout["index_head_dim"] * 4
    attn_bytes = sum(t.numel() * t.element_size() for t in p.attn)
    assert attn_bytes + index_bytes <= p.nbytes < attn_bytes + index_bytes + 16 * 6
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
        ({"layout_index_layers": [0, 1, 2, 3]}, "index_layers"),
        ({"num_tokens": 3}, "num_tokens"),
    ],
)
def test_header_mismatches_name_the_field(model_dir, fssf_payload, change, field):
    dec = LLMEngine.from_pretrained(model_dir(), "FSSF", role="decode", num_blocks=4)
    h = fssf_payload.header
    kw = {}
    for k, v in change.items():
        if k.startswith("layout_"):
            kw["layout"] = {**h.layout, k.removeprefix("layout_"): v}
        else:
            kw[k] = v
    bad = dataclasses.replace(h, **kw)
    with pytest.raises(ValueError, match=field):
        dec.reserve(bad, SamplingParams(**GREEDY))
    assert not dec.has_unfinished() and not dec.scheduler.reserving


@pytest.mark.parametrize("change", ["truncated", "first_token", "prompt"])
def test_bytes_that_are_not_the_reserved_ones_are_refused(model_dir, fssf_payload, change):
    """The header reserves; the bytes pulled afterwards must be the ones it announced."""
    dec = LLMEngine.from_pretrained(model_dir(), "FSSF", role="decode", num_blocks=4)
    p, sp = fssf_payload, SamplingParams(**GREEDY)
    dec.reserve(p.header, sp, "r")
    assert [o.request_id for o in dec.poll_handoffs() if o.reserved] == ["r"]
    if change == "truncated":
        bad = KVPayload(p.header, p.data[:-16])
    elif change == "first_token":
        bad = KVPayload(dataclasses.replace(p.header, first_token=p.first_token + 1), p.data)
    else:
        ids = [7] + p.header.prompt_token_ids[1:]
        bad = KVPayload(dataclasses.replace(p.header, prompt_token_ids=ids), p.data)
    with pytest.raises(ValueError, match="payload"):
        dec.fill("r", bad)
    dec.fill("r", p)  # the reservation still takes the right bytes
    while dec.has_unfinished():
        dec.step()
    assert dec.block_manager.num_free == 4


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
