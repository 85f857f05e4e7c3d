"""Quality harness: window picking, needle construction and scoring, dense vs sparse plans
(on a tiny random dsa_llama checkpoint, so it runs in seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.quality import eval as qeval
from model.tokenizer import Tokenizer

WORDS = "the whale sea ship captain said and of a to old man boat night".split()


@pytest.fixture
def heldout(tmp_path, tiny_dir):
    """A held-out split of byte-tokenised sentences: docs of 700, 90 and 260 tokens."""
    tok = Tokenizer.from_pretrained(tiny_dir("dsa_llama"))
    rng = np.random.default_rng(0)
    docs = []
    for n in (700, 90, 260):
        ids = []
        while len(ids) < n:
            ids += tok.encode(" ".join(rng.choice(WORDS, 6)).capitalize() + ". ")
        docs.append(np.array(ids[:n], dtype=np.uint16))
    np.save(tmp_path / "heldout.npy", np.concatenate(docs))
    np.save(tmp_path / "heldout_offsets.npy", np.cumsum([0] + [len(d) for d in docs]))
    return tmp_path


def test_windows_stay_inside_documents_and_cover_them(heldout):
    data = qeval.Heldout.load(heldout)
    w = qeval.pick_windows(data, 128, 6, seed=0)
    assert w == qeval.pick_windows(data, 128, 6, seed=0)
    assert len(set(w)) == 6
    assert all(s % 128 == 0 and s + 128 <= data.lengths[d] for d, s in w)
    assert {d for d, _ in w[:2]} == {0, 2}  # round-robin: both long-enough docs come first
    with pytest.raises(ValueError, match="only 7 windows"):
        qeval.pick_windows(data, 128, 8, seed=0)
    with pytest.raises(ValueError, match="no held-out document has 1024"):
        qeval.pick_windows(data, 1024, 1, seed=0)


def test_needles(heldout, tiny_dir):
    tok = Tokenizer.from_pretrained(tiny_dir("dsa_llama"))
    data = qeval.Heldout.load(heldout)
    cases = qeval.make_needles(tok, data, 200, 4, seed=3)
    assert [c.depth for c in cases] == [0.125, 0.375, 0.625, 0.875]
    for c in cases:
        assert len(c.ids) == 200 and len(c.code) == 4
        text = tok.decode(c.ids)
        assert f"The secret passcode is {c.code}." in text
        assert text.endswith(qeval.QUESTION + f" {c.code}")
        assert tok.decode(c.ids[c.answer_start :]) == f" {c.code}"
        assert tok.decode(c.ids[: c.needle_at]).endswith(".")  # inserted at a sentence end
    assert cases == qeval.make_needles(tok, data, 200, 4, seed=3)
    assert [c.code for c in cases] != [c.code for c in qeval.make_needles(tok, data, 200, 4, 4)]


def test_teacher_forced_needle_score_equals_greedy_decoding(heldout, tiny_dir):
    path = tiny_dir("dsa_llama")
    tok = Tokenizer.from_pretrained(path)
    model = qeval.load_for_plan(path, qeval.parse_plan("all-F", 4), torch.float32, "cpu", 200)
    case = qeval.make_needles(tok, qeval.Heldout.load(heldout), 200, 1, seed=0)[0]
    res = qeval.needle_accuracy(model, tok, [case], progress=False)
    prompt = case.ids[: case.answer_start]
    greedy = []
    with torch.no_grad():
        for _ in range(len(case.ids) - case.answer_start):
            greedy.append(int(model(torch.tensor(prompt + greedy)[None])[0, -1].argmax()))
    want = case.ids[case.answer_start :]
    assert res["cases"][0]["hit"] == (greedy == want)
    assert tok.encode(res["cases"][0]["pred"])[0] == greedy[0]


def test_plans_parse():
    assert qeval.parse_plan("uniform:4", 10).pattern == "FSSSFSSSFS"
    assert qeval.parse_plan("freq:2:2", 5).pattern == "FFSFS"
    assert qeval.parse_plan("dense", 3) == qeval.PlanSpec("dense", "FSS", dense=True)
    with pytest.raises(ValueError, match="length 3"):
        qeval.parse_plan("FSS", 4)
    with pytest.raises(ValueError, match="'x' is not an integer"):
        qeval.parse_plan("uniform:x", 4)


def test_dense_plan_ignores_indexers_and_sparse_plans_do_not(heldout, tiny_dir):
    path = tiny_dir("dsa_llama")  # index_topk 16: a 128-token window really drops keys
    ids = torch.tensor(qeval.Heldout.load(heldout).doc(0)[:128].astype(np.int64))[None]
    for spec, changes in (("dense", False), ("all-F", True)):
        model = qeval.load_for_plan(path, qeval.parse_plan(spec, 4), torch.float32, "cpu", 128)
        before = qeval.token_logprobs(model, ids)[0]
        with torch.no_grad():
            for layer in model.model.layers:
                if layer.self_attn.indexer is not None:
                    layer.self_attn.indexer.wk.weight.normal_()
        after = qeval.token_logprobs(model, ids)[0]
        assert (not torch.equal(before, after)) == changes, spec


def test_evaluate_end_to_end(heldout, tiny_dir, tmp_path):
    out = tmp_path / "rows.json"
    rc = qeval.main(
        [
            "--model",
            tiny_dir("dsa_llama"),
            "--data",
            str(heldout),
            "--plans",
            "dense",
            "all-F",
            "uniform:2",
            "--lengths",
            "200",
            "256",
            "--windows",
            "2",
            "--needles",
            "2",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 3 * 2 * 2
    ppl = {(r["plan"], r["length"]): r["result"]["ppl"] for r in rows if r["metric"] == "ppl"}
    assert all(np.isfinite(v) and v > 1 for v in ppl.values())
    assert ppl[("dense", 256)] != ppl[("all-F", 256)]
    assert {r["pattern"] for r in rows} == {"FSSS", "FFFF", "FSFS"}
    assert (
        qeval.main(
            [
                "--model",
                tiny_dir("dsa_llama"),
                "--data",
                str(heldout),
                "--lengths",
                "8192",
                "--quiet",
            ]
        )
        == 2
    )
