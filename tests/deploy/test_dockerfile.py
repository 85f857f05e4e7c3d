"""deploy/Dockerfile, checked without Docker (CI has no engine): what these tests do NOT check is
that the image builds, that the base tag exists, or that the installed stack runs on a GPU.
They check the structure (pinned CUDA base that matches the torch pin, non-root user, every
package copied, nothing machine-specific) and run the one step that needs no Docker: the
requirements -> constraints pipeline, on the real requirements.txt."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib

import pytest

from tests.deploy.k8s import REPO

DOCKERFILE = REPO / "deploy" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            op, _, args = buf.partition(" ")
            out.append((op.upper(), args.strip()))
            buf = ""
    return out


def args_of(op: str) -> list[str]:
    return [a for o, a in instructions() if o == op]


def build_args() -> dict[str, str]:
    return dict(a.split("=", 1) for a in args_of("ARG") if "=" in a)


def torch_pin() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==")[1] for d in deps if d.startswith("torch=="))


def test_base_is_a_pinned_cuda_pytorch_image_matching_the_torch_pin():
    ops = instructions()
    assert ops[0][0] == "ARG" and ops[0][1].startswith("BASE_IMAGE=")
    assert args_of("FROM") == ["${BASE_IMAGE}"]
    image = build_args()["BASE_IMAGE"]
    repo, _, tag = image.partition(":")
    assert repo == "pytorch/pytorch" and "cuda" in tag and "runtime" in tag
    assert tag.split("-")[0] == torch_pin(), "bump the base image with the torch pin"


def test_runs_as_a_non_root_user_it_creates():
    users = args_of("USER")
    assert users, "no USER: the container would run as root"
    uid = users[-1].split(":")[0]
    uid = build_args().get(uid.strip("${}"), uid)
    assert uid not in ("0", "root")
    assert any("useradd" in a and "--uid ${UID}" in a for a in args_of("RUN"))
    assert build_args()["UID"] == uid


def test_copies_every_package_and_the_files_pip_install_needs():
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    copied = {src for a in args_of("COPY") for src in shlex.split(a)[:-1]}
    assert packages <= copied, f"not copied into the image: {packages - copied}"
    assert {"pyproject.toml", "README.md", "requirements.txt"} <= copied
    for src in copied:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert "**" in ignore  # everything else stays out of the build context
    for src in copied:
        assert f"!{src}" in ignore or f"!{src}/" in ignore, f".dockerignore drops {src}"


def test_pip_install_keeps_the_base_torch():
    runs = " ".join(args_of("RUN"))
    assert "pip install --constraint /tmp/constraints.txt ." in runs
    assert not re.search(r"pip install[^&]*\btorch\b", runs)
    assert "torch.version.cuda" in runs  # the build fails on a CPU-only or mismatched torch


def test_constraints_pipeline_on_the_real_requirements():
    """Run the Dockerfile's own grep|sed on requirements.txt: torch and triton dropped, extras
    stripped (pip refuses extras in constraints), every other pin kept."""
    run = next(a for a in args_of("RUN") if "/tmp/constraints.txt" in a and "grep" in a)
    pipeline = run[run.index("grep -vE") : run.index("> /tmp/constraints.txt")]
    out = subprocess.run(
        ["bash", "-c", pipeline], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    reqs = [
        r
        for r in (REPO / "requirements.txt").read_text().splitlines()
        if r and not r.startswith("#")
    ]
    names = {line.split("==")[0] for line in out if "==" in line}
    assert "torch" not in names and "triton" not in names
    assert not any("[" in line for line in out)
    expected = {re.sub(r"\[.*\]", "", r.split("==")[0]) for r in reqs} - {"torch", "triton"}
    assert names == expected
    assert "ray==2.60.0" in out


@pytest.mark.parametrize(
    "pattern",
    [
        r"/work\b",
        r"/home/(?!indexcache)",
        r"\bADD\s+https?://",
        r":latest\b",
        r"/Users/",
        r"\.venv",
    ],
)
def test_nothing_machine_specific(pattern):
    assert not re.search(pattern, DOCKERFILE.read_text())


def test_exposes_the_ports_the_manifests_use():
    ports = {p for a in args_of("EXPOSE") for p in a.split()}
    assert {"8000", "8080", "6379", "8265", "10001"} <= ports


def test_torch_check_runs_and_rejects_a_cpu_torch(tmp_path):
    """The build's torch check is valid Python and refuses this CPU-only torch, naming the pin."""
    run = next(a for a in args_of("RUN") if "torch.version.cuda" in a)
    code = shlex.split(run)[2]  # python -c "<code>" && ...
    assert shlex.split(run)[:2] == ["python", "-c"]
    (tmp_path / "requirements.txt").write_text((REPO / "requirements.txt").read_text())
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    import torch

    if torch.version.cuda:  # a CUDA build of the pinned torch passes the check
        assert proc.returncode == (0 if torch.__version__.split("+")[0] == torch_pin() else 1)
    else:
        assert proc.returncode == 1
        assert f"need a CUDA build of {torch_pin()}" in proc.stderr
