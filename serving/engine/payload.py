"""KV payload: a prefilled prompt's cache rows, moved from a prefill replica to a decode replica.

The payload holds, per token of the prompt, the attention rows of every layer and the indexer key
rows (+ FP8 scales) of F layers only; top-k indices are recomputed by the decode side's F layers
and never travel. It carries the format version, the plan id and the full KV layout, and a decode
replica refuses (ValueError naming the field) any payload its own cache would read differently.
Tensors are contiguous CPU copies so the payload pickles into an object store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.kv_cache import KVCache, KVLayout

PAYLOAD_VERSION = 1


@dataclass(frozen=True)
class KVPayload:
    version: int
    plan_id: str
    layout: dict  # KVLayout.to_dict() of the exporting cache
    prompt_token_ids: list[int]
    first_token: int
    num_tokens: int  # cached rows: the prompt (the first token is computed by the decode side)
    # Per layer [num_tokens, *row]: MLA [n, 1, k_dim]; GQA k and v joined on the last dim,
    # [n, kv_heads, k_dim + v_dim].
    attn: list[torch.Tensor]
    index_k: list[torch.Tensor | None]  # [n, DI] for F layers, None for S layers
    index_scale: list[torch.Tensor | None] = field(default_factory=list)  # FP8 only: [n] fp32
    rng_state: torch.Tensor | None = None  # the request's sampler state, for seeded continuation
    rng_device: str = "cpu"

    @property
    def nbytes(self) -> int:
        ts = [*self.attn, *self.index_k, *self.index_scale]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _slots(pages: list[int], n: int, page_size: int, device) -> torch.Tensor:
    pos = torch.arange(n, device=device)
    table = torch.tensor(pages, dtype=torch.long, device=device)
    return table[pos // page_size] * page_size + pos % page_size


def export_rows(
    cache: KVCache,
    pages: list[int],
    num_tokens: int,
    prompt_token_ids: list[int],
    first_token: int,
    generator: torch.Generator | None = None,
) -> KVPayload:
    """Copy the first `num_tokens` rows of a sequence's pages into a CPU payload."""
    lay = cache.layout
    slots = _slots(pages, num_tokens, lay.page_size, cache.k[0].device)

    def take(t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, *t.shape[2:])[slots].cpu()  # [P, PS, *R] -> [n, *R]

    if lay.attn_kind == "mla":
        attn = [take(k) for k in cache.k]
    else:
        attn = [torch.cat([take(k), take(v)], -1) for k, v in zip(cache.k, cache.v, strict=True)]
    index_k = [take(t) if t is not None else None for t in cache.index_k]
    index_scale = (
        [take(t) if t is not None else None for t in cache.index_scale] if lay.index_fp8 else []
    )
    rng = generator.get_state() if generator is not None else None
    return KVPayload(
        version=PAYLOAD_VERSION,
        plan_id=lay.plan_id,
        layout=lay.to_dict(),
        prompt_token_ids=list(prompt_token_ids),
        first_token=int(first_token),
        num_tokens=num_tokens,
        attn=attn,
        index_k=index_k,
        index_scale=index_scale,
        rng_state=rng,
        rng_device=generator.device.type if generator else "cpu",
    )


def check_payload(payload: KVPayload, layout: KVLayout) -> None:
    """Raise ValueError naming the first field where `payload` does not fit `layout`."""
    if not isinstance(payload, KVPayload):
        raise ValueError(f"payload must be a KVPayload, got {type(payload).__name__}")
    if payload.version != PAYLOAD_VERSION:
        raise ValueError(
            f"payload version {payload.version} is not supported (this engine reads "
            f"version {PAYLOAD_VERSION})"
        )
    if payload.plan_id != layout.plan_id:
        raise ValueError(
            f"payload plan_id {payload.plan_id!r} does not match this engine's "
            f"IndexCache plan_id {layout.plan_id!r}: prefill and decode replicas "
            "must run the same plan"
        )
    mine = layout.to_dict()
    for key in sorted(set(mine) | set(payload.layout)):
        if payload.layout.get(key) != mine.get(key):
            raise ValueError(
                f"payload layout field {key!r} is {payload.layout.get(key)!r}, this "
                f"engine's is {mine.get(key)!r}"
            )
    n = payload.num_tokens
    if n < 1 or n != len(payload.prompt_token_ids):
        raise ValueError(
            f"payload num_tokens {n} does not match its "
            f"{len(payload.prompt_token_ids)} prompt tokens"
        )
    if len(payload.attn) != layout.num_layers or len(payload.index_k) != layout.num_layers:
        raise ValueError(
            f"payload attn/index_k must have {layout.num_layers} layers, got "
            f"{len(payload.attn)}/{len(payload.index_k)}"
        )
    row = (
        (1, layout.k_dim)
        if layout.attn_kind == "mla"
        else (layout.kv_heads, layout.k_dim + layout.v_dim)
    )
    for i, t in enumerate(payload.attn):
        if tuple(t.shape) != (n, *row):
            raise ValueError(f"payload attn[{i}] has shape {tuple(t.shape)}, expected {(n, *row)}")
    full = set(layout.index_layers)
    for i, t in enumerate(payload.index_k):
        if (t is not None) != (i in full):
            raise ValueError(
                f"payload index_k[{i}] is {'present' if t is not None else 'missing'}"
                f" but layer {i} is {'F' if i in full else 'S'} in this plan"
            )
        if t is not None and tuple(t.shape) != (n, layout.index_head_dim):
            raise ValueError(
                f"payload index_k[{i}] has shape {tuple(t.shape)}, expected "
                f"{(n, layout.index_head_dim)}"
            )
    if layout.index_fp8 and len(payload.index_scale) != layout.num_layers:
        raise ValueError(f"payload index_scale must have {layout.num_layers} layers in FP8 mode")


def import_rows(cache: KVCache, pages: list[int], payload: KVPayload, start: int = 0) -> None:
    """Write a checked payload's rows from `start` on into `pages` (already allocated for its
    tokens); rows before `start` are already there (pages shared from the prefix cache)."""
    lay = cache.layout
    dev = cache.k[0].device
    slots = _slots(pages, payload.num_tokens, lay.page_size, dev)[start:]

    def put(dst: torch.Tensor, rows: torch.Tensor) -> None:
        dst.view(-1, *dst.shape[2:])[slots] = rows[start:].to(device=dev, dtype=dst.dtype)

    for layer, rows in enumerate(payload.attn):
        if lay.attn_kind == "mla":
            put(cache.k[layer], rows)
        else:
            put(cache.k[layer], rows[..., : lay.k_dim])
            put(cache.v[layer], rows[..., lay.k_dim :])
    for layer in lay.index_layers:
        put(cache.index_k[layer], payload.index_k[layer])
        if lay.index_fp8:
            put(cache.index_scale[layer], payload.index_scale[layer])
