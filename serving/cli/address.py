"""Which Ray cluster a command talks to: the one named on the command line, or the one the
running `indexcache serve` recorded; never "whatever local cluster there is" (an operator with
two clusters on a machine would publish plans into the wrong one without noticing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from serving.env import env

RECORD = "ray-cluster.json"


def record_path() -> Path:
    return env().home / RECORD


def record(address: str) -> Path:
    """Called by `indexcache serve` once its cluster is up."""
    path = record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"address": address, "pid": os.getpid()}) + "\n")
    return path


def forget() -> None:
    """Called by `indexcache serve` on exit: only its own record is removed."""
    path = record_path()
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolve(explicit: str | None) -> str:
    """The cluster address to connect to, or ValueError saying how to name one."""
    if explicit:
        return explicit
    path = record_path()
    hint = (
        "pass --address HOST:PORT (the Ray cluster's GCS address, e.g. 127.0.0.1:6379 or "
        "ray://head:10001)"
    )
    if not path.is_file():
        raise ValueError(f"no Ray cluster given: {hint}, or start `indexcache serve` first")
    try:
        rec = json.loads(path.read_text())
        address, pid = rec["address"], int(rec["pid"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is unreadable ({e}): {hint}") from None
    if not _alive(pid):
        raise ValueError(
            f"the `indexcache serve` that recorded {address} in {path} (pid {pid}) is not "
            f"running: {hint}"
        )
    return address
