"""Data splits: the R lazy-load reader, document-level splitting, reproducible files + manifest."""

from __future__ import annotations

import gzip
import json
import struct
import zlib

import numpy as np
import pytest

from benchmarks.quality import data as qdata
from benchmarks.quality.rdata import read_lazyload, unserialize
from benchmarks.quality.sources import Doc, Fetched


def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def _char(s: str | None) -> bytes:
    if s is None:
        return _i(9) + _i(-1)
    b = s.encode()
    return _i(0x8009) + _i(len(b)) + b  # CHARSXP, UTF-8 flag


def _strs(v: list) -> bytes:
    return _i(16) + _i(len(v)) + b"".join(_char(x) for x in v)


def _names(names: list[str], first: bool) -> bytes:
    # pairlist(names = ...): R writes the symbol once and a back-reference (REFSXP 1) later.
    sym = _i(1) + _char("names") if first else _i((1 << 8) | 255)
    return _i(0x402) + sym + _strs(names) + _i(254)


def _named_list(items: dict[str, bytes], first: bool) -> bytes:
    return _i(0x213) + _i(len(items)) + b"".join(items.values()) + _names(list(items), first)


HEADER = b"X\n" + _i(3) + _i(0x40201) + _i(0x30500) + _i(5) + b"UTF-8"


def test_unserialize_character_vector():
    assert unserialize(HEADER + _strs(["It is a truth", "", None, "naïve"])) == [
        "It is a truth",
        "",
        None,
        "naïve",
    ]


def test_read_lazyload(tmp_path):
    novels = {"emma": ["EMMA", "", "By Jane Austen"], "persuasion": ["Persuasion", "x" * 50]}
    rdb, index = b"", {}
    for name, lines in novels.items():
        raw = HEADER + _strs(lines)
        entry = _i(len(raw)) + zlib.compress(raw)
        index[name] = _i(13) + _i(2) + _i(len(rdb)) + _i(len(entry))  # INTSXP (offset, length)
        rdb += entry
    rdx = HEADER + _named_list(
        {"variables": _named_list(index, first=True), "compressed": _i(10) + _i(1) + _i(1)},
        first=False,
    )
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(rdx))
    assert read_lazyload(tmp_path / "Rdata") == novels


def _fake_sources(monkeypatch):
    rng = np.random.default_rng(0)
    words = ["the", "whale", "sea", "ship", "captain", "said", "and", "of", "a", "to"]

    def text(n):
        return " ".join(rng.choice(words, n)) + ".\n"

    many_docs = [Doc(f"many/{i:02d}", "many", text(40 + i)) for i in range(40)]
    book_docs = [Doc(f"books/{i}", "books", text(300)) for i in range(4)]
    one = [Doc("one", "one", text(500))]

    def many(work):
        return [Fetched("fake:many", "1", "0" * 64, many_docs)]

    def books(work):
        return [
            Fetched("fake:books", "1", "1" * 64, book_docs),
            Fetched("fake:one", "1", "2" * 64, one),
        ]

    monkeypatch.setattr(qdata, "SOURCES", {"many": many, "books": books})


def test_build_splits_by_document_and_reproducibly(tmp_path, monkeypatch, tiny_dir):
    _fake_sources(monkeypatch)
    tok = tiny_dir("dsa_llama")
    m1 = qdata.build(tmp_path / "a", tmp_path / "w", 0, ["many", "books"], tok)
    m2 = qdata.build(tmp_path / "b", tmp_path / "w", 0, ["many", "books"], tok)
    assert m1 == m2
    for s in qdata.SPLITS:
        a, b = (tmp_path / d / f"{s}.npy" for d in "ab")
        assert a.read_bytes() == b.read_bytes()
    ids = {s: {d[0] for d in m1["splits"][s]["docs"]} for s in qdata.SPLITS}
    assert not (
        ids["train"] & ids["calib"]
        or ids["train"] & ids["heldout"]
        or ids["calib"] & ids["heldout"]
    )
    assert len(set().union(*ids.values())) == 45
    assert "one" in ids["heldout"]  # a single-document source is held out whole
    assert sum(d.startswith("books/") for d in ids["heldout"]) == 1
    assert sum(d.startswith("many/") for d in ids["heldout"]) == 4  # 10 %
    assert sum(d.startswith("many/") for d in ids["calib"]) == 2  # 5 %
    # offsets delimit the documents; token counts add up; dtype is uint16
    for s in qdata.SPLITS:
        toks = np.load(tmp_path / "a" / f"{s}.npy")
        off = np.load(tmp_path / "a" / f"{s}_offsets.npy")
        assert toks.dtype == np.uint16 and off[-1] == len(toks) == m1["splits"][s]["tokens"]
        assert list(np.diff(off)) == [d[1] for d in m1["splits"][s]["docs"]]
    lines = (tmp_path / "a" / "calib.jsonl").read_text().splitlines()
    assert len(lines) == len(ids["calib"]) and all("text" in json.loads(x) for x in lines)
    # a different seed gives a different split
    m3 = qdata.build(tmp_path / "c", tmp_path / "w", 1, ["many", "books"], tok)
    assert m3["splits"]["heldout"]["docs"] != m1["splits"]["heldout"]["docs"]


def test_verify_detects_changes(tmp_path, monkeypatch, tiny_dir):
    _fake_sources(monkeypatch)
    qdata.build(tmp_path / "a", tmp_path / "w", 0, ["many"], tiny_dir("dsa_llama"))
    manifest = tmp_path / "a" / "manifest.json"
    assert qdata.verify(tmp_path / "a", manifest) == []
    arr = np.load(tmp_path / "a" / "train.npy")
    arr[0] ^= 1
    np.save(tmp_path / "a" / "train.npy", arr)
    assert qdata.verify(tmp_path / "a", manifest) == ["train.npy"]
    assert qdata.main(["--verify", str(tmp_path / "a"), "--manifest", str(manifest)]) == 1


def test_committed_manifest_is_consistent():
    m = json.loads(qdata.MANIFEST.read_text())
    for s in qdata.SPLITS:
        info = m["splits"][s]
        assert info["tokens"] == sum(d[1] for d in info["docs"])
        assert info["num_docs"] == len(info["docs"])
    ids = [d[0] for s in qdata.SPLITS for d in m["splits"][s]["docs"]]
    assert len(ids) == len(set(ids))
    assert m["splits"]["heldout"]["docs_ge_8k"] >= 8


def test_missing_tool_is_a_clear_error(tmp_path, monkeypatch):
    from benchmarks.quality import sources

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="`apt-get` is not available"):
        sources.apt_download("r-cran-janeaustenr", tmp_path)
