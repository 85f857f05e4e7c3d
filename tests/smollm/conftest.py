"""One converted SmolLM2 checkpoint per test session (bf16 on disk, ~290 MB in a temp dir)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory):
    from model.gguf import convert_gguf

    return convert_gguf(tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="session")
def smollm_fp32(smollm_dir):
    import torch

    from model import load_model

    return load_model(smollm_dir, dtype=torch.float32)
