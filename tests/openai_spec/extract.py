"""Cut the operations we serve out of the official OpenAI OpenAPI spec (openapi.json of
openai/openai-openapi), with every component they reference: `python extract.py FULL OUT`.
The output is what tests read; see PROVENANCE.md for the pinned source."""

from __future__ import annotations

import json
import sys

OPERATIONS = {
    "/chat/completions": ["post"],
    "/completions": ["post"],
    "/models": ["get"],
    "/models/{model}": ["get"],
}


def refs(node, out: set[str]) -> None:
    if isinstance(node, dict):
        r = node.get("$ref")
        if isinstance(r, str) and r.startswith("#/components/"):
            out.add(r)
        for v in node.values():
            refs(v, out)
    elif isinstance(node, list):
        for v in node:
            refs(v, out)


def extract(spec: dict) -> dict:
    paths = {p: {m: spec["paths"][p][m] for m in methods} for p, methods in OPERATIONS.items()}
    seen: set[str] = set()
    todo: set[str] = set()
    refs(paths, todo)
    while todo:
        r = todo.pop()
        if r in seen:
            continue
        seen.add(r)
        _, _, kind, name = r.split("/", 3)
        refs(spec["components"][kind][name], todo)
    components: dict = {}
    for r in sorted(seen):
        _, _, kind, name = r.split("/", 3)
        components.setdefault(kind, {})[name] = spec["components"][kind][name]
    return {
        "openapi": spec["openapi"],
        "info": spec["info"],
        "servers": spec.get("servers", []),
        "security": spec.get("security", []),
        "paths": paths,
        "components": {**components, "securitySchemes": spec["components"]["securitySchemes"]},
    }


if __name__ == "__main__":
    full = json.load(open(sys.argv[1]))
    with open(sys.argv[2], "w") as f:
        json.dump(extract(full), f, indent=1, sort_keys=True)
        f.write("\n")
