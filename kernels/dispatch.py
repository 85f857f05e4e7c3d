"""Backend choice shared by every op."""

from __future__ import annotations

import torch

_BACKENDS = ("auto", "ref", "triton")
_backend = "auto"


def set_backend(name: str) -> None:
    """Process-wide default: "auto" (Triton on CUDA, reference on CPU), "ref" or "triton"."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"kernel backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


def resolve_impl(impl: str | None, device: torch.device) -> str:
    """Return "ref" or "triton" for one call."""
    choice = impl or _backend
    if choice not in _BACKENDS:
        raise ValueError(f"impl must be one of {_BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "ref"
    return choice
