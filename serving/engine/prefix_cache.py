"""Prefix cache: full KV pages named by a hash chain, so a later request with the same prefix
reuses them instead of recomputing.

A page's hash covers its `page_size` token ids and its parent page's hash, so equal hashes mean
equal whole prefixes. The chain starts at a root that names the model (a fingerprint of its
config and weights) and the KV layout, plan id included: a page holds every layer's attention
rows *and* the indexer keys (+ FP8 scales) of exactly the F layers of its plan, so a page written
under one plan or model must never be read under another; with the root in every hash it cannot
even be found. Only full, computed pages are registered (a partial page is still being written).

The index maps hash -> page. A cached page that no sequence references sits in an LRU; the block
manager takes pages from its free list first and only then evicts the least recently freed
cached page (the index forgets its hash). Reference counts live in the block manager.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections import OrderedDict

import torch

from model.kv_cache import KVLayout

ROOT_VERSION = 1  # bump when what a page holds changes meaning


def model_fingerprint(model: torch.nn.Module, config: object, samples: int = 64) -> str:
    """A short id of a model's identity: its config and a sample of every parameter tensor's
    leading values (different checkpoints of one architecture differ there). Runs once per
    engine; a few small device-to-host copies."""
    h = hashlib.sha256(repr(config).encode())
    params = sorted(model.state_dict().items())
    step = max(1, len(params) // samples)
    for name, t in params[::step]:
        h.update(name.encode())
        h.update(t.detach().reshape(-1)[:4].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def root_hash(model_id: str, layout: KVLayout) -> bytes:
    """The chain's start: the model's identity and the cache layout (plan id, F layers, dtypes,
    page size)."""
    blob = json.dumps(
        {"v": ROOT_VERSION, "model": model_id, "layout": layout.to_dict()}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).digest()


def page_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


def extend_hashes(
    hashes: list[bytes], token_ids: list[int], page_size: int, root: bytes, num_pages: int
) -> list[bytes]:
    """Grow `hashes` (the chain of the first len(hashes) full pages of `token_ids`) to
    `num_pages` pages, or as many full pages as there are; returns it."""
    num_pages = min(num_pages, len(token_ids) // page_size)
    for i in range(len(hashes), num_pages):
        parent = hashes[-1] if hashes else root
        hashes.append(page_hash(parent, token_ids[i * page_size : (i + 1) * page_size]))
    return hashes


class PrefixIndex:
    """hash <-> page for registered pages, and the LRU of registered pages nobody references."""

    def __init__(self):
        self.page_of: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.num_evictions = 0

    def __len__(self) -> int:
        return len(self.page_of)

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """Pages of the longest registered prefix of `hashes`."""
        pages = []
        for h in hashes:
            p = self.page_of.get(h)
            if p is None:
                break
            pages.append(p)
        return pages

    def register(self, h: bytes, page: int) -> bool:
        """Name `page` by `h`; False when `h` is already cached (the page then stays private)."""
        if h in self.page_of or page in self.hash_of:
            return False
        self.page_of[h], self.hash_of[page] = page, h
        return True

    def is_cached(self, page: int) -> bool:
        return page in self.hash_of

    def park(self, page: int) -> None:
        """A registered page lost its last reference: evictable, most recent last."""
        self.lru[page] = None

    def unpark(self, page: int) -> None:
        """A parked page is referenced again (a prefix hit)."""
        del self.lru[page]

    def evict(self) -> int:
        """Forget the least recently parked page and hand it out."""
        page, _ = self.lru.popitem(last=False)
        del self.page_of[self.hash_of.pop(page)]
        self.num_evictions += 1
        return page
