"""The `chaos` scenario's faults: while Locust keeps the server saturated, kill engine replicas
and roll out a plan, as a crash, a preemption or an operator would.

Runs in the `indexcache loadtest` process (it needs the Ray cluster of the server: an explicit
address or the one `indexcache serve` recorded), on a thread, at fixed shares of the run:

    20%  kill the busiest decode replica (its streams must continue on another)
    45%  publish a plan for the served model (a rollout under load)
    65%  kill the busiest prefill replica (its requests must be retried)

Unified apps get the replica kills on UnifiedServer instead. Every action goes to
OUT/chaos.json with its time, for the report.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SCHEDULE = ((0.20, "kill", "decode"), (0.45, "publish", None), (0.65, "kill", "prefill"))


@dataclass
class Action:
    t: float  # unix time
    at_s: float  # seconds into the load
    action: str  # kill | publish
    target: str  # deployment#replica, or model vN
    ok: bool
    detail: str = ""


class ChaosMonkey:
    def __init__(self, app: str, duration_s: float, out: Path, model: str | None = None):
        self.app, self.duration_s, self.out, self.model = app, duration_s, Path(out), model
        self.actions: list[Action] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    def start(self) -> ChaosMonkey:
        self._thread.start()
        return self

    def stop(self) -> list[Action]:
        self._stop.set()
        self._thread.join(timeout=60)
        (self.out / "chaos.json").write_text(json.dumps([asdict(a) for a in self.actions]))
        return self.actions

    # -- the schedule ------------------------------------------------------------------------
    def _run(self) -> None:
        t0 = self._wait_for_load()
        if t0 is None:
            return
        for share, action, role in SCHEDULE:
            if self._stop.wait(max(0.0, t0 + share * self.duration_s - time.time())):
                return
            try:
                target, detail = self._kill(role) if action == "kill" else self._publish()
                ok = True
            except Exception as e:  # recorded, and the run goes on
                target, detail, ok = role or "plan", f"{type(e).__name__}: {e}", False
            self.actions.append(Action(time.time(), time.time() - t0, action, target, ok, detail))

    def _wait_for_load(self) -> float | None:
        """The load starts once Locust has read the server (it writes run.json then)."""
        run = self.out / "run.json"
        while not run.is_file():
            if self._stop.wait(0.2):
                return None
        meta = json.loads(run.read_text())
        self.model = self.model or meta.get("model")
        return time.time()

    # -- actions -----------------------------------------------------------------------------
    def _deployment(self, role: str) -> str:
        from ray import serve

        deployments = serve.status().applications[self.app].deployments
        name = f"{role.capitalize()}Server"
        return name if name in deployments else "UnifiedServer"

    def _kill(self, role: str) -> tuple[str, str]:
        import ray
        from ray import serve

        deployment = self._deployment(role)
        handle = serve.get_deployment_handle(deployment, self.app)
        checks = handle.broadcast("check").results(timeout_s=10, return_exceptions=True)
        live = [c for c in checks if isinstance(c, dict)]
        if len(live) < 2:
            raise RuntimeError(f"{deployment} has {len(live)} live replica(s): none to spare")
        victim = max(live, key=lambda c: c["num_running"] + c["num_waiting"])
        name = f"SERVE_REPLICA::{self.app}#{deployment}#{victim['replica']}"
        ray.kill(ray.get_actor(name, namespace="serve"))
        busy = victim["num_running"] + victim["num_waiting"]
        return f"{deployment}#{victim['replica']}", f"{busy} request(s) on it"

    def _publish(self) -> tuple[str, str]:
        from model.index_cache import IndexCacheConfig
        from serving import plan_registry

        n = plan_registry.model_layers(self.model)
        if n is None:
            raise RuntimeError(f"model {self.model!r} is not registered by any replica")
        current = plan_registry.latest(self.model)
        freq = IndexCacheConfig.from_freq(n, 2).pattern
        pattern = "F" * n if current is not None and current.pattern == freq else freq
        v = plan_registry.publish(self.model, pattern, {"source": "pattern", "chaos": True})
        return f"{self.model} v{v}", pattern
