"""`indexcache serve`: start a local Ray cluster and the OpenAI-compatible app, print the URL.

Defaults: unified mode on CPU, the embedded default model (SmolLM2-135M with trained
indexers, built on first use), 127.0.0.1:8000.
"""

from __future__ import annotations


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
    if not Path(data["model"], "config.json").is_file():
        raise FileNotFoundError(f"no config.json in model directory {data['model']}")
    return ServingConfig.model_validate(data)


def wait_running(app_name: str, timeout_s: float) -> None:
    """Poll serve.status(): an app that does not fit the cluster stays DEPLOYING forever."""
    import time

    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(app_name)
        status = getattr(app, "status", None)
        if status == "RUNNING":
            return
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"application {app_name} is {status}: {app.message}")
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


def start(config, timeout_s: float = 600.0):
    """Start (or join) Ray, start Serve on the configured address, deploy, wait for RUNNING."""
    import ray
    from ray import serve

    from serving.app import build_app
    from serving.env import apply_ray_local_env

    apply_ray_local_env()
    if not ray.is_initialized():
        ray.init(num_cpus=cluster_cpus(config), include_dashboard=False, namespace="indexcache")
    serve.start(http_options={"host": config.ingress.host, "port": config.ingress.port})
    serve.run(
        build_app(config),
        name=config.app_name,
        route_prefix=config.ingress.route_prefix,
        blocking=False,
    )
    wait_running(config.app_name, timeout_s)


def _stop_on_sigterm() -> None:
    """SIGTERM (a supervisor, `timeout`, k8s) stops the server like Ctrl-C, so the local Ray
    cluster this process started goes down with it instead of being orphaned."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


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
    import time

    config = resolve_config(args)
    start(config, args.timeout)
    try:
        _stop_on_sigterm()  # after ray.init, which installs a SIGTERM handler that aborts
        print(banner(config), flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        print("stopping ...", flush=True)
        serve.shutdown()  # the local cluster goes down at exit (ray's atexit hook)
    return 0
