"""On the GPU machine: do its own packages meet what the carried wheels need?

    python3 -m benchmarks.stack.device_env .stack/calls/call-1

The manifest lists every need of a carried wheel on a package the machine has but whose version
was not known when the plan was made. Each is checked against the installed version; a miss is
printed with the fix (re-plan with `--carry NAME`, so the package travels too). The pins of
requirements.txt that the machine's own packages stand in for (numpy, tokenizers, ...) are shown
for the record: the machine's versions are used (torch there is built against them).
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from benchmarks.stack.parts import load_manifest


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def misses(checks: list[dict], version_of=installed) -> list[str]:
    out = []
    for c in checks:
        req = Requirement(c["requirement"])
        have = version_of(req.name)
        if have is None:
            out.append(f"{req.name} is missing (needed by {c['required_by']}: {req})")
        elif not req.specifier.contains(Version(have), prereleases=True):
            out.append(f"{req.name} {have} does not meet {req} (needed by {c['required_by']})")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python3 -m benchmarks.stack.device_env CALL_FOLDER", file=sys.stderr)
        return 2
    manifest = load_manifest(Path(argv[0]))
    pins = ", ".join(f"{p} (here {installed(Requirement(p).name)})" for p in manifest["image_pins"])
    print(f"device_env: the machine's own packages stand in for {pins}")
    bad = misses(manifest["device_checks"])
    if bad:
        names = sorted({b.split()[0] for b in bad})
        print("device_env: FAILED:\n  " + "\n  ".join(bad), file=sys.stderr)
        print(
            "device_env: re-plan with "
            + " ".join(f"--carry {n}" for n in names)
            + " (python -m benchmarks.stack.wheels --relock ...) and stage again",
            file=sys.stderr,
        )
        return 1
    print(f"device_env: all {len(manifest['device_checks'])} needs on the machine's packages met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
