"""Write a model in Hugging Face layout (config.json + model.safetensors), MoE experts unpacked into
per-expert tensors as released checkpoints store them, so `load_model` and transformers read it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

_PACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def hf_state_dict(
    model: torch.nn.Module, tie_word_embeddings: bool = False
) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in model.state_dict().items():
        if tie_word_embeddings and name == "lm_head.weight":
            continue
        m = _PACKED.match(name)
        if not m:
            out[name] = t.contiguous()
            continue
        base, kind = m.groups()
        for e in range(t.shape[0]):
            if kind == "down_proj":
                out[f"{base}.{e}.down_proj.weight"] = t[e].contiguous()
            else:
                gate, up = t[e].chunk(2, dim=0)
                out[f"{base}.{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{base}.{e}.up_proj.weight"] = up.contiguous()
    return out


def save_checkpoint(
    model: torch.nn.Module,
    hf_config: dict,
    out: str | Path,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """`tensors` overrides the model's state dict (e.g. FP8 weights with their scales)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    sd = (
        tensors
        if tensors is not None
        else hf_state_dict(model, bool(hf_config.get("tie_word_embeddings")))
    )
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
