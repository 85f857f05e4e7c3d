"""The plan registry (GCS key-value records) and the `indexcache plans` CLI."""

from __future__ import annotations

import json

import pytest
import ray

from model.index_cache import IndexCacheConfig
from serving import plan_registry as reg
from serving.cli import main

pytestmark = pytest.mark.ray


def test_publish_versions_and_provenance(ray_cluster):
    model = "registry-test-a"
    reg.register_model(model, 4)
    v1 = reg.publish(model, "FSFS", reg.Provenance("pattern"))
    v2 = reg.publish(model, IndexCacheConfig.from_freq(4, 2), {"source": "freq", "freq": 2})
    v3 = reg.publish(model, "FSSS", {"source": "calibration", "calibration_data_hash": "abc123"})
    assert (v1, v2, v3) == (1, 2, 3)
    latest = reg.show(model)
    assert (latest.version, latest.pattern) == (3, "FSSS")
    assert latest.provenance.calibration_data_hash == "abc123" and latest.provenance.created_at
    assert latest.plan_id == IndexCacheConfig("FSSS").plan_id
    assert reg.show(model, 2).provenance.details == {"freq": 2}
    assert [r.version for r in reg.list_plans(model)] == [1, 2, 3]


@pytest.mark.parametrize(
    "plan, provenance, match",
    [
        ("SFFF", {"source": "pattern"}, "start with 'F'"),
        ("FXF", {"source": "pattern"}, "'F' and 'S'"),
        ("FSFS", {"source": "guess"}, "source"),
        ("FSFS", {"source": "calibration"}, "calibration_data_hash"),
        (42, {"source": "pattern"}, "pattern string"),
    ],
)
def test_bad_plans_are_refused(ray_cluster, plan, provenance, match):
    reg.register_model("registry-test-b", 4)
    with pytest.raises(ValueError, match=match):
        reg.publish("registry-test-b", plan, provenance)
    assert reg.latest("registry-test-b") is None  # nothing was stored


@pytest.mark.parametrize(
    "model, plan, num_layers, match",
    [
        ("registry-test-len", "FSFS" * 7 + "FS" + "F", None, "31 letters, but model .* 30 layers"),
        ("registry-test-len", "FSF", None, "3 letters"),
        ("registry-test-len", "F" * 30, 28, "served with 30 layers"),
        ("registry-test-unknown", "FSFS", None, "not served on this cluster"),
        ("registry-test-unknown", "FSF", 4, "3 letters, but model .* 4 layers"),
    ],
)
def test_plans_that_do_not_fit_the_model_are_refused(ray_cluster, model, plan, num_layers, match):
    """The operator's mistake from issue 14 (`--pattern FSFS` for a 30-layer model) is refused
    before anything changes: `latest` stays what it was."""
    reg.register_model("registry-test-len", 30)
    before = reg.latest(model)
    with pytest.raises(ValueError, match=match):
        reg.publish(model, plan, {"source": "pattern"}, num_layers=num_layers)
    assert reg.latest(model) == before


def test_a_checkpoint_layer_count_admits_a_model_not_served_yet(ray_cluster):
    v = reg.publish("registry-test-new", "FSFS", {"source": "pattern"}, num_layers=4)
    assert reg.show("registry-test-new", v).pattern == "FSFS"
    assert reg.model_layers("registry-test-new") == 4  # later publishes are checked against it
    with pytest.raises(ValueError, match="2 letters"):
        reg.publish("registry-test-new", "FS", {"source": "pattern"})


def test_unknown_model_or_version(ray_cluster):
    with pytest.raises(ValueError, match="no any plan|no version 9"):
        reg.show("registry-test-none")
    reg.register_model("registry-test-c", 2)
    reg.publish("registry-test-c", "FF", {"source": "pattern"})
    with pytest.raises(ValueError, match="no version 9"):
        reg.show("registry-test-c", 9)


def test_plans_outlive_their_publisher_and_need_no_actor(ray_cluster):
    """Records live in the GCS key-value store: a publisher that exits loses nothing, and no
    actor holds them (so none can die with them)."""
    reg.register_model("registry-test-d", 4)

    @ray.remote(num_cpus=0)
    def publish_and_exit():
        return reg.publish("registry-test-d", "FSFF", {"source": "pattern"})

    version = ray.get(publish_and_exit.remote())
    assert reg.show("registry-test-d", version).pattern == "FSFF"
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert not any("registry" in n for n in names), names


def test_racing_publishers_get_distinct_versions(ray_cluster):
    reg.register_model("registry-test-race", 4)

    @ray.remote(num_cpus=0)
    def publish(pattern):
        return reg.publish("registry-test-race", pattern, {"source": "pattern"})

    patterns = ["FFFF", "FSFF", "FFSF", "FFFS", "FSSS", "FSFS"]
    versions = ray.get([publish.remote(p) for p in patterns])
    assert sorted(versions) == list(range(1, len(patterns) + 1))
    stored = {r.version: r.pattern for r in reg.list_plans("registry-test-race")}
    assert {stored[v] for v in versions} == set(patterns)


def test_cli_publish_list_show(ray_cluster, tiny_dir, capsys):
    model = tiny_dir("glm_moe_dsa")
    address = ray.get_runtime_context().gcs_address
    plans = ["plans", "--address", address]
    assert main([*plans, "publish", "registry-test-cli", "--freq", "2", "--checkpoint", model]) == 0
    assert "registry-test-cli v1: FFSF" in capsys.readouterr().out
    assert (
        main(
            [
                *plans,
                "publish",
                "registry-test-cli",
                "--pattern",
                "FSSS",
                "--source",
                "calibration",
                "--calibration-hash",
                "h1",
            ]
        )
        == 0
    )
    assert main([*plans, "show", "registry-test-cli"]) == 0
    shown = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert shown["version"] == 2 and shown["provenance"]["source"] == "calibration"
    assert main([*plans, "list", "--model", "registry-test-cli", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [p["pattern"] for p in listed] == ["FFSF", "FSSS"]
    # The model is known now (its checkpoint's 4 layers): --freq needs no layer count.
    assert main([*plans, "publish", "registry-test-cli", "--freq", "2"]) == 0
    assert main([*plans, "publish", "registry-test-nope", "--freq", "2"]) == 2
    assert "--num-layers" in capsys.readouterr().err
    assert main([*plans, "publish", "registry-test-cli", "--pattern", "FSFSFS"]) == 2
    assert "6 letters, but model 'registry-test-cli' has 4 layers" in capsys.readouterr().err
    assert [r.version for r in reg.list_plans("registry-test-cli")] == [1, 2, 3]  # unchanged


def test_cli_needs_an_explicit_or_recorded_address(tmp_path, monkeypatch, capsys):
    """Never "whichever local cluster there is": without --address, only the cluster that a
    running `indexcache serve` recorded."""
    import os

    from serving.cli import address

    monkeypatch.setenv("INDEXCACHE_HOME", str(tmp_path))
    assert main(["plans", "list"]) == 2
    assert "pass --address" in capsys.readouterr().err
    (tmp_path / address.RECORD).write_text('{"address": "127.0.0.1:1", "pid": 999999999}')
    assert main(["plans", "list"]) == 2
    assert "is not running" in capsys.readouterr().err
    address.record("127.0.0.1:6399")
    assert address.resolve(None) == "127.0.0.1:6399" and address.resolve("h:1") == "h:1"
    assert f'"pid": {os.getpid()}' in (tmp_path / address.RECORD).read_text()
    address.forget()
    assert not (tmp_path / address.RECORD).exists()


def test_calibrate_cli_provenance_is_accepted():
    """`indexcache calibrate --publish` sends this shape (serving/cli/calibrate.py): the
    registry keys are read, everything else is kept under `details`."""
    prov = reg.Provenance.coerce(
        {
            "source": "calibration",
            "tool": "indexcache calibrate",
            "model": "m",
            "created_at": 1795000000.0,
            "created_at_utc": "2026-11-19T00:00:00+00:00",
            "calibration_data_hash": "sha",
            "data_files": ["a.jsonl"],
            "seq_len": 64,
            "loss_trajectory": [{"flipped": 3, "loss": 1.5}],
        }
    )
    assert (prov.source, prov.calibration_data_hash, prov.created_at) == (
        "calibration",
        "sha",
        1795000000.0,
    )
    assert prov.details["tool"] == "indexcache calibrate"
    assert prov.details["loss_trajectory"] == [{"flipped": 3, "loss": 1.5}]
