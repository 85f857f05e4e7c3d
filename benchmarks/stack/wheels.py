"""The wheels the serving stack needs on the GPU machine, cut into device calls.

    python -m benchmarks.stack.wheels            # from wheels.lock: download, check, plan
    python -m benchmarks.stack.wheels --relock   # re-resolve from requirements.txt first

Roots: the runtime pins of pyproject.toml (ray[serve], fastapi, pydantic, llguidance, ...), the
`loadtest` extra (locust) and the clients the runs use (openai, httpx); torch, triton and the
nvidia-* wheels are the machine's own. Every package the GPU machine lacks travels as a
cp312 manylinux x86-64 wheel (`pip download --no-deps --only-binary=:all:`); versions come from
wheels.lock, which --relock rebuilds from requirements.txt's pins and, for packages it does not
pin, the versions installed where this runs (the CI-tested set). Then:
- one version of each, and every Requires-Dist (markers for CPython 3.12 on Linux, extras asked
  for) met inside the set or by the machine's packages (gpu_packages.txt; needs on packages whose
  version is not known here become checks that device_env.py runs there);
- Ray's wheel loses its Java jar and a source map (slim.py);
- the call budget is 64 MiB minus the working tree that travels with every call; files over it
  are cut into parts; the calls' folders are written under .stack/ (git-ignored) and the device
  calls (carry + command) are printed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from benchmarks.stack import closure, parts, slim

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LOCK = HERE / "wheels.lock"
MIB = 1 << 20
TREE_LIMIT = 64 * MIB  # what travels in one call: working tree + carried paths
CALL_CAP = 60 * MIB
RESERVE = 2 * MIB  # the tree may grow a little between planning and the calls
EXCLUDED = ("torch", "triton")  # and nvidia-*: the machine's own CUDA stack
EXTRA_ROOTS = ("openai", "httpx")  # clients the stack runs use (smoke request, loadtest)
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def requirement_pins(path: Path = ROOT / "requirements.txt") -> dict[str, Requirement]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            out[canonicalize_name(req.name)] = req
    return out


def stack_roots(pins: dict[str, Requirement]) -> list[Requirement]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = meta["dependencies"] + meta["optional-dependencies"]["loadtest"]
    roots = [Requirement(x) for x in lines]
    roots += [pins[canonicalize_name(n)] for n in EXTRA_ROOTS]
    return [
        r
        for r in roots
        if canonicalize_name(r.name) not in EXCLUDED
        and not canonicalize_name(r.name).startswith("nvidia-")
    ]


def _pinned(req: Requirement) -> str | None:
    specs = list(req.specifier)
    return specs[0].version if len(specs) == 1 and specs[0].operator == "==" else None


def read_lock(path: Path = LOCK) -> dict[str, tuple[str, str]]:
    """name -> (version, sha256 of the registry's wheel)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            spec, _, h = line.partition(" --hash=sha256:")
            name, _, version = spec.partition("==")
            out[canonicalize_name(name)] = (version, h.strip())
    return out


def write_lock(files: dict[str, Path], path: Path = LOCK) -> None:
    lines = [
        "# Wheels the serving stack carries to the GPU machine (python -m benchmarks.stack.wheels"
        " --relock writes this).",
        "# Registry sha256 of the cp312 manylinux x86-64 wheel; pip requirements format.",
    ]
    for name in sorted(files):
        _, version = closure.wheel_key(files[name].name)
        lines.append(f"{name}=={version} --hash=sha256:{parts.sha256_file(files[name])}")
    path.write_text("\n".join(lines) + "\n")


def chooser(pins: dict[str, Requirement], lock: dict[str, tuple[str, str]] | None):
    def choose(req: Requirement) -> str:
        name = canonicalize_name(req.name)
        if lock is not None:
            if name not in lock:
                raise ValueError(f"{req} is needed but not in {LOCK.name}: run with --relock")
            return lock[name][0]
        for version in (_pinned(pins[name]) if name in pins else None, _installed(name)):
            if version and closure.fits(req, version):
                return version
        raise ValueError(f"no version of {name} chosen for {req}: pin it in requirements.txt")

    return choose


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def pip_download(specs: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + specs, check=True)


def fetcher(dest: Path):
    def fetch(name: str, version: str) -> Path:
        for f in dest.glob("*.whl"):
            if closure.wheel_key(f.name) == (name, version):
                return f
        pip_download([f"{name}=={version}"], dest)
        return fetch_existing(dest, name, version)

    return fetch


def fetch_existing(dest: Path, name: str, version: str) -> Path:
    hits = [f for f in dest.glob("*.whl") if closure.wheel_key(f.name) == (name, version)]
    if len(hits) != 1:
        raise FileNotFoundError(f"expected one wheel of {name} {version} in {dest}, found {hits}")
    return hits[0]


def tree_bytes(root: Path = ROOT) -> int:
    """Tracked and untracked-not-ignored files: what every device call carries besides `carry`."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout
    files = {root / p for p in out.decode().split("\0") if p}
    return sum(f.stat().st_size for f in files if f.is_file() and not f.is_symlink())


def prepare(args) -> dict:
    work = args.dest
    download, final = work / "download", work / "final"
    download.mkdir(parents=True, exist_ok=True)
    pins = requirement_pins()
    gpu = closure.read_gpu_packages()
    forced = [canonicalize_name(n) for n in args.carry]
    all_roots = stack_roots(pins)
    carried_roots = [
        r
        for r in all_roots
        if canonicalize_name(r.name) not in gpu or canonicalize_name(r.name) in forced
    ]
    lock = None if args.relock else read_lock()
    if lock is not None:  # a package the lock carries although the machine has it stays carried
        forced += [n for n in lock if n in gpu and n not in forced]
    if lock is not None:
        missing = [f"{n}=={v}" for n, (v, _) in lock.items() if not _have(download, n, v)]
        if missing:
            pip_download(missing, download)
    metas = closure.resolve(
        carried_roots, gpu, chooser(pins, lock), fetcher(download), carry_anyway=forced
    )
    files = {m.name: download / m.file for m in metas}
    if lock is not None:
        for name, path in files.items():
            if parts.sha256_file(path) != lock[name][1]:
                raise ValueError(f"{path.name}: sha256 differs from {LOCK.name}")
    else:
        write_lock(files)
    if final.exists():
        shutil.rmtree(final)
    final.mkdir(parents=True)
    slimmed = {}
    for name, path in files.items():
        rules = slim.RULES.get(name) if not args.no_slim else None
        if rules:
            dropped = slim.slim_wheel(path, final / path.name, rules)
            slimmed[path.name] = {
                "origin_sha256": parts.sha256_file(path),
                "origin_bytes": path.stat().st_size,
                "dropped": dropped,
            }
        else:
            shutil.copyfile(path, final / path.name)
    finals = [closure.wheel_metadata(p) for p in sorted(final.glob("*.whl"))]
    rep = closure.check(finals, carried_roots, gpu, carried_anyway=forced)
    if not rep.ok:
        raise SystemExit("the wheel set is not complete:\n  " + "\n  ".join(rep.problems))
    image_roots = [str(r) for r in all_roots if r not in carried_roots]
    tree = tree_bytes()
    budget = (
        args.budget_mib * MIB if args.budget_mib else min(CALL_CAP, TREE_LIMIT - tree - RESERVE)
    )
    extra = {
        "tree_bytes_at_planning": tree,
        "device_checks": rep.device_checks,
        "image_pins": image_roots,
        "slimmed": slimmed,
    }
    manifest = parts.build_manifest(final, budget, extra)
    parts.write_calls(final, manifest, work / "calls")
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _have(dest: Path, name: str, version: str) -> bool:
    return any(closure.wheel_key(f.name) == (name, version) for f in dest.glob("*.whl"))


def print_plan(manifest: dict, dest: Path) -> None:
    rel = dest.resolve().relative_to(ROOT) if dest.resolve().is_relative_to(ROOT) else dest
    files = sorted(manifest["files"], key=lambda f: -f["size"])
    print(f"{len(files)} wheels, {manifest['total_bytes'] / MIB:.1f} MiB in all:")
    for f in files:
        cut = f" in {len(f['parts'])} parts" if len(f["parts"]) > 1 else ""
        slimmed = " (slimmed)" if f["name"] in manifest["slimmed"] else ""
        print(f"  {f['size'] / MIB:7.2f} MiB  {f['name']}{slimmed}{cut}")
    print(
        f"working tree {manifest['tree_bytes_at_planning'] / MIB:.1f} MiB travels with each call; "
        f"budget per call {manifest['budget_bytes'] / MIB:.1f} MiB"
    )
    print(f"needs the GPU machine must meet (checked there): {len(manifest['device_checks'])}")
    n = len(manifest["calls"])
    print(f"\n{n} staging call(s) + 1 = {n + 1} device calls (plan {manifest['plan_id']}):")
    for c in manifest["calls"]:
        steps = " ".join(call_steps(c["call"], n))
        print(
            f'  call {c["call"]}: carry ["{rel}/calls/call-{c["call"]}"] ({c["bytes"] / MIB:.1f} '
            f"MiB): bash benchmarks/stack/stage_part.sh {rel}/calls/call-{c['call']} && "
            f"bash benchmarks/stack/run_stack.sh {steps}"
        )
    print(
        f"  call {len(manifest['calls']) + 1}: no carry: "
        f"bash benchmarks/stack/run_stack.sh {' '.join(call_steps(0, len(manifest['calls'])))}"
    )


def call_steps(call: int, staging_calls: int) -> list[str]:
    """run_stack.sh steps of a call: the checkpoint is written while the first parts arrive, the
    last staging call installs and runs all-F, one more call runs the 1/4 plan. `call` 0: that
    one more call."""
    if call == 0:
        return ["load", "quarter", "compare"]
    steps = ["model"] if call == 1 else []
    if call == staging_calls:
        steps += ["install", "load", "all-F"]
    return steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=ROOT / ".stack", help="work folder (ignored)")
    ap.add_argument("--relock", action="store_true", help="re-resolve and rewrite wheels.lock")
    ap.add_argument("--budget-mib", type=float, default=None, help="bytes per call (default: fit)")
    ap.add_argument(
        "--carry",
        action="append",
        default=[],
        help="carry this package although the machine has it",
    )
    ap.add_argument("--no-slim", action="store_true", help="keep Ray's jar and source map")
    args = ap.parse_args(argv)
    manifest = prepare(args)
    print_plan(manifest, args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
