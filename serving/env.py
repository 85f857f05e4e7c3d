"""The one place that reads environment variables.

Everything else receives plain values: kernels/ and model/ take explicit arguments, serving code
takes this dataclass. Keeping reads here makes the full set of knobs greppable and testable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PREFIX = "INDEXCACHE_"


@dataclass(frozen=True)
class Env:
    home: Path  # where converted / generated checkpoints are cached
    kernels: str  # "auto" | "ref" | "triton": forces the kernel backend
    log_level: str

    @classmethod
    def read(cls) -> Env:
        home = os.environ.get(PREFIX + "HOME") or str(Path.cwd() / ".cache")
        kernels = os.environ.get(PREFIX + "KERNELS", "auto")
        if kernels not in ("auto", "ref", "triton"):
            raise ValueError(f"{PREFIX}KERNELS must be auto, ref or triton, got {kernels!r}")
        return cls(
            home=Path(home), kernels=kernels, log_level=os.environ.get(PREFIX + "LOG_LEVEL", "INFO")
        )


def env() -> Env:
    return Env.read()


# Ray settings for a single-machine cluster bound to loopback (env.md section 3): without
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray advertises the machine's public interface.
RAY_LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
}


def apply_ray_local_env() -> None:
    """Set the loopback Ray settings (keeping any the user set) before ray.init."""
    for k, v in RAY_LOCAL_ENV.items():
        os.environ.setdefault(k, v)
