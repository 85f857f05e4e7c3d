"""Drop files the serving stack never opens from a wheel, so fewer bytes travel to the GPU machine.

Ray's wheel carries its Java worker (ray/jars/ray_dist.jar, 32 MB compressed: Ray starts Java
workers only when the jars are there and `java` is on the PATH, services.py) and the dashboard's
source map (a browser debugging aid; the stack runs without the dashboard). Removing both takes
the wheel from 79 to 46 MB and saves a device call. The members' RECORD lines go too, so pip
installs the result as any wheel; the original's sha256 stays in the manifest.
"""

from __future__ import annotations

import fnmatch
import zipfile
from pathlib import Path

# canonical package name -> member patterns (fnmatch: * also matches '/')
RULES: dict[str, tuple[str, ...]] = {
    "ray": ("ray/jars/*", "ray/dashboard/client/build/*.map"),
}


def slim_wheel(src: Path, dst: Path, patterns: tuple[str, ...]) -> list[str]:
    """Write `src` without the members matching `patterns` to `dst`; returns the dropped names."""
    dropped: list[str] = []
    with zipfile.ZipFile(src) as zin:
        infos = zin.infolist()
        drop = {i.filename for i in infos if any(fnmatch.fnmatch(i.filename, p) for p in patterns)}
        records = [
            i.filename
            for i in infos
            if i.filename.count("/") == 1 and i.filename.endswith(".dist-info/RECORD")
        ]
        if len(records) != 1:
            raise ValueError(f"{src.name}: expected one .dist-info/RECORD, found {records}")
        with zipfile.ZipFile(dst, "w") as zout:
            for info in infos:
                if info.filename in drop:
                    dropped.append(info.filename)
                    continue
                data = zin.read(info)
                if info.filename == records[0]:
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(ln for ln in lines if ln.split(",", 1)[0] not in drop).encode()
                zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    return dropped
