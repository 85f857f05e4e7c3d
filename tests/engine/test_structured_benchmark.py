"""benchmarks/structured_decode.py: a CPU smoke run (tiny model) of plain vs constrained decode."""

from __future__ import annotations

import json

from benchmarks.structured_decode import main


def test_structured_decode_benchmark_smoke(tmp_path):
    out = tmp_path / "sd.json"
    report = main(["--batch", "4", "--gen", "12", "--rounds", "1", "--out", str(out)])
    assert json.loads(out.read_text())["summary"] == report["summary"]
    s = report["summary"]
    assert s["outputs_conform"] and s["all_requests_full_length"]
    assert s["sample"].startswith('[{"name":"')  # the schema's shape, from the first token on
    r = report["rounds"][0]
    assert r["plain"]["decode_steps"] == r["constrained"]["decode_steps"] == 11
    assert r["plain"]["mask_worker_ms"] == 0 < r["constrained"]["mask_worker_ms"]
    assert r["constrained"]["grammar_share"] > r["plain"]["grammar_share"]
    assert not r["constrained"]["errors"]
    assert s["plain_decode_tok_s"] > 0  # timing is reported, not asserted: CI machines are shared
