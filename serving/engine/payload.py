"""KV payload: a prefilled prompt's cache rows, moved from a prefill replica to a decode replica.

A payload is a `KVHeader` (what the rows are: format version, plan id, the full KV layout, the
tokens, the first sampled token, the request's sampler state) and one flat byte tensor holding,
per token of the prompt, the attention rows of every layer and the indexer key rows (+ FP8
scales) of F layers only, part after part in the order `parts()` gives. Top-k indices never
travel: the decode side's F layers recompute them. One flat tensor means one staging copy on
the prefill side, one registration or object-store copy in the transport and one host-to-device
copy on the decode side, whatever the layer count.

The header travels ahead of the bytes (in the transport's handle), so a decode replica can check
it and reserve pages before anything large moves; it refuses (ValueError naming the field) any
payload its own cache would read differently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.kv_cache import KVLayout

PAYLOAD_VERSION = 2
_ALIGN = 16  # every part starts on a 16-byte boundary, so its dtype view is aligned


@dataclass(frozen=True)
class KVHeader:
    version: int
    plan_id: str
    layout: dict  # KVLayout.to_dict() of the exporting cache
    prompt_token_ids: list[int]  # every cached token: the prompt, and resumed tokens if any
    first_token: int
    num_tokens: int  # cached rows (the first token is computed by the decode side)
    rng_state: bytes | None = field(default=None, repr=False)  # for seeded continuation
    rng_device: str = "cpu"

    @property
    def nbytes(self) -> int:
        return payload_nbytes(self.layout, self.num_tokens)


@dataclass(frozen=True)
class Part:
    kind: str  # "attn" | "index_k" | "index_scale"
    layer: int
    dtype: torch.dtype
    shape: tuple[int, ...]  # [num_tokens, *row]
    offset: int  # bytes into the flat tensor
    nbytes: int


def parts(layout: dict, num_tokens: int) -> list[Part]:
    """Where each layer's rows sit in the flat tensor of a payload of `layout` (a
    KVLayout.to_dict()). MLA attention rows are [n, 1, k_dim]; GQA k and v joined on the last
    dim, [n, kv_heads, k_dim + v_dim]; indexer keys [n, DI] for F layers; FP8 scales [n] fp32."""
    n, out, at = num_tokens, [], 0
    dt = getattr(torch, layout["dtype"])
    if layout["attn_kind"] == "mla":
        row = (1, layout["k_dim"])
    else:
        row = (layout["kv_heads"], layout["k_dim"] + layout["v_dim"])
    idx_dt = torch.float8_e4m3fn if layout["index_fp8"] else dt

    def add(kind: str, layer: int, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        nonlocal at
        nb = dtype.itemsize
        for s in shape:
            nb *= s
        out.append(Part(kind, layer, dtype, shape, at, nb))
        at += -(-nb // _ALIGN) * _ALIGN

    for layer in range(layout["num_layers"]):
        add("attn", layer, dt, (n, *row))
    for layer in layout["index_layers"]:
        add("index_k", layer, idx_dt, (n, layout["index_head_dim"]))
        if layout["index_fp8"]:
            add("index_scale", layer, torch.float32, (n,))
    return out


def payload_nbytes(layout: dict, num_tokens: int) -> int:
    ps = parts(layout, num_tokens)
    return ps[-1].offset + -(-ps[-1].nbytes // _ALIGN) * _ALIGN if ps else 0


@dataclass(frozen=True)
class KVPayload:
    header: KVHeader
    data: torch.Tensor  # uint8 [header.nbytes] on the host: the parts back to back

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def plan_id(self) -> str:
        return self.header.plan_id

    @property
    def num_tokens(self) -> int:
        return self.header.num_tokens

    @property
    def first_token(self) -> int:
        return self.header.first_token

    def views(self) -> list[tuple[Part, torch.Tensor]]:
        """Each part as a typed view of `data` (no copy)."""
        return [(p, view(self.data, p)) for p in parts(self.header.layout, self.num_tokens)]

    @property
    def attn(self) -> list[torch.Tensor]:
        return [t for p, t in self.views() if p.kind == "attn"]

    @property
    def index_k(self) -> list[torch.Tensor | None]:
        """Per layer: [n, DI] for F layers, None for S layers."""
        return self._per_layer("index_k")

    @property
    def index_scale(self) -> list[torch.Tensor | None]:
        """Per layer: [n] fp32 for F layers in FP8 mode, else None."""
        return self._per_layer("index_scale")

    def _per_layer(self, kind: str) -> list[torch.Tensor | None]:
        got = {p.layer: t for p, t in self.views() if p.kind == kind}
        return [got.get(i) for i in range(self.header.layout["num_layers"])]

    @classmethod
    def from_tensors(
        cls,
        header: KVHeader,
        attn: list[torch.Tensor],
        index_k: list[torch.Tensor | None],
        index_scale: list[torch.Tensor | None] | None = None,
    ) -> KVPayload:
        """Pack per-layer row tensors (the shapes `parts` gives) into one payload (tests)."""
        data = torch.zeros(header.nbytes, dtype=torch.uint8)
        src = {("attn", i): t for i, t in enumerate(attn)}
        src |= {("index_k", i): t for i, t in enumerate(index_k) if t is not None}
        src |= {("index_scale", i): t for i, t in enumerate(index_scale or []) if t is not None}
        for p in parts(header.layout, header.num_tokens):
            view(data, p).copy_(src[p.kind, p.layer])
        return cls(header, data)


def view(data: torch.Tensor, p: Part) -> torch.Tensor:
    return data[p.offset : p.offset + p.nbytes].view(p.dtype).view(p.shape)


def make_header(
    layout: KVLayout,
    token_ids: list[int],
    first_token: int,
    generator: torch.Generator | None = None,
) -> KVHeader:
    rng = bytes(generator.get_state().numpy()) if generator is not None else None
    return KVHeader(
        version=PAYLOAD_VERSION,
        plan_id=layout.plan_id,
        layout=layout.to_dict(),
        prompt_token_ids=list(token_ids),
        first_token=int(first_token),
        num_tokens=len(token_ids),
        rng_state=rng,
        rng_device=generator.device.type if generator is not None else "cpu",
    )


def restore_rng(header: KVHeader, generator: torch.Generator | None) -> None:
    """Continue the prefill side's sampler state (same device type only: CPU and CUDA
    generators are different algorithms)."""
    if header.rng_state is None or generator is None:
        return
    if header.rng_device != generator.device.type:
        return
    generator.set_state(torch.frombuffer(bytearray(header.rng_state), dtype=torch.uint8))


def check_header(header: KVHeader, layout: KVLayout) -> None:
    """Raise ValueError naming the first field where `header` does not fit `layout`."""
    if not isinstance(header, KVHeader):
        raise ValueError(f"header must be a KVHeader, got {type(header).__name__}")
    if header.version != PAYLOAD_VERSION:
        raise ValueError(
            f"payload version {header.version} is not supported (this engine reads "
            f"version {PAYLOAD_VERSION})"
        )
    if header.plan_id != layout.plan_id:
        raise ValueError(
            f"payload plan_id {header.plan_id!r} does not match this engine's "
            f"IndexCache plan_id {layout.plan_id!r}: prefill and decode replicas "
            "must run the same plan"
        )
    mine = layout.to_dict()
    for key in sorted(set(mine) | set(header.layout)):
        if header.layout.get(key) != mine.get(key):
            raise ValueError(
                f"payload layout field {key!r} is {header.layout.get(key)!r}, this "
                f"engine's is {mine.get(key)!r}"
            )
    n = header.num_tokens
    if n < 1 or n != len(header.prompt_token_ids):
        raise ValueError(
            f"payload num_tokens {n} does not match its "
            f"{len(header.prompt_token_ids)} prompt tokens"
        )


def check_payload(payload: KVPayload, header: KVHeader) -> None:
    """Raise ValueError unless `payload` is the rows `header` (already checked) announced."""
    if not isinstance(payload, KVPayload):
        raise ValueError(f"payload must be a KVPayload, got {type(payload).__name__}")
    got, want = payload.header, header
    for name in ("version", "plan_id", "num_tokens", "first_token", "layout", "prompt_token_ids"):
        if getattr(got, name) != getattr(want, name):
            raise ValueError(f"payload {name} differs from the header it was reserved for")
    d = payload.data
    if d.dtype != torch.uint8 or d.dim() != 1 or d.numel() != want.nbytes:
        raise ValueError(
            f"payload data must be uint8 [{want.nbytes}], got {d.dtype} {list(d.shape)}"
        )
