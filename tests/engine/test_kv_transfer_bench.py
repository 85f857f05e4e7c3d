"""benchmarks/kv_transfer.py --quick: the tiny shape through both stages (payloads exported
into pinned/plain host memory and imported into reserved pages, rows checked; decode steps with
and without imports), results JSON and the table."""

from __future__ import annotations

import json

from benchmarks.kv_transfer import main


def test_kv_transfer_quick(tmp_path):
    out = tmp_path / "kvt.json"
    report = main(["--quick", "--contexts", "256", "--steps", "8", "--out", str(out)])
    assert json.loads(out.read_text())["summary"] == report["summary"]
    [row] = report["transfer"]
    assert row["tokens"] == 256 and row["rows_match"]
    assert row["payload_bytes"] >= 256 * report["bytes_per_token"]
    assert row["export_gbps"] > 0 and row["import_gbps"] > 0 and row["legacy_export_gbps"] > 0
    d = report["decode_under_imports"]
    assert d["imports_done"] >= 2  # imports really ran during the measured steps
    assert d["itl_p50_ms"] > 0 and d["itl_p99_ms_importing"] >= d["itl_p50_ms_importing"]
    assert isinstance(report["summary"]["target_met"], bool)
