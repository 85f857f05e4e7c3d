"""plan.json: a calibrated IndexCache plan with its provenance.

The plan keys are the Hugging Face config keys (`index_topk_pattern`, `indexer_types`), so the
file's top level also works as a config override (vLLM `--hf-overrides`, SGLang
`--json-model-override-args`) once `provenance` is dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

from model.index_cache import IndexCacheConfig


def plan_document(plan: IndexCacheConfig, provenance: dict) -> dict:
    return {
        "index_topk_pattern": plan.pattern,
        "indexer_types": plan.indexer_types,
        "num_layers": plan.num_layers,
        "full_layers": list(plan.full_layers),
        "retention": plan.retention,
        "plan_id": plan.plan_id,
        "provenance": provenance,
    }


def write_plan(path: str | Path, plan: IndexCacheConfig, provenance: dict) -> Path:
    path = Path(path)
    path.write_text(json.dumps(plan_document(plan, provenance), indent=2) + "\n")
    return path


def read_plan(path: str | Path, num_layers: int | None = None) -> IndexCacheConfig:
    """The plan in a plan.json, checked against the model's layer count when given."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"plan: {path} does not exist")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"plan: {path} is not valid JSON ({e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("index_topk_pattern"), str):
        raise ValueError(f"plan: {path} has no 'index_topk_pattern' string")
    pattern = doc["index_topk_pattern"]
    source = (doc.get("provenance") or {}).get("source", "pattern")
    return IndexCacheConfig.from_pattern(pattern, num_layers or len(pattern), source=source)
