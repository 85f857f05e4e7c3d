"""Wheels in device calls: cut files into parts that fit one call's carry, stage each call's parts
outside the checkout on the GPU machine, reassemble and hash-check them in the last call.

Standard library only: it runs on the GPU machine before anything is installed.

    python3 -m benchmarks.stack.parts stage --src .stack/call-2 --dest /tmp/stack-parts
    python3 -m benchmarks.stack.parts assemble --parts /tmp/stack-parts --out /tmp/stack-wheels

The manifest (manifest.json, a copy in every call folder) lists each file with its size and
sha256 and its parts (offset, size, sha256, call); `plan_id` is the hash of the file list, so
parts of two different plans are never mixed in one staging folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
CHUNK = 1 << 20


def sha256_file(path: Path, offset: int = 0, size: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = size
        while left is None or left > 0:
            block = f.read(CHUNK if left is None else min(CHUNK, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    return h.hexdigest()


@dataclass
class Part:
    name: str  # file name in the call folder (the file's own name when it travels whole)
    offset: int
    size: int
    call: int  # 1-based device call that carries it
    sha256: str = ""


@dataclass
class FileEntry:
    name: str
    size: int
    sha256: str
    parts: list[Part] = field(default_factory=list)
    origin_sha256: str = ""  # the registry file's hash when this one was rewritten (slimmed)


# -- planning ------------------------------------------------------------------------------------
def _ffd(items: list[tuple[str, int, int, int]], budget: int) -> list[list[tuple]]:
    """First-fit decreasing over (file, part index, offset, size) items."""
    bins: list[list[tuple]] = []
    room: list[int] = []
    for item in sorted(items, key=lambda it: -it[3]):
        for i, r in enumerate(room):
            if item[3] <= r:
                bins[i].append(item)
                room[i] -= item[3]
                break
        else:
            bins.append([item])
            room.append(budget - item[3])
    return bins


def _stream(sizes: dict[str, int], budget: int) -> list[list[tuple]]:
    """Files end to end, cut at every `budget` bytes: the fewest calls, more files cut."""
    bins: list[list[tuple]] = [[]]
    room = budget
    for name in sorted(sizes, key=lambda n: -sizes[n]):
        offset, index = 0, 0
        while offset < sizes[name]:
            if room == 0:
                bins.append([])
                room = budget
            n = min(room, sizes[name] - offset)
            bins[-1].append((name, index, offset, n))
            offset, index, room = offset + n, index + 1, room - n
    return bins


def plan_calls(sizes: dict[str, int], budget: int) -> list[list[tuple]]:
    """Calls (lists of (file, part index, offset, size)), each at most `budget` bytes. Files over
    the budget are cut into budget-sized parts; first-fit decreasing packs the rest, unless
    cutting more files saves a call."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1 byte, got {budget}")
    if not sizes:
        return []
    items = []
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(f"{name} is empty")
        n = math.ceil(size / budget)
        items += [(name, i, i * budget, min(budget, size - i * budget)) for i in range(n)]
    bins = _ffd(items, budget)
    fewest = math.ceil(sum(sizes.values()) / budget)
    if len(bins) > fewest:
        bins = _stream(sizes, budget)
    return bins


def build_manifest(folder: Path, budget: int, extra: dict | None = None) -> dict:
    """Plan the files in `folder` into calls; returns the manifest (no file written)."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    sizes = {p.name: p.stat().st_size for p in files}
    bins = plan_calls(sizes, budget)
    entries = {p.name: FileEntry(p.name, sizes[p.name], sha256_file(p)) for p in files}
    counts: dict[str, int] = {}
    for bin_ in bins:
        for name, *_ in bin_:
            counts[name] = counts.get(name, 0) + 1
    calls = []
    for call, bin_ in enumerate(bins, 1):
        for name, index, offset, size in bin_:
            pname = name if counts[name] == 1 else f"{name}.part{index + 1}of{counts[name]}"
            part = Part(pname, offset, size, call, sha256_file(folder / name, offset, size))
            entries[name].parts.append(part)
        calls.append({"call": call, "bytes": sum(it[3] for it in bin_)})
    for e in entries.values():
        e.parts.sort(key=lambda p: p.offset)
    listing = [asdict(e) for e in entries.values()]
    plan_id = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "format": 1,
        "plan_id": plan_id,
        "budget_bytes": budget,
        "total_bytes": sum(sizes.values()),
        "calls": calls,
        "files": listing,
        **(extra or {}),
    }


def write_calls(folder: Path, manifest: dict, dest: Path) -> list[Path]:
    """Cut `folder`'s files into dest/call-N/ folders as the manifest says (plus its copy)."""
    if dest.exists():
        shutil.rmtree(dest)
    dirs = []
    for c in manifest["calls"]:
        d = dest / f"call-{c['call']}"
        d.mkdir(parents=True)
        (d / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        dirs.append(d)
    for f in manifest["files"]:
        for p in f["parts"]:
            out = dest / f"call-{p['call']}" / p["name"]
            with open(folder / f["name"], "rb") as src, open(out, "wb") as dst:
                src.seek(p["offset"])
                _copy_n(src, dst, p["size"])
    return dirs


def _copy_n(src, dst, n: int) -> None:
    while n > 0:
        block = src.read(min(CHUNK, n))
        if not block:
            raise OSError("source file ended early")
        dst.write(block)
        n -= len(block)


# -- on the GPU machine ----------------------------------------------------------------------------
def load_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {folder}")
    return json.loads(path.read_text())


def stage(src: Path, dest: Path) -> list[str]:
    """Copy one call's parts (hash-checked) into `dest`, outside the checkout. A `dest` holding
    another plan's parts is emptied first. Returns the part names staged."""
    manifest = load_manifest(src)
    if dest.exists() and (dest / MANIFEST).is_file():
        if load_manifest(dest)["plan_id"] != manifest["plan_id"]:
            print(f"stage: {dest} holds parts of another plan; emptied", flush=True)
            shutil.rmtree(dest)
    dest.mkdir(parents=True, exist_ok=True)
    expected = {p["name"]: p for f in manifest["files"] for p in f["parts"]}
    staged = []
    for path in sorted(src.iterdir()):
        if path.name == MANIFEST:
            continue
        part = expected.get(path.name)
        if part is None:
            raise ValueError(f"{path.name} in {src} is not in the manifest")
        if path.stat().st_size != part["size"] or sha256_file(path) != part["sha256"]:
            raise ValueError(f"{path.name}: size or sha256 differs from the manifest")
        tmp = dest / (path.name + ".tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(dest / path.name)
        staged.append(path.name)
    shutil.copyfile(src / MANIFEST, dest / MANIFEST)
    return staged


def missing_calls(parts_dir: Path, manifest: dict) -> dict[int, list[str]]:
    """Calls whose parts are not (or not intact) in `parts_dir`: call -> part names."""
    out: dict[int, list[str]] = {}
    for f in manifest["files"]:
        for p in f["parts"]:
            path = parts_dir / p["name"]
            if not path.is_file() or path.stat().st_size != p["size"]:
                out.setdefault(p["call"], []).append(p["name"])
    return out


def assemble(parts_dir: Path, out_dir: Path) -> list[Path]:
    """Join every file's parts in order into `out_dir`, checking each part's and each whole file's
    sha256. Files already there with the right hash are kept. Raises naming the calls to redo."""
    manifest = load_manifest(parts_dir)
    missing = missing_calls(parts_dir, manifest)
    if missing:
        calls = ", ".join(str(c) for c in sorted(missing))
        n = sum(len(v) for v in missing.values())
        raise FileNotFoundError(
            f"{n} part(s) missing from {parts_dir}: run the staging call(s) {calls} again "
            "(the GPU machine went back between calls, or a call was skipped)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for f in manifest["files"]:
        out = out_dir / f["name"]
        if out.is_file() and out.stat().st_size == f["size"] and sha256_file(out) == f["sha256"]:
            done.append(out)
            continue
        tmp = out_dir / (f["name"] + ".tmp")
        whole = hashlib.sha256()
        with open(tmp, "wb") as dst:
            for p in f["parts"]:
                h = hashlib.sha256()
                with open(parts_dir / p["name"], "rb") as src:
                    while block := src.read(CHUNK):
                        h.update(block)
                        whole.update(block)
                        dst.write(block)
                if h.hexdigest() != p["sha256"]:
                    tmp.unlink()
                    raise ValueError(f"part {p['name']} (call {p['call']}): sha256 mismatch")
        if whole.hexdigest() != f["sha256"]:
            tmp.unlink()
            raise ValueError(f"{f['name']}: sha256 of the joined parts differs from the manifest")
        tmp.replace(out)
        done.append(out)
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stage", help="copy one call's parts outside the checkout")
    s.add_argument("--src", type=Path, required=True)
    s.add_argument("--dest", type=Path, required=True)
    a = sub.add_parser("assemble", help="join and hash-check every file")
    a.add_argument("--parts", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "stage":
            staged = stage(args.src, args.dest)
            manifest = load_manifest(args.dest)
            print(f"stage: {len(staged)} part(s) from {args.src} now in {args.dest}")
            left = missing_calls(args.dest, manifest)
            todo = ", ".join(map(str, sorted(left)))
            print(
                f"stage: still to stage: call(s) {todo}"
                if left
                else f"stage: all {len(manifest['calls'])} call(s) staged ({manifest['plan_id']})"
            )
        else:
            files = assemble(args.parts, args.out)
            print(f"assemble: {len(files)} file(s) in {args.out}, every sha256 checked")
    except (OSError, ValueError) as e:
        print(f"{args.cmd}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
