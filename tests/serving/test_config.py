"""ServingConfig: YAML in, unknown fields rejected naming the field, cross-field rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from serving.config import ServingConfig


def write(tmp_path, text: str):
    p = tmp_path / "serving.yaml"
    p.write_text(text)
    return p


def test_yaml_round_trip(tmp_path, tiny_dir):
    model = tiny_dir("glm_moe_dsa")
    cfg = ServingConfig.from_yaml(
        write(
            tmp_path,
            f"""
model: {model}
mode: disaggregated
prefill: {{num_cpus: 0.5, engine: {{max_num_batched_tokens: 1024}}}}
decode:
  autoscaling: {{min_replicas: 1, max_replicas: 4, target_kv_usage: 0.7}}
ingress: {{port: 9000, api_keys: [k1, k2], max_prompt_tokens: 100}}
kv_transfer: {{backend: direct, tensor_transport: NIXL}}
plans: {{version: 3}}
""",
        )
    )
    assert cfg.mode == "disaggregated" and cfg.roles == ("prefill", "decode")
    assert cfg.prefill.engine.max_num_batched_tokens == 1024
    assert cfg.decode.autoscaling.max_replicas == 4
    assert cfg.ingress.api_keys == ("k1", "k2")
    assert cfg.kv_transfer.tensor_transport == "nixl"
    assert cfg.plans.user_config() == {"plan_version": 3, "plan_poll_interval_s": 2.0}
    assert cfg.model_name == Path(model).name  # no served_model_name: the directory name
    assert cfg.max_model_len() == 4096 and cfg.max_prompt_tokens() == 100


@pytest.mark.parametrize(
    "text, field",
    [
        ("model: m\nmodle_path: x\n", "modle_path"),
        ("model: m\ningress: {prot: 1}\n", "prot"),
        ("model: m\ndecode: {engine: {max_num_seq: 4}}\n", "max_num_seq"),
    ],
)
def test_unknown_fields_are_rejected(tmp_path, text, field):
    with pytest.raises(ValidationError, match=field):
        ServingConfig.from_yaml(write(tmp_path, text))


@pytest.mark.parametrize("transport", ["gloo", "nccl"])
def test_two_sided_transports_are_refused_with_the_reason(transport):
    with pytest.raises(ValidationError, match="one-sided"):
        ServingConfig(model="m", kv_transfer={"backend": "direct", "tensor_transport": transport})


def test_cuda_ipc_is_refused_with_the_reason():
    with pytest.raises(ValidationError, match="host memory"):
        ServingConfig(model="m", kv_transfer={"backend": "direct", "tensor_transport": "cuda_ipc"})


def test_bad_values_name_the_field():
    with pytest.raises(ValidationError, match="max_replicas"):
        ServingConfig(model="m", decode={"autoscaling": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ValidationError, match="route_prefix"):
        ServingConfig(model="m", ingress={"route_prefix": "v1"})
    with pytest.raises(ValidationError, match="index_fp8"):
        ServingConfig(model="m", mode="disaggregated", prefill={"engine": {"index_fp8": True}})


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(FileNotFoundError):
        ServingConfig.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="mapping"):
        ServingConfig.from_yaml(write(tmp_path, "- a\n- b\n"))


def test_documented_example_config_is_valid():
    from tests.serving.harness import REPO

    cfg = ServingConfig.from_yaml(REPO / "docs" / "serving.example.yaml")
    assert cfg.mode == "disaggregated" and cfg.decode.autoscaling.max_replicas == 2
