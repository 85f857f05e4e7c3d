"""Fault injection for the serving tests: find and kill Serve replicas and named actors of a
running application, wait for it to heal, and read what its processes logged meanwhile."""

from __future__ import annotations

import re
from pathlib import Path

from tests.serving.harness import wait_for


def replica_ids(app: str, deployment: str) -> list[str]:
    """Unique ids of the live replicas of `deployment` (Serve names them
    SERVE_REPLICA::<app>#<deployment>#<id> in namespace "serve")."""
    from ray.util import list_named_actors

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    names = [a["name"] for a in list_named_actors(all_namespaces=True)]
    return sorted(n[len(prefix) :] for n in names if n.startswith(prefix))


def kill_replica(app: str, deployment: str, replica_id: str) -> None:
    import ray

    ray.kill(ray.get_actor(f"SERVE_REPLICA::{app}#{deployment}#{replica_id}", namespace="serve"))


def checks(app: str, deployment: str) -> list[dict]:
    """check() of every replica of an engine deployment (Serve's handle broadcast)."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app)
    return handle.broadcast("check").results(timeout_s=10, return_exceptions=True)


def busy_replica(app: str, deployment: str, timeout_s: float = 10.0) -> str:
    """The id of a replica of `deployment` with a request running or waiting."""

    def find():
        for c in checks(app, deployment):
            if isinstance(c, dict) and c["num_running"] + c["num_waiting"] > 0:
                return c["replica"]
        return None

    return wait_for(find, timeout_s, f"a busy {deployment} replica", interval_s=0.02)


def wait_healthy(app: str, replicas: dict[str, int], timeout_s: float = 120.0) -> None:
    """Until the app is RUNNING with `replicas` (deployment -> count) replicas RUNNING each."""
    from ray import serve

    def ok():
        st = serve.status().applications.get(app)
        if st is None or st.status != "RUNNING":
            return False
        return all(
            st.deployments[d].replica_states.get("RUNNING", 0) == n
            and len(replica_ids(app, d)) == n
            for d, n in replicas.items()
        )

    wait_for(ok, timeout_s, f"{app} to be RUNNING with {replicas}", interval_s=0.5)


class LogWatch:
    """What Serve's replica/proxy logs and the workers' stderr gained since `mark()`."""

    _ERROR = re.compile(r"^(ERROR|CRITICAL)\b|Traceback \(most recent call last\)")

    def __init__(self):
        import ray

        self.root = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
        self._sizes: dict[Path, int] = {}

    def _files(self) -> list[Path]:
        return [*self.root.glob("serve/*.log"), *self.root.glob("worker-*.err")]

    def mark(self) -> None:
        self._sizes = {f: f.stat().st_size for f in self._files()}

    def new_lines(self) -> list[str]:
        out = []
        for f in self._files():
            with open(f, "rb") as fh:
                fh.seek(self._sizes.get(f, 0))
                out += fh.read().decode(errors="replace").splitlines()
        return out

    _RECORD = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) \d{4}-")

    def errors(self) -> list[str]:
        """Each ERROR record or traceback with what follows it, up to the next log record (the
        traceback's last lines name the exception)."""
        lines, out, i = self.new_lines(), [], 0
        while i < len(lines):
            if not self._ERROR.search(lines[i]):
                i += 1
                continue
            j = i + 1
            while j < len(lines) and not self._RECORD.match(lines[j]) and j - i < 200:
                j += 1
            out.append("\n".join([lines[i], "...", *lines[max(i + 1, j - 12) : j]]))
            i = j
        return out

    def count(self, needle: str) -> int:
        return sum(needle in ln for ln in self.new_lines())
