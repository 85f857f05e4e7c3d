"""The plan registry actor and the `indexcache plans` CLI."""

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
    with pytest.raises(ValueError, match=match):
        reg.publish("registry-test-b", plan, provenance)


def test_unknown_model_or_version(ray_cluster):
    with pytest.raises(ValueError, match="no any plan|no version 9"):
        reg.show("registry-test-none")
    reg.publish("registry-test-c", "FF", {"source": "pattern"})
    with pytest.raises(ValueError, match="no version 9"):
        reg.show("registry-test-c", 9)


def test_plans_outlive_their_publisher(ray_cluster):
    """The registry owns the object-store copy: a publisher that exits loses nothing."""

    @ray.remote(num_cpus=0)
    def publish_and_exit():
        return reg.publish("registry-test-d", "FSFF", {"source": "pattern"})

    version = ray.get(publish_and_exit.remote())
    assert reg.show("registry-test-d", version).pattern == "FSFF"
    actor = ray.get_actor(reg.ACTOR_NAME, namespace=reg.NAMESPACE)
    assert ray.get(actor.latest_version.remote("registry-test-d")) == version


def test_cli_publish_list_show(ray_cluster, tiny_dir, capsys):
    model = tiny_dir("glm_moe_dsa")
    assert (
        main(["plans", "publish", "registry-test-cli", "--freq", "2", "--checkpoint", model]) == 0
    )
    assert "registry-test-cli v1: FFSF" in capsys.readouterr().out
    assert (
        main(
            [
                "plans",
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
    assert main(["plans", "show", "registry-test-cli"]) == 0
    shown = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert shown["version"] == 2 and shown["provenance"]["source"] == "calibration"
    assert main(["plans", "list", "--model", "registry-test-cli", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [p["pattern"] for p in listed] == ["FFSF", "FSSS"]
    assert main(["plans", "publish", "registry-test-cli", "--freq", "2"]) == 2  # no layer count
    assert "--num-layers" in capsys.readouterr().err


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
