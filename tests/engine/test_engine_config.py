"""One definition of the engine's settings: EngineConfig; the serving YAML's engine block and
from_pretrained derive from it, and unknown settings are refused by name."""

from __future__ import annotations

import dataclasses

import pytest

from serving.config import EngineArgs
from serving.engine import EngineConfig, LLMEngine
from serving.engine.config import CPU_DEFAULT_CHUNK, GPU_DEFAULT_CHUNK


def test_serving_engine_args_are_the_engine_config():
    names = [f.name for f in dataclasses.fields(EngineConfig) if f.name != "role"]
    assert list(EngineArgs.model_fields) == names
    for f in dataclasses.fields(EngineConfig):
        if f.name == "role":
            continue
        field = EngineArgs.model_fields[f.name]
        assert field.default == f.default and field.description == f.metadata["help"]
    # the dataclass's own checks run on the YAML side too
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineArgs(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="extra"):
        EngineArgs(max_num_seq=4)


def test_unknown_setting_is_named(model_dir):
    with pytest.raises(ValueError, match="max_num_seq"):
        LLMEngine.from_pretrained(model_dir(), max_num_seq=4)


def test_device_defaults():
    assert EngineConfig().chunk == CPU_DEFAULT_CHUNK
    assert EngineConfig(device="cuda").chunk == GPU_DEFAULT_CHUNK
    assert EngineConfig(device="cuda", max_num_batched_tokens=100).chunk == 100
    assert str(EngineConfig(device="cuda").torch_dtype) == "torch.bfloat16"
    assert str(EngineConfig().torch_dtype) == "torch.float32"
    assert not EngineConfig().use_cuda_graphs
    assert not EngineConfig(device="cuda", enforce_eager=True).use_cuda_graphs
    with pytest.raises(ValueError, match="device"):
        EngineConfig(device="tpu9")
