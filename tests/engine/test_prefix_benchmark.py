"""benchmarks/prefix_cache.py: a CPU smoke run (tiny model) of cached vs uncached TTFT."""

from __future__ import annotations

import json

from benchmarks.prefix_cache import main


def test_prefix_cache_benchmark_smoke(tmp_path):
    out = tmp_path / "pc.json"
    args = ["--prefix-tokens", "512", "--new-tokens", "16", "--max-num-batched-tokens", "128"]
    report = main([*args, "--out", str(out)])
    assert json.loads(out.read_text())["summary"] == report["summary"]
    for r in report["results"].values():
        # the prefix's 8 pages are reused: one prefill step instead of five
        assert r["cached"]["hit_tokens"] == r["expected_hit_tokens"] == 512
        assert r["uncached"]["hit_tokens"] == 0
        assert r["cached"]["prefill_steps"] == 1 < r["uncached"]["prefill_steps"] == 5
        assert r["tokens_match_uncached_engine"]
        assert r["pages_used_after"] == 0 and r["pages_cached_after"] >= 8
        assert r["ttft_ratio"] > 0  # timing is reported, not asserted: CI machines are shared
