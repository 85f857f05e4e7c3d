"""Training-aware IndexCache: train only the F layers' indexers, everything else frozen.

Each F layer l learns towards the dense attention of the layers that will use its indices:
`loss="multi"` is the paper's L_multi over l and its S layers l+1..l+m (paper.md section 4),
`loss="single"` is the DSA dense warm-up loss on layer l alone. The model runs its own forward
with the plan (S layers reuse indices); as in DSA, the indexer input is detached, so only the
indexer projections get gradients.

Memory: the forward runs layer by layer without a graph and a group's loss is computed as soon as
its last layer has run, in chunks of query rows; each chunk back-propagates into detached copies of
the indexer projections (q, k, w), which back-propagate once into the weights at the end. Peak
memory is one group's inputs plus a chunk x keys tile, not keys^2 per layer.

Checkpoint (the `out` directory): indexer.safetensors (indexer weights under their checkpoint
names, so they can patch a checkpoint), optimizer.pt (AdamW state), state.json (step, plan, loss
history); written atomically, resumed with `resume=True`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from model.calibration.losses import attention_probs, head_summed, indexer_logits, multi_layer_kl
from model.dsa import DSAForCausalLM, scratch_context
from model.index_cache import IndexCacheConfig
from model.save import save_checkpoint

LOSSES = ("multi", "single")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "special_tokens_map.json",
)


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 100
    lr: float = 1e-3  # DSA's dense warm-up learning rate
    loss: str = "multi"
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    chunk: int = 256  # query rows per loss tile
    checkpoint_every: int = 50

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("steps", "chunk", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")


def served_layers(plan: IndexCacheConfig, loss: str = "multi") -> dict[int, list[int]]:
    """F layer -> the layers whose attention it is trained towards (itself first)."""
    if loss == "single":
        return {l: [l] for l in plan.full_layers}
    groups: dict[int, list[int]] = {}
    for i in range(plan.num_layers):
        groups.setdefault(plan.source_layer(i), []).append(i)
    return groups


def indexer_parameters(model: DSAForCausalLM) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".self_attn.indexer." in n}


class IndexerDistiller:
    def __init__(self, model: DSAForCausalLM, cfg: DistillConfig | None = None):
        self.model, self.cfg = model, cfg or DistillConfig()
        self.plan = model.plan
        self.groups = served_layers(self.plan, self.cfg.loss)
        self.last_of = {g[-1]: l for l, g in self.groups.items()}
        self.member = {j for g in self.groups.values() for j in g}
        for p in model.parameters():
            p.requires_grad_(False)
        self.params = indexer_parameters(model)
        for p in self.params.values():
            p.requires_grad_(True)
        self.opt = torch.optim.AdamW(
            self.params.values(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay
        )
        self.step, self.history = 0, []

    # -- loss ------------------------------------------------------------------------------
    def batch_loss(
        self, ids: torch.Tensor, backward: bool = True
    ) -> tuple[float, dict[int, float]]:
        """Mean per-token loss over F layers for ids [B, S]; accumulates indexer gradients when
        `backward`. Returns (mean over F layers, {F layer: loss})."""
        model = self.model
        ids = ids.to(model.device)
        ctx = scratch_context(model, *ids.shape)
        model.prepare(ctx)
        per_layer, inputs = {}, {}
        with torch.no_grad():
            h = model.model.embed_tokens(ids.reshape(-1))
            for i, layer in enumerate(model.model.layers):
                if i in self.member:
                    inputs[i] = layer.input_layernorm(h)
                h = layer(h, ctx)
                if i in self.last_of:
                    l = self.last_of[i]
                    per_layer[l] = self._group_loss(l, inputs, ctx, backward)
                    for j in self.groups[l]:
                        del inputs[j]
        return sum(per_layer.values()) / len(per_layer), per_layer

    def _group_loss(self, l: int, inputs: dict, ctx, backward: bool) -> float:
        layers = self.model.model.layers
        with torch.no_grad():  # targets: q and k of every served layer, as its attention sees them
            qk = {j: layers[j].self_attn.qkv(inputs[j], ctx) for j in self.groups[l]}
        with torch.set_grad_enabled(backward):
            proj = layers[l].self_attn.indexer.project(inputs[l], qk[l][0], ctx)
        leaves = [t.detach().requires_grad_(backward) for t in proj]
        iq, ik, iw = leaves
        t_total, total = ctx.num_tokens, 0.0
        cu = ctx.cu_seqlens_q.tolist()
        for b in range(len(cu) - 1):
            lo, hi = cu[b], cu[b + 1]
            for c in range(lo, hi, self.cfg.chunk):
                e = min(c + self.cfg.chunk, hi)
                pos = ctx.positions[c:e]
                with torch.no_grad():
                    ps = [
                        head_summed(
                            attention_probs(
                                qk[j][1][c:e], qk[j][2][lo:hi], layers[j].self_attn.scale, pos
                            )
                        )
                        for j in self.groups[l]
                    ]
                with torch.set_grad_enabled(backward):
                    loss = multi_layer_kl(ps, indexer_logits(iq[c:e], iw[c:e], ik[lo:hi], pos))
                    loss = loss / t_total
                if backward:
                    loss.backward()
                total += float(loss)
        if backward:
            torch.autograd.backward(list(proj), [leaf.grad for leaf in leaves])
        return total

    # -- training --------------------------------------------------------------------------
    def train(
        self,
        batches: list[torch.Tensor],
        out: str | Path | None = None,
        progress: bool = True,
        meta: dict | None = None,
    ) -> list[dict]:
        """Steps self.step..cfg.steps-1; step s uses batches[s % len(batches)]."""
        if not batches:
            raise ValueError("distill needs at least one batch")
        params = list(self.params.values())
        with tqdm(
            total=self.cfg.steps,
            initial=self.step,
            desc="distill indexers",
            unit="step",
            disable=not progress,
        ) as bar:
            while self.step < self.cfg.steps:
                t0 = time.perf_counter()
                self.opt.zero_grad(set_to_none=True)
                loss, per = self.batch_loss(batches[self.step % len(batches)])
                clip = self.cfg.grad_clip if self.cfg.grad_clip is not None else float("inf")
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, clip))
                self.opt.step()
                self.step += 1
                self.history.append(
                    {
                        "step": self.step,
                        "loss": loss,
                        "grad_norm": gnorm,
                        "layers": {str(k): v for k, v in per.items()},
                        "seconds": time.perf_counter() - t0,
                    }
                )
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if out is not None and (
                    self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps
                ):
                    self.save(out, meta)
        return self.history

    # -- checkpoint ------------------------------------------------------------------------
    def save(self, out: str | Path, meta: dict | None = None) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().contiguous().cpu() for n, p in self.params.items()}
        _atomic(out / "indexer.safetensors", lambda f: save_file(tensors, f))
        _atomic(out / "optimizer.pt", lambda f: torch.save(self.opt.state_dict(), f))
        state = {
            "step": self.step,
            "pattern": self.plan.pattern,
            "config": asdict(self.cfg),
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "history": self.history,
            **(meta or {}),
        }
        _atomic(out / "state.json", lambda f: Path(f).write_text(json.dumps(state, indent=1)))

    def load(self, out: str | Path) -> None:
        """Resume from a checkpoint directory written by `save` for the same plan."""
        out = Path(out)
        missing = [
            f
            for f in ("indexer.safetensors", "optimizer.pt", "state.json")
            if not (out / f).is_file()
        ]
        if missing:
            raise ValueError(f"resume: {out} has no {', '.join(missing)}")
        state = json.loads((out / "state.json").read_text())
        if state.get("pattern") != self.plan.pattern:
            raise ValueError(
                f"resume: checkpoint plan {state.get('pattern')} differs from this "
                f"run's plan {self.plan.pattern}"
            )
        if state["config"]["loss"] != self.cfg.loss:
            raise ValueError(
                f"resume: checkpoint loss {state['config']['loss']!r} differs from "
                f"{self.cfg.loss!r}"
            )
        with safe_open(out / "indexer.safetensors", "pt", device="cpu") as f:
            names = set(f.keys())
            if names != set(self.params):
                raise ValueError(
                    f"resume: indexer tensors differ from the model's: "
                    f"{sorted(names ^ set(self.params))[:5]}"
                )
            with torch.no_grad():
                for n, p in self.params.items():
                    t = f.get_tensor(n)
                    if t.shape != p.shape:
                        raise ValueError(
                            f"resume: {n} has shape {list(t.shape)}, the model {list(p.shape)}"
                        )
                    p.copy_(t)
        self.opt.load_state_dict(
            torch.load(out / "optimizer.pt", weights_only=True, map_location=self.model.device)
        )
        self.step, self.history = int(state["step"]), list(state["history"])


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def export_checkpoint(model: DSAForCausalLM, src: str | Path, out: str | Path) -> Path:
    """A servable checkpoint: the model's weights (trained indexers, no S-layer indexers) with the
    plan written into config.json, plus the source's tokenizer files. FP8 sources are written
    dequantised, so their quantization_config is dropped."""
    src, out = Path(src), Path(out)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["indexer_types"] = model.plan.indexer_types
    cfg["index_topk_pattern"] = model.plan.pattern
    cfg["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    save_checkpoint(model, cfg, out)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return out
