"""Rendered kustomizations, once per session: {"base" | "dev" | "prod" | "tp8": [documents]}."""

from __future__ import annotations

import pytest

from tests.deploy import k8s

TARGETS = {
    "base": k8s.K8S / "base",
    "dev": k8s.K8S / "overlays" / "dev",
    "prod": k8s.K8S / "overlays" / "prod",
    "tp8": k8s.K8S / "overlays" / "tp8",
}
# The serving YAML whose render each target runs (dev inherits the base's).
SERVING_YAML = {
    "base": k8s.K8S / "base" / "serving.yaml",
    "dev": k8s.K8S / "base" / "serving.yaml",
    "prod": k8s.K8S / "overlays" / "prod" / "serving.yaml",
    "tp8": k8s.K8S / "overlays" / "tp8" / "serving.yaml",
}


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    return {name: k8s.kustomize(path) for name, path in TARGETS.items()}


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]
