"""`python -m kernels.bench_moe --out moe.json`: time kernels.moe.fused_moe on a CUDA GPU.

Per shape and token count: a correctness check against the reference first, then the median
time (triton.testing.do_bench) of the fused op and of "torch sort+loop" (the per-expert loop
model.layers.mlp.Experts ran before the fused op: stable sort by expert, one F.linear pair per
expert, index_add_; one host sync per call), beside two floors: the GEMM FLOPs at the measured
bf16 matmul rate and the bytes of the experts the routing touches at the copy bandwidth.
Routing: k distinct experts per token, uniformly at random. --sweep also times the candidate
configs of the token count's regime (kernels/moe/triton.py SWEEP). --fp8 adds, per row, the FP8
variant (fused_moe_fp8: the same experts block-quantised to e4m3 with 128 x 128 scales, the
activations per token and 128-block) checked against its reference and timed (fp8_ms).
--quick: toy shapes in fp32
on the CPU under the Triton interpreter, timed with a wall clock: the smoke test
(tests/kernels/test_bench_smoke.py; its conftest sets TRITON_INTERPRET and patches the
interpreter's loop bounds for numpy 2).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.moe import fused_moe, fused_moe_fp8
from kernels.moe import triton as mtri
from kernels.testing import rms_rel_err

CEILING = {"flops": 772e12, "bytes": 4.25e12}  # one H200 (shared/reference/h200-anchor.md)
# (name, E, k, d, I), token counts
SHAPES = [
    (("glm-4.7-flash", 64, 4, 2048, 1536), (1, 16, 64, 1024, 8192)),
    (("deepseek-v3.2", 256, 8, 7168, 2048), (1, 64, 4096)),
]
QUICK = [(("toy", 8, 2, 48, 40), (1, 33))]
QUICK_FP8 = [(("toy-fp8", 4, 2, 128, 128), (1, 9))]
TARGET_X_FLOP_FLOOR = 2.0  # GLM-4.7-Flash at 8192 tokens: within 2x of the FLOP floor


def torch_sort_loop(x, w_gate_up, w_down, topk_weights, topk_ids):
    """The Experts loop before kernels/moe (in x's dtype), the plain-PyTorch baseline."""
    out = torch.zeros_like(x)
    flat = topk_ids.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=w_gate_up.shape[0]).tolist()
    tokens = order // topk_ids.shape[1]
    start = 0
    for e, n in enumerate(counts):
        if n:
            sel, tok = order[start : start + n], tokens[start : start + n]
            start += n
            gate, up = F.linear(x[tok], w_gate_up[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, w_down[e])
            out.index_add_(0, tok, (y * topk_weights.flatten()[sel, None]).to(x.dtype))
    return out


def _sig(v: float) -> float:
    return float(f"{v:.4g}")


def fused(*args):
    return fused_moe(*args, impl="triton")  # the interpreter on CPU, where "auto" picks ref


def time_ms(fn, *args, **kwargs) -> float:
    if args[0].device.type == "cuda":
        import triton.testing

        return float(
            triton.testing.do_bench(
                lambda: fn(*args, **kwargs), warmup=25, rep=100, return_mode="median"
            )
        )
    fn(*args, **kwargs)  # interpreter: a wall clock over one run after a warm-up
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return (time.perf_counter() - t0) * 1e3


def _inputs(e, k, d, i, t, dtype, device, weights):
    x = torch.randn(t, d, device=device).to(dtype)
    ids = torch.rand(t, e, device=device).topk(k, dim=1).indices
    return (x, *weights, torch.rand(t, k, device=device), ids)


def quant_experts(w: torch.Tensor):
    """[E, N, K] -> e4m3 [E, N, K] and fp32 block scales [E, N/128, K/128], expert by expert
    (an fp32 copy of all of DeepSeek's experts would not fit beside them)."""
    e, n, k = w.shape
    q = torch.empty(e, n, k, dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty(e, n // 128, k // 128, dtype=torch.float32, device=w.device)
    for j in range(e):
        blocks = w[j].float().view(n // 128, 128, k // 128, 128)
        s[j] = blocks.abs().amax((1, 3)).clamp(min=1e-12) / 448
        q[j] = (blocks / s[j][:, None, :, None]).to(torch.float8_e4m3fn).view(n, k)
    return q, s


def bench_shape(shape, tokens, dtype, device, sweep: bool, out: dict, fp8: bool = False) -> None:
    name, e, k, d, i = shape
    wg = torch.randn(e, 2 * i, d, device=device, dtype=dtype).mul_(d**-0.5)
    wd = torch.randn(e, d, i, device=device, dtype=dtype).mul_(i**-0.5)
    fp8 = fp8 and d % 128 == 0 and i % 128 == 0
    if fp8:
        (qg, sg), (qd, sd) = quant_experts(wg), quant_experts(wd)
    expert_bytes = 3 * d * i * wg.element_size()
    for t in tokens:
        args = _inputs(e, k, d, i, t, dtype, device, (wg, wd))
        err = rms_rel_err(fused_moe(*args, impl="ref").float(), fused(*args).float())
        limit = 1.6e-2 if dtype == torch.bfloat16 else 1e-5
        hit = int(args[4].unique().numel())
        flops = 2 * t * k * 3 * d * i
        nbytes = hit * expert_bytes + 2 * t * d * wg.element_size()
        r = {
            "shape": name,
            "E": e,
            "k": k,
            "d": d,
            "I": i,
            "T": t,
            "dtype": str(dtype).removeprefix("torch."),
            "check": "ok" if err <= limit else "FAILED",
            "rms_rel_err": _sig(err),
            "regime": mtri.regime(t, k, e),
            "fused_ms": _sig(time_ms(fused, *args)),
            "torch_sort_loop_ms": _sig(time_ms(torch_sort_loop, *args)),
            "flop_floor_ms": _sig(flops / CEILING["flops"] * 1e3),
            "bytes_floor_ms": _sig(nbytes / CEILING["bytes"] * 1e3),
            "experts_hit": hit,
        }
        r["speedup_vs_torch"] = _sig(r["torch_sort_loop_ms"] / r["fused_ms"])
        r["x_flop_floor"] = _sig(r["fused_ms"] / r["flop_floor_ms"])
        r["x_bytes_floor"] = _sig(r["fused_ms"] / r["bytes_floor_ms"])
        r["tflops"] = _sig(flops / r["fused_ms"] / 1e9)
        if fp8:
            fargs = (args[0], qg, sg, qd, sd, *args[3:])
            ferr = rms_rel_err(
                fused_moe_fp8(*fargs, impl="ref").float(),
                fused_moe_fp8(*fargs, impl="triton").float(),
            )
            r["fp8_check"] = "ok" if ferr <= limit else "FAILED"
            r["fp8_rms_rel_err"] = _sig(ferr)
            r["fp8_ms"] = _sig(time_ms(fused_moe_fp8, *fargs, impl="triton"))
            r["fp8_speedup_vs_bf16_fused"] = _sig(r["fused_ms"] / r["fp8_ms"])
            r["fp8_tflops"] = _sig(flops / r["fp8_ms"] / 1e9)
        if sweep:
            cands = mtri.SWEEP[r["regime"]] if device.type == "cuda" else [mtri.INTERPRET]
            r["sweep_ms"] = {}
            for j, cfg in enumerate(cands):
                try:
                    r["sweep_ms"][j] = _sig(time_ms(mtri.fused_moe, *args, config=cfg))
                except Exception as exc:  # noqa: BLE001 - a config that fails to compile is data
                    r["sweep_ms"][j] = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
        out["results"].append(r)
        print("  " + json.dumps(r), flush=True)
    del wg, wd
    if fp8:
        del qg, sg, qd, sd
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _best(r: dict) -> str:
    ok = {j: v for j, v in r.get("sweep_ms", {}).items() if isinstance(v, float)}
    if not ok:
        return "-"
    j = min(ok, key=ok.get)
    return f"{r['regime']}[{j}]: {ok[j]}"


def table(results: list[dict]) -> str:
    head = (
        "| shape | T | check | fused ms | torch sort+loop ms | speedup | FLOP floor ms "
        "| bytes floor ms | x FLOP floor | x bytes floor | best sweep (SWEEP index: ms) |"
    )
    lines = [head, "| --- " * (head.count("|") - 1) + "|"]
    for r in results:
        lines.append(
            f"| {r['shape']} | {r['T']} | {r['check']} | {r['fused_ms']} | "
            f"{r['torch_sort_loop_ms']} | {r['speedup_vs_torch']}x | {r['flop_floor_ms']} | "
            f"{r['bytes_floor_ms']} | {r['x_flop_floor']} | {r['x_bytes_floor']} | {_best(r)} |"
        )
    fp8 = [r for r in results if "fp8_ms" in r]
    if fp8:
        lines += [
            "",
            "| shape | T | FP8 check | FP8 ms | bf16 fused ms | FP8 speedup | FP8 TFLOP/s |",
        ]
        lines.append("| --- " * 7 + "|")
        for r in fp8:
            lines.append(
                f"| {r['shape']} | {r['T']} | {r['fp8_check']} | {r['fp8_ms']} | {r['fused_ms']} "
                f"| {r['fp8_speedup_vs_bf16_fused']}x | {r['fp8_tflops']} |"
            )
    return "\n".join(lines)


def run(quick: bool, sweep: bool, fp8: bool = False) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not quick:
        raise SystemExit("kernels.bench_moe: no CUDA device; use --quick (with TRITON_INTERPRET=1)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # no bf16 dot on CPU
    import triton

    out = {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu {platform.machine()}",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "ceilings": CEILING,
        "results": [],
    }
    torch.manual_seed(0)
    shapes = (QUICK + (QUICK_FP8 if fp8 else [])) if quick else SHAPES
    for shape, tokens in shapes:
        bench_shape(shape, tokens, dtype, device, sweep, out, fp8)
    glm = [r for r in out["results"] if r["shape"] == "glm-4.7-flash" and r["T"] == 8192]
    if glm:
        out["target_glm_8192"] = {
            "x_flop_floor": glm[0]["x_flop_floor"],
            "limit": TARGET_X_FLOP_FLOOR,
            "met": glm[0]["x_flop_floor"] <= TARGET_X_FLOP_FLOOR,
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.bench_moe", description=__doc__)
    ap.add_argument("--out", required=True, help="JSON results file")
    ap.add_argument("--quick", action="store_true", help="toy shapes (CPU smoke run)")
    ap.add_argument("--sweep", action="store_true", help="also time the regime's candidate configs")
    ap.add_argument("--fp8", action="store_true", help="also check and time fused_moe_fp8")
    a = ap.parse_args(argv)
    out = run(a.quick, a.sweep, a.fp8)
    print(table(out["results"]))
    if "target_glm_8192" in out:
        print(f"GLM-4.7-Flash T=8192 target (<= 2x FLOP floor): {out['target_glm_8192']}")
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    ok = all(r["check"] == "ok" and r.get("fp8_check", "ok") == "ok" for r in out["results"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
