"""Where each model parameter comes from in a safetensors checkpoint: the tensor headers of
every shard (read without loading data) and the source records the loader plans with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open


@dataclass(frozen=True)
class Source:
    key: str  # checkpoint tensor
    file: Path
    shape: tuple[int, ...]
    dtype: str
    target: str  # model parameter it fills
    index: tuple = ()  # where inside the target (expert stacking), () = whole tensor
    # the part of the checkpoint tensor this rank reads (one slice per dim), () = all of it;
    # `shape` is then the part's shape
    slices: tuple = ()


def shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    return files


def headers_of(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    out = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint shard {f.name} is missing from {f.parent}")
        with safe_open(f, "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                out[k] = (f, tuple(sl.get_shape()), sl.get_dtype())
    return out
