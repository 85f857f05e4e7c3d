"""Calibration data loading: formats, packing, provenance hash, errors that name the problem."""

from __future__ import annotations

import json

import pytest

from model.calibration import load_calibration
from model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer.from_pretrained(tiny_dir("dsa_llama"))


def _jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_jsonl_text_and_chat_records_are_packed(tmp_path, tok):
    f = _jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": "hello world " * 2},
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ]
            },
            {"text": "more text " * 10},
        ],
    )
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        add_generation_prompt=False,
    )
    want = (
        tok.encode("hello world " * 2)
        + [4]
        + tok.encode(chat)
        + [4]
        + tok.encode("more text " * 10)
        + [4]
    )
    d = load_calibration(f, tok, seq_len=20, num_seqs=3)
    assert d.ids.shape == (3, 20) and d.documents == 3
    assert d.ids.reshape(-1).tolist() == want[:60]
    assert d.files[0]["documents"] == 3 and d.provenance()["seq_len"] == 20


def test_plain_text_files_and_stable_hash(tmp_path, tok):
    a, b = tmp_path / "a.txt", tmp_path / "b.md"
    a.write_text("alpha " * 30)
    b.write_text("beta " * 30)
    d1 = load_calibration([a, b], tok, seq_len=32, num_seqs=8)
    d2 = load_calibration([str(a), str(b)], tok, seq_len=32, num_seqs=8)
    d3 = load_calibration([b, a], tok, seq_len=32, num_seqs=8)
    assert d1.sha256 == d2.sha256 != d3.sha256
    assert [f["name"] for f in d1.files] == ["a.txt", "b.md"]
    assert [b.shape[0] for b in d1.batches(3)] == [3, 3, 2]


@pytest.mark.parametrize(
    "content,name,match",
    [
        (None, "missing.jsonl", "does not exist"),
        ("", "empty.jsonl", "no JSONL records"),
        ("\n\n", "blank.jsonl", "no JSONL records"),
        ("", "empty.txt", "is empty"),
        ('{"text": "ok"}\n{not json}\n', "bad.jsonl", r"bad.jsonl:2 is not valid JSON"),
        ('{"prompt": "x"}\n', "keys.jsonl", "neither 'text' nor 'messages'"),
        ('{"text": 3}\n', "type.jsonl", "'text' must be a string"),
        ('["x"]\n', "list.jsonl", "must be a JSON object"),
        ('{"messages": []}\n', "msgs.jsonl", "'messages' must be a non-empty list"),
    ],
)
def test_bad_data_files_are_named(tmp_path, tok, content, name, match):
    f = tmp_path / name
    if content is not None:
        f.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_calibration(f, tok, seq_len=8, num_seqs=1)


def test_not_enough_tokens_says_how_many(tmp_path, tok):
    f = tmp_path / "short.txt"
    f.write_text("tiny")
    with pytest.raises(ValueError, match=r"5 tokens .* need num_seqs \* seq_len = 2 \* 16 = 32"):
        load_calibration(f, tok, seq_len=16, num_seqs=2)


def test_bad_shapes_name_the_field(tmp_path, tok):
    f = tmp_path / "a.txt"
    f.write_text("x " * 100)
    with pytest.raises(ValueError, match="seq_len"):
        load_calibration(f, tok, seq_len=1, num_seqs=1)
    with pytest.raises(ValueError, match="num_seqs"):
        load_calibration(f, tok, seq_len=8, num_seqs=0)
    with pytest.raises(ValueError, match="not UTF-8"):
        (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
        load_calibration(tmp_path / "bin.txt", tok, seq_len=8, num_seqs=1)
