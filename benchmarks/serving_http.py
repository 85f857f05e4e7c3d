"""Client-side latency and throughput of the HTTP app, unified vs disaggregated.

    python -m benchmarks.serving_http [--model DIR] [--concurrency 16] [--requests 64]
        [--max-tokens 64] [--device cpu]

Starts a local Ray cluster, deploys the app in each mode, sends `--requests` streaming completions
with `--concurrency` in flight (ignore_eos, so every request makes exactly `--max-tokens`), and
measures what a client sees: TTFT, inter-token latency, end-to-end latency, output tokens/s.
Writes benchmarks/results/serving_http-<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import httpx

RESULTS = Path(__file__).resolve().parent / "results"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def one(client: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int) -> dict:
    body = {
        "model": model,
        "prompt": f"Request {i}: once upon a time",
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
        # logprobs make every token its own SSE event even when its text is empty (random
        # tiny weights emit partial UTF-8), so the client clocks each token.
        "logprobs": 0,
    }
    start = time.perf_counter()
    stamps = []
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"])
                stamps.append(time.perf_counter())
    return {
        "ttft": stamps[0] - start,
        "e2e": stamps[-1] - start,
        "itl": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
    }


async def load(base: str, model: str, n: int, concurrency: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:

        async def run(i):
            async with sem:
                return await one(client, base + "/v1/completions", model, i, max_tokens)

        await run(-1)  # warm-up (first-call costs: handles, NIXL agents, allocator)
        t0 = time.perf_counter()
        res = await asyncio.gather(*(run(i) for i in range(n)))
        wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in res]
    itl = [x for r in res for x in r["itl"]]
    e2e = [r["e2e"] for r in res]
    return {
        "requests": n,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "wall_s": wall,
        "output_tokens_per_s": n * max_tokens / wall,
        "ttft_s": {"p50": pct(ttft, 0.5), "p90": pct(ttft, 0.9), "p99": pct(ttft, 0.99)},
        "itl_s": {
            "p50": pct(itl, 0.5),
            "p90": pct(itl, 0.9),
            "p99": pct(itl, 0.99),
            "mean": statistics.fmean(itl),
        },
        "e2e_s": {"p50": pct(e2e, 0.5), "p90": pct(e2e, 0.9)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded tiny model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--modes", default="unified,disaggregated")
    args = ap.parse_args()

    from serving.env import apply_ray_local_env

    apply_ray_local_env()
    import ray
    from ray import serve

    from serving.app import build_app
    from serving.cli.serve import resolve_config, wait_running

    class A:
        config = mode = host = port = api_key = index_cache = None
        model = args.model

    base_cfg = resolve_config(A())
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = 8000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    out = {
        "date": date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "device": args.device,
        "model": Path(base_cfg.model).name,  # committed: no machine paths
        "modes": {},
    }
    engine = {"device": args.device, "max_num_seqs": max(args.concurrency, 1)}
    for mode in args.modes.split(","):
        cfg = base_cfg.model_copy(update={"mode": mode, "app_name": f"bench-{mode}"})
        cfg = type(cfg).model_validate(
            {
                **cfg.model_dump(mode="json"),
                "unified": {"engine": engine},
                "prefill": {"engine": engine},
                "decode": {"engine": engine},
                "ingress": {"route_prefix": f"/{mode}", "port": port},
            }
        )
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix=f"/{mode}", blocking=False)
        wait_running(cfg.app_name, 300)
        res = asyncio.run(
            load(
                f"http://127.0.0.1:{port}/{mode}",
                cfg.model_name,
                args.requests,
                args.concurrency,
                args.max_tokens,
            )
        )
        out["modes"][mode] = res
        print(mode, json.dumps(res, indent=1))
        serve.delete(cfg.app_name)
    serve.shutdown()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"serving_http-{args.device}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
