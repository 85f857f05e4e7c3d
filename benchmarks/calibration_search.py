"""Greedy IndexCache search throughput: cached-prefix scoring vs a full forward per candidate.

    python benchmarks/calibration_search.py [--layers 12] [--seq-len 512] [--device cpu]

Builds a random dsa_llama checkpoint of the given depth in a temporary directory, runs the search
to 1/4 retention both ways on the same batches and writes
benchmarks/results/calibration_search_<device>.json. Both runs must return the same plan (checked),
so only the speed differs.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from model import load_model, make_tiny
from model.calibration import greedy_search


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--num-seqs", type=int, default=4)
    ap.add_argument("--index-topk", type=int, default=64)
    ap.add_argument("--retain", type=float, default=0.25)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny(
            "dsa_llama",
            tmp,
            num_hidden_layers=args.layers,
            hidden_size=args.hidden,
            intermediate_size=2 * args.hidden,
            index_topk=args.index_topk,
        )
        model = load_model(path, dtype=torch.float32, device=args.device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 320, (args.num_seqs, args.seq_len), generator=g)
    batches = list(ids.split(2))
    runs = {}
    for name, reuse in (("cached_prefix", True), ("naive", False)):
        t0 = time.perf_counter()
        r = greedy_search(model, batches, args.retain, reuse_prefix=reuse, progress=False)
        runs[name] = {
            "seconds": time.perf_counter() - t0,
            "plan": r.plan.pattern,
            "candidate_evals": r.candidate_evals,
            "candidate_evals_per_s": r.to_dict()["candidate_evals_per_s"],
            "layer_forwards": r.layer_forwards,
            "final_loss": r.final_loss,
        }
    if runs["cached_prefix"]["plan"] != runs["naive"]["plan"]:
        raise SystemExit("cached-prefix and naive searches disagree")
    out = {
        "date": datetime.now(UTC).date().isoformat(),
        "device": args.device,
        "hardware": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "config": vars(args),
        **runs,
        "speedup": runs["naive"]["seconds"] / runs["cached_prefix"]["seconds"],
    }
    res = Path(__file__).parent / "results" / f"calibration_search_{args.device.split(':')[0]}.json"
    res.parent.mkdir(exist_ok=True)
    res.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
