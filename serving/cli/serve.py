"""`indexcache serve`: start a local Ray cluster and the OpenAI-compatible app, print the URL.

Defaults: unified mode on CPU, the embedded default model (SmolLM2-135M with trained
indexers, built on first use), 127.0.0.1:8000.

Start-up failures (a bad checkpoint, a replica that cannot start, a port in use) exit within
seconds with one line naming the cause, and take the cluster down. The cluster's address is
recorded for `indexcache plans` (serving/cli/address.py). SIGTERM or Ctrl-C drains: new requests
get 503 with Retry-After, requests in flight get `graceful_shutdown_timeout_s` to finish, the
rest end with an error event; then Serve and the cluster stop and the command exits 0. A second
signal stops at once.
"""

from __future__ import annotations

from serving.cli import CommandFailed


def register(p) -> None:
    p.add_argument("--config", default=None, help="serving YAML (ServingConfig); flags override it")
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint directory (default: the embedded "
        "SmolLM2-135M DSA model, built on first use)",
    )
    p.add_argument("--mode", choices=["unified", "disaggregated"], default=None)
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="accepted Bearer key (repeatable); default: no auth",
    )
    p.add_argument("--index-cache", default=None, help='starting F/S plan, e.g. "FSFS"')
    p.add_argument(
        "--graceful-shutdown-timeout",
        type=float,
        default=None,
        help="seconds requests in flight get to finish on SIGTERM (default 30)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for RUNNING")
    p.set_defaults(run=run)


def resolve_config(args):
    from pathlib import Path

    from serving.config import ServingConfig, default_model_path

    data: dict = {}
    if args.config:
        data = ServingConfig.from_yaml(args.config).model_dump(mode="json", exclude_unset=True)
    if args.model:
        data["model"] = args.model
    if args.mode:
        data["mode"] = args.mode
    if args.index_cache:
        data["index_cache"] = args.index_cache
    if getattr(args, "graceful_shutdown_timeout", None) is not None:
        data["graceful_shutdown_timeout_s"] = args.graceful_shutdown_timeout
    ingress = dict(data.get("ingress", {}))
    for key, value in (("host", args.host), ("port", args.port), ("api_keys", args.api_key)):
        if value is not None:
            ingress[key] = value
    data["ingress"] = ingress
    if "model" not in data:
        path = default_model_path()
        if not (path / "config.json").is_file():
            from model.smollm2 import build_default

            print(f"building the embedded default model in {path} ...", flush=True)
            build_default(path)
        data["model"] = str(path)
    check_checkpoint(Path(data["model"]))
    return ServingConfig.model_validate(data)


def check_checkpoint(path) -> None:
    """What every replica would fail on, checked here in milliseconds instead."""
    from model.config import ModelConfig

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in model directory {path}")
    ModelConfig.from_pretrained(path)  # ValueError naming the field
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"no *.safetensors weights in model directory {path}")
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in model directory {path}")


class StartupFailed(CommandFailed):
    """The application did not come up; the message is one line naming the cause."""


def _cause(message: str) -> str:
    """The exception line of a Serve status message (which carries a whole traceback)."""
    lines = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.replace(".", "").isidentifier() and head.endswith(("Error", "Exception")):
            return ln
    return lines[0] if lines else "no message"


def wait_running(app_name: str, timeout_s: float, fail_fast: bool = False) -> None:
    """Poll serve.status(): an app that does not fit the cluster stays DEPLOYING forever.
    `fail_fast`: the first replica that fails to start fails the wait (a fresh start)."""
    import time

    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(app_name)
        status = getattr(app, "status", None)
        if status == "RUNNING":
            return
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise StartupFailed(f"application {app_name} is {status}: {_cause(app.message)}")
        for name, dep in (app.deployments if app else {}).items():
            if fail_fast and "failed to start" in (dep.message or ""):
                # Serve would retry; on a fresh start the same error comes back each time.
                raise StartupFailed(f"{name} failed to start: {_cause(dep.message)}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"application {app_name} not RUNNING after {timeout_s:.0f}s "
                f"(status {status}); does it fit the cluster's CPUs/GPUs?"
            )
        time.sleep(0.5)


def cluster_cpus(config) -> int:
    """Logical CPUs for the local cluster: at least what the replicas ask for (on a small
    machine the defaults would otherwise never all be placed)."""
    import math
    import os

    need = config.ingress.num_cpus * config.ingress.num_replicas
    for role in config.roles:
        g = config.group(role)
        count = g.autoscaling.max_replicas if g.autoscaling else g.num_replicas
        need += g.num_cpus * count
    return max(os.cpu_count() or 1, math.ceil(need))


def start(config, timeout_s: float = 600.0) -> str:
    """Start Ray, start Serve on the configured address, deploy, wait for RUNNING; returns the
    cluster's address. On failure the cluster is shut down before the error propagates."""
    import ray
    from ray import serve

    from serving.app import build_app
    from serving.env import apply_ray_local_env

    apply_ray_local_env()
    ray.init(
        num_cpus=cluster_cpus(config),
        include_dashboard=False,
        namespace="indexcache",
        log_to_driver=False,  # replica logs stay in Ray's log files; errors come back here
    )
    try:
        serve.start(http_options={"host": config.ingress.host, "port": config.ingress.port})
        # serve.run waits for RUNNING itself and fails only after Serve retried a failing
        # replica three times (minutes with a large model); `_run(_blocking=False)` returns at
        # once, so wait_running can stop at the first failure with its cause.
        serve._run(
            build_app(config),
            _blocking=False,
            name=config.app_name,
            route_prefix=config.ingress.route_prefix,
        )
        wait_running(config.app_name, timeout_s, fail_fast=True)
        return ray.get_runtime_context().gcs_address
    except BaseException:
        stop_all()
        raise


def stop_all() -> None:
    """Serve, then the local cluster (its processes go with it)."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def drain(config) -> None:
    """Tell every ingress replica to drain; wait until none has a request in flight (or the
    graceful timeout and a margin passed)."""
    import time

    from ray import serve

    timeout_s = config.graceful_shutdown_timeout_s
    handle = serve.get_deployment_handle("OpenAIIngress", config.app_name)
    counts = handle.broadcast("drain", timeout_s).results(timeout_s=10, return_exceptions=True)
    busy = sum(c for c in counts if isinstance(c, int))
    print(f"draining: {busy} request(s) in flight get up to {timeout_s:.0f}s", flush=True)
    deadline = time.monotonic() + timeout_s + 5
    while busy and time.monotonic() < deadline:
        time.sleep(0.25)
        counts = handle.broadcast("in_flight").results(timeout_s=5, return_exceptions=True)
        busy = sum(c for c in counts if isinstance(c, int))


def _on_signals(stop) -> None:
    """SIGTERM (a supervisor, `timeout`, k8s) and SIGINT start the drain; a second one stops at
    once. Installed after ray.init, which sets a SIGTERM handler of its own."""
    import signal

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def banner(config) -> str:
    ic = config.ingress
    base = f"http://{ic.host}:{ic.port}{ic.route_prefix.rstrip('/')}"
    auth = f' -H "Authorization: Bearer {ic.api_keys[0]}"' if ic.api_keys else ""
    return (
        f"\nIndexCache Serve ({config.mode}) is up: {base}/v1  (model `{config.model_name}`)\n"
        f"metrics: {base}/metrics   health: {base}/health\n\n"
        f"curl {base}/v1/chat/completions{auth} -H 'Content-Type: application/json' -d "
        f'\'{{"model": "{config.model_name}", "messages": [{{"role": "user", '
        f'"content": "Hello!"}}], "max_tokens": 16}}\'\n\n'
        "Ctrl-C stops the server."
    )


def run(args) -> int:
    import threading

    from serving.cli import address

    config = resolve_config(args)
    gcs = start(config, args.timeout)
    stop = threading.Event()
    try:
        _on_signals(stop)
        record = address.record(gcs)
        print(banner(config), flush=True)
        print(f"Ray cluster {gcs} (recorded in {record} for `indexcache plans`)", flush=True)
        while not stop.wait(0.5):
            pass
        print("stopping: draining requests ...", flush=True)
        drain(config)
    except KeyboardInterrupt:
        print("stopping now", flush=True)
    finally:
        address.forget()
        stop_all()
    print("stopped", flush=True)
    return 0
