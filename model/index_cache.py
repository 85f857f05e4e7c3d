"""IndexCache layer plans: which layers run their own indexer (F, "full") and which reuse the top-k
of the nearest preceding F layer (S, "shared"). Paper section 3; transformers' GlmMoeDsaConfig.

Resolution order, as transformers: `indexer_types` > `index_topk_pattern` > `index_topk_freq` with
`index_skip_topk_offset` (default 2): layer i is F iff max(i - offset + 1, 0) % freq == 0.
Layer 0 must be F: it seeds the indices every S layer reuses.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

DEFAULT_OFFSET = 2


@dataclass(frozen=True, slots=True)
class IndexCacheConfig:
    pattern: str  # one letter per layer, "F" or "S"
    source: str = (
        "pattern"  # how it was made: all-full | freq | pattern | indexer_types | calibration
    )

    def __post_init__(self):
        validate_pattern(self.pattern)

    # -- constructors -----------------------------------------------------------------------
    @classmethod
    def all_full(cls, num_layers: int) -> IndexCacheConfig:
        return cls("F" * num_layers, "all-full")

    @classmethod
    def from_freq(
        cls, num_layers: int, freq: int, offset: int = DEFAULT_OFFSET
    ) -> IndexCacheConfig:
        if not isinstance(freq, int) or freq < 1:
            raise ValueError(f"index_topk_freq must be an integer >= 1, got {freq!r}")
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"index_skip_topk_offset must be an integer >= 0, got {offset!r}")
        pattern = "".join(
            "F" if max(i - offset + 1, 0) % freq == 0 else "S" for i in range(num_layers)
        )
        return cls(pattern, "all-full" if freq == 1 else "freq")

    @classmethod
    def from_pattern(
        cls, pattern: str, num_layers: int, source: str = "pattern"
    ) -> IndexCacheConfig:
        if not isinstance(pattern, str):
            raise ValueError(
                f"index_topk_pattern must be a string of F/S, got {type(pattern).__name__}"
            )
        if len(pattern) != num_layers:
            raise ValueError(
                f"index_topk_pattern has length {len(pattern)}, the model has {num_layers} layers"
            )
        return cls(pattern, source)

    @classmethod
    def from_indexer_types(cls, types: list[str], num_layers: int) -> IndexCacheConfig:
        letters = {"full": "F", "shared": "S"}
        bad = [t for t in types if t not in letters]
        if bad:
            raise ValueError(f"indexer_types entries must be 'full' or 'shared', got {bad[:3]}")
        if len(types) != num_layers:
            raise ValueError(
                f"indexer_types has length {len(types)}, the model has {num_layers} layers"
            )
        return cls("".join(letters[t] for t in types), "indexer_types")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], num_layers: int) -> IndexCacheConfig:
        """The plan a Hugging Face config.json describes (all F when it names none)."""
        if cfg.get("indexer_types") is not None:
            return cls.from_indexer_types(list(cfg["indexer_types"]), num_layers)
        if cfg.get("index_topk_pattern") is not None:
            return cls.from_pattern(cfg["index_topk_pattern"], num_layers)
        return cls.from_freq(
            num_layers,
            cfg.get("index_topk_freq", 1) or 1,
            cfg.get("index_skip_topk_offset", DEFAULT_OFFSET),
        )

    @classmethod
    def coerce(
        cls, value: IndexCacheConfig | str | None, num_layers: int, default: IndexCacheConfig
    ) -> IndexCacheConfig:
        """`load_model`'s `index_cache` argument: a config, an "FSSF..." string, or None."""
        if value is None:
            return default
        if isinstance(value, IndexCacheConfig):
            if value.num_layers != num_layers:
                raise ValueError(
                    f"index_cache plan has {value.num_layers} layers, the model has {num_layers}"
                )
            return value
        if isinstance(value, str):
            return cls.from_pattern(value, num_layers)
        raise ValueError(
            f"index_cache must be an IndexCacheConfig, a pattern string or None, "
            f"got {type(value).__name__}"
        )

    # -- queries ----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    def is_full(self, layer: int) -> bool:
        return self.pattern[layer] == "F"

    @property
    def full_layers(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.pattern) if c == "F")

    @property
    def shared_layers(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.pattern) if c == "S")

    def source_layer(self, layer: int) -> int:
        """The F layer whose indices `layer` uses (itself when F)."""
        return max(i for i in self.full_layers if i <= layer)

    @property
    def retention(self) -> float:
        return len(self.full_layers) / self.num_layers

    @property
    def plan_id(self) -> str:
        """Stable short id of the pattern: KV payloads carry it, mismatched replicas refuse them."""
        return hashlib.sha256(self.pattern.encode()).hexdigest()[:12]

    @property
    def indexer_types(self) -> list[str]:
        return ["full" if c == "F" else "shared" for c in self.pattern]

    def __str__(self) -> str:
        return f"{self.pattern} ({len(self.full_layers)}/{self.num_layers} F, {self.source})"


def validate_pattern(pattern: str) -> None:
    if not pattern:
        raise ValueError("IndexCache pattern is empty")
    bad = sorted(set(pattern) - {"F", "S"})
    if bad:
        raise ValueError(f"IndexCache pattern may only contain 'F' and 'S', found {bad}")
    if pattern[0] != "F":
        raise ValueError(
            "IndexCache pattern must start with 'F': layer 0 has no earlier F layer "
            "to share indices from"
        )
