"""The Prometheus series Ray Serve itself exports, read from the installed Ray's source.

Ray Serve declares its metrics with `ray.util.metrics.{Counter,Gauge,Histogram}(name, ...)`;
Ray's exporter prefixes `ray_`, adds `_total` to counters and `_bucket/_sum/_count` to
histograms (env.md section 4). Names built with an f-string over the protocol
(`f"serve_num_{protocol_name}_requests"`) are expanded for HTTP and gRPC.
"""

from __future__ import annotations

import ast
import functools
import itertools
from pathlib import Path

_KINDS = {"Counter", "Gauge", "Histogram"}
_PROTOCOLS = ("http", "grpc")


def _names(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        parts = [
            [v.value] if isinstance(v, ast.Constant) else list(_PROTOCOLS) for v in node.values
        ]
        return ["".join(p) for p in itertools.product(*parts)]
    return []


@functools.cache
def serve_series() -> frozenset[str]:
    import ray.serve

    out: set[str] = set()
    for path in Path(ray.serve.__file__).parent.rglob("*.py"):
        if "tests" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            kind = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if kind not in _KINDS:
                continue
            arg = (
                node.args[0]
                if node.args
                else next((k.value for k in node.keywords if k.arg == "name"), None)
            )
            for name in _names(arg) if arg is not None else []:
                if not name.startswith("serve_"):
                    continue
                base = "ray_" + name
                if kind == "Counter":
                    out.add(base + "_total")
                elif kind == "Histogram":
                    out.update(base + s for s in ("_bucket", "_sum", "_count"))
                else:
                    out.add(base)
    return frozenset(out)
