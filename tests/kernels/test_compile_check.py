"""kernels.compile_check runs (in a fresh process: the test session runs the interpreter): every
kernel spec still names exactly its kernel's arguments, and one kernel compiles for sm_90 with
the wheel's ptxas and reports its registers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_compile_check_runs():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, "-m", "kernels.compile_check", "--only", "act_quant"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok    act_quant: regs " in res.stdout, res.stdout
    assert "FAIL" not in res.stdout, res.stdout
