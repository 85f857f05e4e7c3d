"""Which wheels the GPU machine needs, and whether a set of them is complete.

A wheel's needs are its METADATA's Requires-Dist lines whose markers hold on the GPU machine
(CPython 3.12, Linux x86-64), for no extra or for an extra some requirer asked for. Each need is
met inside the set (a wheel of that name whose version fits the specifier) or by a package the
GPU machine already has: checked here when its version is known (gpu_packages.txt), otherwise
listed as a check to run there (device_env.py) before anything is installed.
"""

from __future__ import annotations

import email.parser
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

# Marker environment of the GPU machine's python3 (KINDS.md: Python 3.12.3, x86-64 Linux).
GPU_ENV = {
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_release": "",
    "platform_system": "Linux",
    "platform_version": "",
    "python_full_version": "3.12.3",
    "python_version": "3.12",
    "sys_platform": "linux",
}
GPU_PACKAGES = Path(__file__).resolve().parent / "gpu_packages.txt"


@dataclass(frozen=True)
class Meta:
    name: str  # canonical
    version: str
    requires: tuple[str, ...]
    file: str = ""


def wheel_metadata(path: Path) -> Meta:
    """Name, version and Requires-Dist of a wheel, from its .dist-info/METADATA."""
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        if len(names) != 1:
            raise ValueError(f"{path.name}: expected one .dist-info/METADATA, found {names}")
        msg = email.parser.Parser().parsestr(z.read(names[0]).decode())
    return Meta(
        canonicalize_name(msg["Name"]),
        msg["Version"],
        tuple(msg.get_all("Requires-Dist") or ()),
        path.name,
    )


def read_gpu_packages(path: Path = GPU_PACKAGES) -> dict[str, str | None]:
    """name -> version (None: present, version not known here)."""
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        out[canonicalize_name(name)] = version.strip() or None
    return out


def active(requires: Iterable[str], extras: Iterable[str] = ()) -> list[Requirement]:
    """Requirements that hold on the GPU machine for no extra or any of `extras`."""
    out = []
    for line in requires:
        req = Requirement(line)
        if req.marker is None or any(
            req.marker.evaluate({**GPU_ENV, "extra": x}) for x in ("", *extras)
        ):
            out.append(req)
    return out


def fits(req: Requirement, version: str) -> bool:
    return req.specifier.contains(Version(version), prereleases=True)


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    device_checks: list[dict] = field(default_factory=list)  # needs on unknown-version packages
    extras: dict[str, set[str]] = field(default_factory=dict)  # extras asked of each wheel

    @property
    def ok(self) -> bool:
        return not self.problems


def check(
    wheels: list[Meta],
    roots: list[Requirement],
    gpu: dict[str, str | None],
    carried_anyway: Iterable[str] = (),
) -> Report:
    """Is `wheels` exactly one version of each needed package, every need met, nothing unneeded?
    `carried_anyway`: packages the GPU machine has that the set still carries on purpose."""
    rep = Report()
    by_name: dict[str, Meta] = {}
    for m in wheels:
        if m.name in by_name:
            rep.problems.append(
                f"two versions of {m.name}: {by_name[m.name].version} and {m.version} "
                "(pip install --no-deps would stop)"
            )
        by_name[m.name] = m
    forced = {canonicalize_name(n) for n in carried_anyway}
    for name in sorted(set(by_name) & set(gpu) - forced):
        rep.problems.append(f"{name} is on the GPU machine already: drop it or name it as forced")
    reached: set[str] = set()
    todo: list[tuple[Requirement, str]] = [(r, "the stack") for r in roots]
    while todo:
        req, by = todo.pop()
        name = canonicalize_name(req.name)
        if name in by_name:
            m = by_name[name]
            if not fits(req, m.version):
                rep.problems.append(f"{by} needs {req}, the set has {name} {m.version}")
            new = set(req.extras) - rep.extras.setdefault(name, set())
            if name in reached and not new:
                continue
            rep.extras[name] |= new
            reached.add(name)
            who = f"{name} {m.version}"
            todo += [(r, who) for r in active(m.requires, rep.extras[name])]
        elif name in gpu:
            known = gpu[name]
            if known is None:
                rep.device_checks.append({"requirement": str(req), "required_by": by})
            elif not fits(req, known):
                rep.problems.append(
                    f"{by} needs {req}; the GPU machine has {name} {known}: carry {name}"
                )
        else:
            rep.problems.append(f"{by} needs {req}: neither in the set nor on the GPU machine")
    for name in sorted(set(by_name) - reached):
        rep.problems.append(f"{name} {by_name[name].version} is in the set but nothing needs it")
    rep.device_checks.sort(key=lambda c: (c["requirement"], c["required_by"]))
    return rep


def resolve(
    roots: list[Requirement],
    gpu: dict[str, str | None],
    choose: Callable[[Requirement], str],
    fetch: Callable[[str, str], Path],
    carry_anyway: Iterable[str] = (),
) -> list[Meta]:
    """Walk the needs from `roots`, fetching a wheel for each package the GPU machine lacks (or
    that `carry_anyway` names). `choose(req)` picks the version; `fetch(name, version)` returns
    the wheel's path. The result still goes through `check`."""
    forced = {canonicalize_name(n) for n in carry_anyway}
    got: dict[str, Meta] = {}
    extras: dict[str, set[str]] = {}
    todo = list(roots)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in gpu and name not in forced:
            continue
        if name not in got:
            version = choose(req)
            path = fetch(name, version)
            meta = wheel_metadata(path)
            if meta.name != name or meta.version != version:
                raise ValueError(f"asked for {name} {version}, got {path.name}")
            got[name] = meta
            extras[name] = set(req.extras)
            todo += active(meta.requires, extras[name])
        elif set(req.extras) - extras[name]:
            extras[name] |= set(req.extras)
            todo += active(got[name].requires, extras[name])
    return sorted(got.values(), key=lambda m: m.name)


def wheel_key(filename: str) -> tuple[str, str]:
    name, version, _, _ = parse_wheel_filename(filename)
    return str(name), str(version)
