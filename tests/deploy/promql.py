"""Metric and label names a PromQL expression reads, from a real PromQL parser (promql-parser)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import promql_parser

# Grafana interpolates these before the query reaches Prometheus; any valid value will do.
_GRAFANA_INTERVAL = re.compile(r"\$__\w+")
_GRAFANA_VAR = re.compile(r"\$\{?\w+\}?")


@dataclass
class Refs:
    metrics: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)  # in matchers, by/without, on/ignoring


def interpolate_grafana(expr: str) -> str:
    return _GRAFANA_VAR.sub(".*", _GRAFANA_INTERVAL.sub("1m", expr))


def refs(expr: str) -> Refs:
    """Parse `expr` (ValueError when it is not valid PromQL) and collect what it names."""
    out = Refs()
    _walk(promql_parser.parse(expr), out)
    return out


def _walk(node, out: Refs) -> None:
    kind = type(node).__name__
    if kind == "VectorSelector":
        if node.name:
            out.metrics.add(node.name)
        for m in node.matchers.matchers:
            if m.name == "__name__":
                out.metrics.add(m.value)
            else:
                out.labels.add(m.name)
        return
    if kind == "MatrixSelector":
        _walk(node.vector_selector, out)
        return
    modifier = getattr(node, "modifier", None)
    if kind == "BinaryExpr":
        if modifier is not None:
            if modifier.matching is not None:
                out.labels.update(modifier.matching.labels)  # on(...) / ignoring(...)
            out.labels.update(modifier.group_labels or ())  # group_left(...) / group_right(...)
        _walk(node.lhs, out)
        _walk(node.rhs, out)
    elif kind == "Call":
        for arg in node.args:
            _walk(arg, out)
    elif kind == "AggregateExpr":
        if modifier is not None:
            out.labels.update(modifier.labels)  # by (...) / without (...)
        _walk(node.expr, out)
        if node.param is not None:
            _walk(node.param, out)
    elif kind in ("ParenExpr", "UnaryExpr", "SubqueryExpr"):
        _walk(node.expr, out)
    elif kind not in ("NumberLiteral", "StringLiteral"):
        raise ValueError(f"unhandled PromQL node {kind}")
