"""Import rules: the compute layers never pull in the distributed or web stack."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("ray", "fastapi", "starlette", "uvicorn")
PURE = ["kernels", "model", "serving/engine"]


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


@pytest.mark.parametrize("package", PURE)
def test_no_ray_or_fastapi(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package} has no Python files"
    bad = [
        (str(f.relative_to(ROOT)), m)
        for f in files
        for m in _imports(f)
        if m.split(".")[0] in FORBIDDEN
    ]
    assert not bad, f"{package} imports the distributed/web stack: {bad}"


@pytest.mark.parametrize("name", ["kernels", "model", "serving", "autoscale"])
def test_packages_come_from_this_repository(name):
    # A package called `kernels` exists on PyPI; make sure ours is the one imported.
    mod = importlib.import_module(name)
    assert Path(mod.__file__).resolve().is_relative_to(ROOT), mod.__file__
