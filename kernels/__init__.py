"""DSA kernels. One folder per op: `__init__.py` validates and dispatches, `ref.py` is the readable
PyTorch spec, `triton.py` the fast version. Dispatch: Triton on CUDA tensors, the reference on CPU,
unless overridden per call (`impl=`) or process-wide (`set_backend`)."""

from __future__ import annotations

from kernels.dispatch import get_backend, resolve_impl, set_backend

__all__ = ["get_backend", "resolve_impl", "set_backend"]
