"""FP8 block quantisation of weights as the DeepSeek-V3 / V3.2 and GLM-5 checkpoints ship them:
e4m3 values with one fp32 `weight_scale_inv` per 128 x 128 block (a multiplier: W ~ q * s).
Used to write FP8 test checkpoints; nothing here runs at serving time."""

from __future__ import annotations

import re

import torch

FP8_MAX = 448.0
BLOCK = 128
# What the released FP8 checkpoints quantise: the 2-D projection weights of attention, indexer,
# dense MLP and experts. Norms, embeddings, lm_head, the router and the indexer's head weights
# (weights_proj) stay in bf16.
QUANTISED = re.compile(r"(_proj|_proj_with_mqa|\.wq_b|\.wk)\.weight$")
NOT_QUANTISED = re.compile(r"(weights_proj|mlp\.gate)\.weight$")


def quantize_weight(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (e4m3 [N, K], fp32 scales [ceil(N/block), ceil(K/block)]), amax/448 per block."""
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    pad = torch.zeros(nb * block, kb * block, dtype=torch.float32, device=w.device)
    pad[:n, :k] = w.float()
    blocks = pad.view(nb, block, kb, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(nb * block, kb * block)[:n, :k].contiguous(), scale


def is_quantised(key: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and bool(QUANTISED.search(key)) and not NOT_QUANTISED.search(key)


def fp8_state_dict(sd: dict[str, torch.Tensor], rest_dtype: torch.dtype | None = None) -> dict:
    """A Hugging Face state dict with its projection weights in FP8 (+ `_scale_inv`), the other
    tensors cast to `rest_dtype` (None: as they are)."""
    out = {}
    for k, t in sd.items():
        if is_quantised(k, t):
            out[k], out[k + "_scale_inv"] = quantize_weight(t)
        else:
            out[k] = t if rest_dtype is None else t.to(rest_dtype)
    return out


QUANT_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [BLOCK, BLOCK],
}
