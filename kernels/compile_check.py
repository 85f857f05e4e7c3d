"""`python -m kernels.compile_check`: compile Triton kernels for an H200 (sm_90) on any machine.

The CPU tests run kernels under the interpreter, which accepts code the GPU compiler rejects
(non-constexpr globals, unsupported ops) and says nothing of registers or shared memory. This
compiles each kernel at its production configs with the Triton wheel's own compiler and ptxas (no
GPU, no launch) and prints registers, spill stack and shared memory from the cubin, so a broken or
spilling kernel is found before GPU time is spent. Pointers and strides are assumed 16-divisible,
as Triton specialises real launches. Must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

ARCH = 90

I32, F32 = "i32", "fp32"


def _ptr(t: str) -> str:
    return "*" + t


def _specs():
    """(name, jit function, {arg: type}, {constexpr: value}, num_warps, num_stages)."""
    import triton.language as tl

    from kernels.fp8 import triton as fp8_tri
    from kernels.fp8_gemm import triton as gtri
    from kernels.index_fp8 import triton as ifp8
    from kernels.indexer import decode
    from kernels.indexer import triton as itri
    from kernels.moe import triton_fp8 as mfp8
    from kernels.topk import split
    from kernels.topk import triton as ttri

    out = []
    sig = {"x_ptr": _ptr(F32), "y_ptr": "*fp8e4nv", "s_ptr": _ptr(F32), "m": I32}
    sig |= dict.fromkeys(("stride_x", "stride_y", "stride_s"), I32)
    ce = {"BLOCK": 128, "BP": 128, "ROWS": 16, "UE8M0": True, "FMAX": 448.0, "INV_FMAX": 1 / 448}
    out.append(("act_quant", fp8_tri._act_quant_kernel, sig, ce, 4, 3))
    for store in (True, False):
        sig = {k: _ptr(F32) for k in ("s_ptr", "w_ptr", "wo_ptr")}
        sig |= {"x_ptr": "*bf16", "y_ptr": "*fp8e4nv", "slot_ptr": "*i64", "m": I32}
        sig |= dict.fromkeys(("stride_x", "stride_yp", "stride_ys", "stride_sp"), I32)
        ce = {"ROWS": ifp8.ROWS, "D": 128, "LOG2D": 7, "PS": 64, "INV_SQRT": 128**-0.5}
        ce |= {"FMAX": 448.0, "INV_FMAX": 1 / 448, "STORE": store}
        out.append((f"index_fp8 store={store}", ifp8._rotate_quant_kernel, sig, ce, 4, 3))
    sig = {"s_ptr": _ptr(F32), "z": F32} | {
        k: _ptr(I32) for k in ("len_ptr", "out_ptr", "ck_ptr", "ci_ptr", "miss_ptr")
    }
    sig |= dict.fromkeys(("stride_s", "stride_o", "stride_c", "topk", "cap"), I32)
    for cfg in ttri.CONFIGS:
        ce = {"SAMPLE": ttri.SAMPLE, "BLOCK": cfg["BLOCK"]}
        out.append((f"topk rows {cfg}", ttri._topk_rows_kernel, sig, ce, cfg["num_warps"], 3))
    ptrs = ("pk_ptr", "pc_ptr", "cnt_ptr", "len_ptr", "below_ptr", "st_ptr")
    for cfg in split.SPLIT_CONFIGS:
        for parts in (False, True):
            common = {"FROM_PARTS": parts, "GRAIN": split.GRAIN, "BLOCK": cfg["BLOCK"]}
            sig = {"s_ptr": _ptr(F32)} | {k: _ptr(I32) for k in ptrs}
            sig |= dict.fromkeys(("stride_s", "stride_p", "topk", "S"), I32)
            lsig = sig | {k: _ptr(I32) for k in ("hin_ptr", "hout_ptr", "cin_ptr", "cout_ptr")}
            for shift in (24, 0):
                name = f"topk split level{shift} parts={parts} {cfg}"
                ce = common | {"SHIFT": shift}
                out.append((name, split._level_kernel, lsig, ce, cfg["num_warps"], 3))
            wsig = sig | {k: _ptr(I32) for k in ("h_ptr", "cum_ptr", "out_ptr")}
            wsig["stride_o"] = I32
            name = f"topk split write parts={parts} {cfg}"
            ce = common | {"SP": split.MAX_SPLITS * 2}
            out.append((name, split._write_kernel, wsig, ce, cfg["num_warps"], 3))
    e4 = "*fp8e4nv"
    for cfg in gtri.SWEEP:
        sig = {"a_ptr": e4, "as_ptr": _ptr(F32), "b_ptr": e4, "bs_ptr": _ptr(F32)}
        sig |= {"c_ptr": "*bf16", "M": I32, "N": I32, "K": I32}
        sig |= dict.fromkeys(("stride_am", "stride_asm", "stride_bn", "stride_bsn"), I32)
        sig["stride_cm"] = I32
        ce = {"SCALE_BLOCK": 128} | {k: cfg[k] for k in ("BM", "BN", "BK", "GROUP_M")}
        name = f"fp8_gemm {cfg}"
        out.append((name, gtri._fp8_gemm_kernel, sig, ce, cfg["num_warps"], cfg["num_stages"]))
    for regime, t in (("decode", 4), ("mid", 512), ("prefill", 16384)):
        cfg = mfp8.fp8_config(t, 8, 256, 7168, 2048, _Cuda())  # DeepSeek-V3.2 experts
        up, down = cfg["up"], cfg["down"]
        meta = {"sorted_ptr": _ptr(I32), "expert_ptr": _ptr(I32), "total_ptr": _ptr(I32)}
        meta |= {"n_pairs": I32, "n_blocks": I32, "D": I32, "I": I32}
        sig = {"x_ptr": e4, "xs_ptr": _ptr(F32), "w_ptr": e4, "ws_ptr": _ptr(F32)}
        sig |= {"h_ptr": e4, "hs_ptr": _ptr(F32)} | meta
        sig |= dict.fromkeys(("stride_xt", "stride_xst", "stride_we", "stride_wn"), I32)
        sig |= dict.fromkeys(("stride_wse", "stride_wsn", "stride_ht", "stride_hst"), I32)
        ce = {"TOPK": 8, "BM": cfg["BM"], "BN": up["BN"], "BK": up["BK"], "SB": 128}
        ce |= {"GROUP_M": up["GROUP_M"], "X_DTYPE": tl.bfloat16, "UE8M0": True}
        ce |= {"FMAX": 448.0, "INV_FMAX": 1 / 448}
        name = f"moe fp8 gate_up {regime} {up}"
        out.append((name, mfp8._gate_up_fp8_kernel, sig, ce, up["num_warps"], up["num_stages"]))
        sig = {"h_ptr": e4, "hs_ptr": _ptr(F32), "w_ptr": e4, "ws_ptr": _ptr(F32)}
        sig |= {"y_ptr": "*bf16", "tw_ptr": _ptr(F32)} | meta
        sig |= dict.fromkeys(("stride_ht", "stride_hst", "stride_we", "stride_wn"), I32)
        sig |= dict.fromkeys(("stride_wse", "stride_wsn", "stride_yt"), I32)
        ce = {"BM": cfg["BM"], "BN": down["BN"], "BK": down["BK"], "SB": 128}
        ce["GROUP_M"] = down["GROUP_M"]
        name = f"moe fp8 down {regime} {down}"
        out.append((name, mfp8._down_fp8_kernel, sig, ce, down["num_warps"], down["num_stages"]))
    for dt, scale in (("bf16", False), ("fp8e4nv", True)):
        base = {"q_ptr": _ptr(dt), "k_ptr": _ptr(dt), "ks_ptr": _ptr(F32), "bt_ptr": _ptr(I32)}
        for cfg in itri.PREFILL_CONFIGS:
            sig = base | {"wt_ptr": _ptr(F32), "tile_ptr": _ptr(I32), "s_ptr": _ptr(F32)}
            sig |= dict.fromkeys(("row0", "stride_qt", "stride_qh", "stride_wh"), I32)
            sig |= dict.fromkeys(("stride_kp", "stride_ks", "stride_sp", "stride_bt"), I32)
            sig["stride_s"] = I32
            ce = {"H": 32, "D": 128, "PS": 64, "BM": cfg["BM"], "BN": cfg["BN"]}
            ce["HAS_SCALE"] = scale
            name = f"indexer prefill {dt} {cfg}"
            kern = itri._prefill_logits_kernel
            out.append((name, kern, sig, ce, cfg["num_warps"], cfg["num_stages"]))
        for cfg in decode.DECODE_CONFIGS:
            sig = base | {"w_ptr": _ptr(F32), "len_ptr": _ptr(I32)}
            sig |= {k: _ptr(I32) for k in ("pk_ptr", "pc_ptr", "cnt_ptr")}
            sig |= dict.fromkeys(("stride_qt", "stride_qh", "stride_wt", "stride_kp"), I32)
            sig |= dict.fromkeys(("stride_ks", "stride_sp", "stride_bt", "topk", "S", "cap"), I32)
            ce = {"H": 32, "BH": 32, "D": 128, "PS": 64, "BN": cfg["BN"], "HAS_SCALE": scale}
            ce["CBLOCK"] = decode.CBLOCK
            name = f"indexer decode {dt} {cfg}"
            kern = decode._decode_parts_kernel
            out.append((name, kern, sig, ce, cfg["num_warps"], cfg["num_stages"]))
    return out


class _Cuda:
    """A stand-in device: config pickers choose their CUDA tables for it."""

    type = "cuda"


def _usage(cubin: bytes) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    return f"regs {m.group(1)}, spill stack {m.group(2)} B" if m else "regs ?"


def check_spec(fn, signature: dict, constexprs: dict) -> None:
    """Every argument of the kernel has a type or a value, and nothing else is named."""
    names, given = set(fn.arg_names), set(signature) | set(constexprs)
    if names != given:
        raise ValueError(
            f"{fn.__name__}: spec lacks {sorted(names - given)}, "
            f"names unknown {sorted(given - names)}"
        )


def compile_one(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    check_spec(fn, signature, constexprs)
    names = list(fn.arg_names)
    sig = dict(signature) | dict.fromkeys(constexprs, "constexpr")
    attrs = {
        (names.index(k),): [["tt.divisibility", 16]]
        for k, v in signature.items()
        if v.startswith("*") or k.startswith("stride")
    }
    src = ASTSource(
        fn=fn,
        signature=sig,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
        attrs=attrs,
    )
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", ARCH, 32), options=opts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.compile_check", description=__doc__)
    ap.add_argument("--only", default="", help="compile only kernels whose name contains this")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernels.compile_check: unset TRITON_INTERPRET (it compiles for real)")
    failed = 0
    specs = _specs()
    for name, fn, sig, ce, _, _ in specs:  # every spec still matches its kernel
        try:
            check_spec(fn, sig, ce)
        except ValueError as e:
            failed += 1
            print(f"FAIL  {name}: {e}", flush=True)
    for name, fn, sig, ce, warps, stages in specs:
        if args.only not in name:
            continue
        try:
            k = compile_one(fn, sig, ce, warps, stages)
            print(f"ok    {name}: {_usage(k.asm['cubin'])}, smem {k.metadata.shared} B", flush=True)
        except Exception as e:  # noqa: BLE001 - report every kernel, then fail
            failed += 1
            print(f"FAIL  {name}: {type(e).__name__}: {str(e)[:500]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
