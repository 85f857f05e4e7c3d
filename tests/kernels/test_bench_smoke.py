"""kernels.bench end to end at toy sizes on the CPU (interpreter), with the timers stubbed out:
every section, the config sweeps, the spot checks and the report writers must run without error,
so the GPU machine's scarce minutes are never lost to a bench bug."""

from __future__ import annotations

import json

import pytest

from kernels import bench, bench_report
from kernels.indexer import triton as itri
from kernels.sparse_attn import triton as stri
from kernels.topk import triton as topk_tri

TOY = bench.Shapes(
    lengths=(24, 40),
    sweep_len=40,
    heads=4,
    dim=32,
    topk=16,
    attn_lens=(40, 24),
    mla=(48, 32),
    gqa=(2, 16),
    dec_batch=3,
    dec_len=100,
    dec_heads=(4,),
    store_tokens=100,
    quant_tokens=10,
    glm_index_heads=3,
    glm_mla_heads=5,
    glm_lengths=(40,),
    glm_dec_batches=(1, 2),
    glm_dec_len=90,
    device="cpu",
    half="float16",
)  # bf16 tl.dot is wrong under the interpreter


@pytest.mark.interpret
@pytest.mark.slow
def test_bench_runs_every_section(monkeypatch, tmp_path, device):
    if device.type != "cpu":
        pytest.skip("the toy run is for the interpreter; the GPU runs the real bench")
    calls = []

    def fake_ms(fn, *args, **kwargs):
        fn(*args, **kwargs)
        calls.append(fn)
        return 1.0

    # Interpreter-sized configs (two of each, so the sweeps still choose).
    monkeypatch.setattr(
        itri, "PREFILL_CONFIGS", [itri.INTERPRET_PREFILL, dict(itri.INTERPRET_PREFILL, BN=64)]
    )
    monkeypatch.setattr(itri, "DECODE_CONFIGS", [itri.INTERPRET_DECODE] * 2)
    monkeypatch.setattr(stri, "WIDE_CONFIGS", [stri.INTERPRET_CONFIG] * 2)
    monkeypatch.setattr(stri, "EXPERIMENTAL_WIDE", [])
    monkeypatch.setattr(topk_tri, "CONFIGS", [topk_tri.INTERPRET] * 2)
    monkeypatch.setattr(bench, "bench_ms", fake_ms)
    monkeypatch.setattr(
        bench.base, "time_slow", lambda fn, *a, reps=1, **k: fake_ms(fn, *a, **k) * 2
    )
    out = bench.run(TOY, list(bench.SECTIONS))
    assert out["errors"] == {}
    ops = {r["op"] for r in out["results"]}
    assert ops == {
        "indexer+topk prefill",
        "indexer+topk decode",
        "sparse attn prefill",
        "sparse attn decode",
        "kv store",
        "act_quant fp8",
        "topk decode",
    }
    glm = [r for r in out["results"] if r.get("model") == "GLM-4.7-Flash"]
    assert {r["section"] for r in glm} == {"glm_indexer", "glm_sparse", "glm_decode"}
    assert all("pytorch_ms" in r for r in glm)  # every GLM row has its batched baseline
    decode_checks = [r["check"] for r in glm if "check" in r]
    assert len(decode_checks) == 2 + 2 * 2 + 1, decode_checks  # top-k, indexer x2, ragged
    assert all(c.startswith("ok") for c in decode_checks), decode_checks
    checks = [r["check_last_rows"] for r in out["results"] if "check_last_rows" in r]
    assert checks and all(c.startswith("ok") for c in checks), checks
    errs = [r["rms_err_last_rows"] for r in out["results"] if "rms_err_last_rows" in r]
    assert errs and max(errs) < 2e-3  # fp16 output rounding
    assert all(isinstance(v, float) for t in out["sweeps"].values() for v in t.values())
    readme = tmp_path / "README.md"
    bench_report.write_readme(
        readme, out, bench_report.table(out), bench.MARK_START, bench.MARK_END
    )
    bench_report.plot_indexer(out, tmp_path / "p.png", bench.PUBLISHED_INDEXER)
    bench_report.plot_indexer(out, tmp_path / "g.png", {}, model="GLM-4.7-Flash")
    assert "indexer+topk prefill" in readme.read_text() and (tmp_path / "p.png").stat().st_size
    assert (tmp_path / "g.png").stat().st_size
    json.dumps(out)
    # a later run of one section replaces that section's rows and keeps the others
    again = bench.run(TOY, ["small"])
    merged = bench.merge(out, again, ["small"])
    assert len(merged["results"]) == len(out["results"])
    assert [r["section"] for r in merged["results"]][-len(again["results"]) :] == ["small"] * len(
        again["results"]
    )


@pytest.mark.interpret
def test_bench_moe_quick(tmp_path, device, monkeypatch):
    """kernels.bench_moe --quick --sweep: checks, timings, floors, table and JSON all come out,
    with the fused op really the Triton path (under the interpreter) and correct."""
    if device.type != "cpu":
        pytest.skip("the toy run is for the interpreter; the GPU runs the real bench")
    from kernels import bench_moe
    from kernels.moe import triton as mtri

    launches = []
    real = mtri.fused_moe
    monkeypatch.setattr(mtri, "fused_moe", lambda *a, **k: launches.append(1) or real(*a, **k))
    out = tmp_path / "moe.json"
    assert bench_moe.main(["--quick", "--sweep", "--fp8", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert [r["T"] for r in res] == [1, 33, 1, 9]
    assert res[2]["fp8_check"] == "ok" and res[3]["fp8_ms"] > 0 and "fp8_ms" not in res[0]
    assert "FP8 speedup" in bench_moe.table(res)
    for r in res:
        assert r["check"] == "ok" and r["rms_rel_err"] < 1e-5, r
        assert r["fused_ms"] > 0 and r["torch_sort_loop_ms"] > 0 and r["flop_floor_ms"] > 0
        assert all(isinstance(v, float) for v in r["sweep_ms"].values()), r["sweep_ms"]
    assert len(launches) >= 2 * 3  # check, warm-up + timed run, sweep: Triton, not the ref
    assert "torch sort+loop" in bench_moe.table(res)


@pytest.mark.interpret
def test_bench_fp8_gemm_quick(tmp_path, device, monkeypatch):
    """kernels.bench_fp8_gemm --quick --sweep: check, timings, table and JSON all come out, the
    GEMM really the Triton path (under the interpreter) and correct."""
    if device.type != "cpu":
        pytest.skip("the toy run is for the interpreter; the GPU runs the real bench")
    from kernels import bench_fp8_gemm
    from kernels.fp8_gemm import triton as gtri

    launches = []
    real = gtri.fp8_gemm
    monkeypatch.setattr(gtri, "fp8_gemm", lambda *a, **k: launches.append(1) or real(*a, **k))
    out = tmp_path / "g.json"
    assert bench_fp8_gemm.main(["--quick", "--sweep", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert [(r["shape"], r["M"]) for r in res] == [
        ("toy", 1),
        ("toy", 33),
        ("toy-even", 1),
        ("toy-even", 33),
    ]
    for r in res:
        assert r["check"] == "ok" and r["gemm_ms"] > 0 and r["bf16_linear_ms"] > 0, r
        assert all(isinstance(v, float) for v in r["sweep_ms"].values()), r["sweep_ms"]
    assert len(launches) >= 4 * 6  # check, 2 x gemm, 2 x linear, sweep per row
    assert "share of 1410" in bench_fp8_gemm.table(res)
