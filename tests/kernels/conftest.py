"""Kernel tests under the Triton interpreter: make its fp32 -> float8_e4m3fn conversion correct.

Triton 3.6's interpreter rounds the mantissa without carrying into the exponent and without
ties-to-even (checked: 0.0304 -> 0.0156, torch and the GPU give 0.0312), so kernels that write
e4m3 could not be judged on the CPU. Converting with torch instead (round to nearest even, what
the GPU's cvt instruction does) lets the FP8 kernels be compared bit for bit here too. Only the
interpreter is touched, only in test sessions, only this one conversion."""

from __future__ import annotations

import os


def _patch_fp8_conversion() -> None:
    import numpy as np
    import torch
    import triton.language as tl
    import triton.runtime.interpreter as interp

    original = interp._convert_float
    if getattr(original, "_indexcache_fp8", False):
        return

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.float8e4nv:
            x = torch.from_numpy(np.ascontiguousarray(input).view(np.float32).copy())
            return x.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(input.shape)
        return original(input, input_dtype, output_dtype, rounding_mode)

    convert._indexcache_fp8 = True
    interp._convert_float = convert


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_fp8_conversion()
