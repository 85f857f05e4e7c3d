"""Where a decode step and a prefill chunk of benchmarks/e2e.py spend their GPU time: kernels by
name (count and device time per step) from torch.profiler, for one plan at one context.

    python -m benchmarks.e2e_profile --layers 12 --context 65536 --plan searched-1/4 --out DIR

Writes DIR/profile-<plan>.json (and prints the top kernels): the evidence behind the e2e
benchmark's misses, and what to fuse next.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.e2e import (
    GLM_FLASH,
    build_model,
    engine_for,
    fill_random,
    plans_for,
    seat,
    share_weights,
    sync,
)


def kernels(prof, steps: int) -> list[dict]:
    agg: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = re.sub(r"\s+", " ", e.name)[:90]
            agg[name][0] += 1
            agg[name][1] += e.time_range.elapsed_us()
    rows = [dict(kernel=k, per_step=c / steps, us_per_step=t / steps) for k, (c, t) in agg.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def profile_steps(engine, steps: int, warm: int = 2) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warm):
        engine.step()
    sync(engine.model.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        sync(engine.model.device)
    return kernels(prof, steps)


def show(title: str, rows: list[dict], top: int) -> None:
    total = sum(r["us_per_step"] for r in rows)
    count = sum(r["per_step"] for r in rows)
    print(f"--- {title}: {total / 1e3:.2f} ms of kernels, {count:.0f} kernels per step")
    for r in rows[:top]:
        print(f"{r['us_per_step']:9.1f} us {r['per_step']:6.0f}x  {r['kernel']}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--context", type=int, default=65536)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--plan", default="searched-1/4")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=Path, default=Path("."))
    a = p.parse_args(argv)
    from serving.engine import SamplingParams

    dev = torch.device("cuda")
    cfg = dict(GLM_FLASH, num_hidden_layers=a.layers)
    pattern = plans_for(47, quick=False)[a.plan][: a.layers]
    base = build_model("glm_moe_dsa", cfg, "F" * a.layers, torch.bfloat16, dev)
    model = share_weights(base, pattern) if "F" * a.layers != pattern else base
    out = {"plan": a.plan, "pattern": pattern, "layers": a.layers, "context": a.context}
    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    tokens = a.batch * (a.context + 128)
    modes = (("graphs, no compile", False, False), ("graphs", False, True), ("eager", True, True))
    for mode, eager, comp in modes:
        eng = engine_for(
            model,
            dev,
            kv_tokens=tokens,
            chunk=None,
            batch=a.batch,
            eager=eager,
            max_len=a.context + 128,
            compile=comp,
        )
        fill_random(eng.cache)
        for i in range(a.batch):
            seat(eng, f"r{i}", a.context, sp, cfg["vocab_size"])
        out[mode] = profile_steps(eng, a.steps)
        show(f"{mode}, batch {a.batch}, context {a.context}", out[mode], a.top)
        del eng
        torch.cuda.empty_cache()
    # one prefill chunk at the end of a long prompt: its cached prefix is random rows
    eng = engine_for(
        model,
        dev,
        kv_tokens=a.context + 128,
        chunk=None,
        batch=1,
        eager=True,
        max_len=a.context + 128,
    )
    fill_random(eng.cache)
    seq = seat(eng, "p", a.context - eng.config.chunk, sp, cfg["vocab_size"])
    seq.token_ids += [5] * (eng.config.chunk - 1)  # one chunk of prompt still to compute
    seq.num_prompt_tokens = len(seq.token_ids)
    eng.block_manager.allocate(seq, len(seq.token_ids) + 1)
    out["prefill-chunk"] = profile_steps(eng, 1, warm=0)
    from model.layers import glue

    out["glue"] = glue.status()
    print("glue:", out["glue"])
    show(f"prefill chunk of {eng.config.chunk} at {a.context}", out["prefill-chunk"], a.top)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"profile-{a.plan.replace('/', '')}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
