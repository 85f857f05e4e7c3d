"""Read character vectors out of an R lazy-load database (`Rdata.rdb` / `Rdata.rdx`).

R packages store their data sets that way: the .rdx is a compressed serialized list whose
`variables` entry maps each object name to (offset, length) in the .rdb, and each .rdb entry is a
4-byte big-endian length followed by a zlib stream of one serialized object. Serialization is R's
XDR format (big-endian). This reads the subset the janeaustenr novels need (vectors, pairlists,
symbols, strings), so no R or extra package is required.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

_SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP = 1, 2, 9, 10
_INTSXP, _REALSXP, _STRSXP, _VECSXP = 13, 14, 16, 19
_REFSXP, _NILVALUE = 255, 254
# Pseudo-SEXPs that stand for well-known environments / markers; none carries data we read.
_SPECIAL = {242, 241, 253, 252, 251, 247}
_LATIN1 = 1 << 2  # CHARSXP "levels" bit (flags >> 12)


class _Reader:
    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization (expected 'X\\n' header)")
        self.b, self.i, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # R version that wrote it, minimal reader version
        if version == 3:
            n = self.int()  # length of the native encoding name, which we skip
            self.i += n
        elif version != 2:
            raise ValueError(f"R serialization version {version} is not supported")

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & 0x200, flags & 0x400
        if kind == _NILVALUE or kind in _SPECIAL:
            return None
        if kind == _REFSXP:
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if kind == _SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _LISTSXP:  # pairlist: attributes, tag, car, then cdr (iteratively)
            out = {}
            while kind == _LISTSXP:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else len(out)
                out[tag] = self.item()
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, flags & 0x200, flags & 0x400
            if kind != _NILVALUE:
                raise ValueError(f"unsupported pairlist terminator type {kind}")
            return out
        if kind == _CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            enc = "latin-1" if (flags >> 12) & _LATIN1 else "utf-8"
            s = self.b[self.i : self.i + n].decode(enc, errors="replace")
            self.i += n
            return s
        if kind in (_STRSXP, _VECSXP):
            n = self.int()
            value = [self.item() for _ in range(n)]
        elif kind in (_LGLSXP, _INTSXP):
            n = self.int()
            value = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
        elif kind == _REALSXP:
            n = self.int()
            value = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        else:
            raise ValueError(f"R object type {kind} is not supported by this reader")
        if has_attr:
            attrs = self.item()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if names is not None and kind == _VECSXP:
                return dict(zip(names, value, strict=True))
        return value


def unserialize(data: bytes):
    return _Reader(data).item()


def read_lazyload(base: str | Path) -> dict[str, object]:
    """All objects of the lazy-load DB at `base` (path without .rdb/.rdx), by name."""
    base = Path(base)
    rdx = base.with_suffix(".rdx").read_bytes()
    # The index is written by saveRDS (gzip) or, in older packages, like an .rdb entry.
    raw = gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:])
    index = unserialize(raw)
    rdb = base.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[offset : offset + length]
        out[name] = unserialize(zlib.decompress(blob[4:]))
    return out
