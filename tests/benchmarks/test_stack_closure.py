"""Which wheels the GPU machine needs (benchmarks/stack/closure.py, slim.py, device_env.py,
wheels.py): checked on small synthetic wheels, no network."""

from __future__ import annotations

import zipfile

import pytest
from packaging.requirements import Requirement

from benchmarks.stack import closure, device_env, slim, wheels


def make_wheel(folder, name, version, requires=(), extra_files=None):
    """A minimal wheel: METADATA with Requires-Dist lines, a RECORD, optional payload files."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    files = {f"{name.replace('-', '_')}/__init__.py": b"", **(extra_files or {})}
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    record = "".join(f"{f},,\n" for f in files) + f"{dist}.dist-info/METADATA,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for f, data in files.items():
            z.writestr(f, data)
        z.writestr(f"{dist}.dist-info/METADATA", meta)
        z.writestr(f"{dist}.dist-info/RECORD", record + f"{dist}.dist-info/RECORD,,\n")
    return path


@pytest.fixture
def index(tmp_path):
    """A little registry: a serve extra, a marker that is false on 3.12, a need on the machine."""
    d = tmp_path / "index"
    specs = [
        ("rayish", "2.0", ['fastapi-ish>=1; extra == "serve"', "numpy>=1.20", "click>=7"]),
        ("fastapi-ish", "1.5", ["starlette-ish<2,>=1", 'old-backport; python_version < "3.12"']),
        ("starlette-ish", "1.2", ["typing-extensions>=4.10"]),
        ("locust-ish", "2.0", ["gevent-ish>=20", "requests>=2.33"]),
        ("gevent-ish", "24.0", ['zope-ish; platform_system == "Windows"']),
    ]
    return {(n, v): make_wheel(d, n, v, reqs) for n, v, reqs in specs}


GPU = {"numpy": "2.5.2", "click": None, "typing-extensions": None, "requests": "2.32.0"}
ROOTS = [Requirement("rayish[serve]==2.0"), Requirement("locust-ish==2.0")]


def metas(index, *names):
    return [closure.wheel_metadata(p) for (n, _), p in index.items() if n in names]


def test_complete_set_passes_and_unknown_versions_become_device_checks(index):
    gpu = {**GPU, "requests": None}
    rep = closure.check(metas(index, *{n for n, _ in index}), ROOTS, gpu)
    assert rep.ok, rep.problems
    checks = {c["requirement"] for c in rep.device_checks}
    assert checks == {"click>=7", "typing-extensions>=4.10", "requests>=2.33"}
    assert rep.extras["rayish"] == {"serve"}


def test_known_gpu_version_too_old_says_carry_it(index):
    rep = closure.check(metas(index, *{n for n, _ in index}), ROOTS, GPU)
    assert rep.problems == [
        "locust-ish 2.0 needs requests>=2.33; the GPU machine has requests 2.32.0: carry requests"
    ]


def test_missing_wrong_duplicate_and_unneeded_wheels(index, tmp_path):
    gpu = {**GPU, "requests": None}
    all_ = metas(index, *{n for n, _ in index})
    no_starlette = [m for m in all_ if m.name != "starlette-ish"]
    rep = closure.check(no_starlette, ROOTS, gpu)
    assert any("needs starlette-ish<2,>=1: neither in the set" in p for p in rep.problems)
    wrong = make_wheel(tmp_path / "w", "starlette-ish", "2.1", ["typing-extensions"])
    rep = closure.check(no_starlette + [closure.wheel_metadata(wrong)], ROOTS, gpu)
    assert any("the set has starlette-ish 2.1" in p for p in rep.problems)
    rep = closure.check(all_ + [closure.wheel_metadata(wrong)], ROOTS, gpu)
    assert any("two versions of starlette-ish" in p for p in rep.problems)
    extra = make_wheel(tmp_path / "w", "unused", "0.1")
    rep = closure.check(all_ + [closure.wheel_metadata(extra)], ROOTS, gpu)
    assert rep.problems == ["unused 0.1 is in the set but nothing needs it"]
    numpy = make_wheel(tmp_path / "w", "numpy", "2.4.6")
    rep = closure.check(all_ + [closure.wheel_metadata(numpy)], ROOTS, gpu)
    assert any("numpy is on the GPU machine already" in p for p in rep.problems)
    assert closure.check(all_ + [closure.wheel_metadata(numpy)], ROOTS, gpu, ["numpy"]).ok


def test_extras_are_only_followed_when_asked(index):
    plain = [Requirement("rayish==2.0")]
    rep = closure.check(metas(index, "rayish"), plain, {**GPU})
    assert rep.ok, rep.problems  # fastapi-ish is behind the serve extra


def test_markers_are_those_of_cpython_312_on_linux():
    reqs = [
        'a; python_version < "3.12"',
        'b; python_version >= "3.12"',
        'c; sys_platform == "win32"',
        'd; platform_machine == "x86_64" and sys_platform == "linux"',
        'e; extra == "serve"',
    ]
    assert [r.name for r in closure.active(reqs)] == ["b", "d"]
    assert [r.name for r in closure.active(reqs, {"serve"})] == ["b", "d", "e"]


def test_resolve_walks_the_needs_and_fetches_each_once(index):
    fetched = []

    def fetch(name, version):
        fetched.append(name)
        return index[(name, version)]

    versions = dict(index.keys())

    def choose(req):
        return versions[req.name]

    got = closure.resolve(ROOTS, {**GPU, "requests": None}, choose, fetch)
    assert [m.name for m in got] == [
        "fastapi-ish",
        "gevent-ish",
        "locust-ish",
        "rayish",
        "starlette-ish",
    ]
    assert sorted(fetched) == sorted(set(fetched))


def test_resolve_rescans_a_wheel_when_a_later_need_asks_an_extra(index):
    roots = [Requirement("rayish==2.0"), Requirement("rayish[serve]>=1")]
    versions = dict(index.keys())
    got = closure.resolve(roots, GPU, lambda r: versions[r.name], lambda n, v: index[(n, v)])
    assert {m.name for m in got} == {"rayish", "fastapi-ish", "starlette-ish"}


def test_slim_drops_members_and_their_record_lines(tmp_path):
    src = make_wheel(
        tmp_path,
        "rayish",
        "2.0",
        extra_files={"rayish/jars/big.jar": b"x" * 5000, "rayish/ui/main.js.map": b"m" * 100},
    )
    dst = tmp_path / "out" / src.name
    dst.parent.mkdir()
    dropped = slim.slim_wheel(src, dst, ("rayish/jars/*", "rayish/ui/*.map"))
    assert sorted(dropped) == ["rayish/jars/big.jar", "rayish/ui/main.js.map"]
    with zipfile.ZipFile(dst) as z:
        assert z.testzip() is None
        names = z.namelist()
        record = z.read("rayish-2.0.dist-info/RECORD").decode()
    assert "rayish/jars/big.jar" not in names and "jars" not in record and ".map" not in record
    assert "rayish/__init__.py" in names and "rayish/__init__.py" in record
    assert closure.wheel_metadata(dst).requires == closure.wheel_metadata(src).requires


def test_device_env_names_each_miss():
    checks = [
        {"requirement": "click>=8.1", "required_by": "flask 3.1.3"},
        {"requirement": "anyio<5,>=4.10", "required_by": "openai 3.57.0"},
        {"requirement": "gone>=1", "required_by": "x 1"},
    ]
    have = {"click": "8.1.7", "anyio": "4.4.0"}
    out = device_env.misses(checks, have.get)
    assert out == [
        "anyio 4.4.0 does not meet anyio<5,>=4.10 (needed by openai 3.57.0)",
        "gone is missing (needed by x 1: gone>=1)",
    ]


def test_roots_are_the_runtime_pins_without_the_machines_cuda_stack():
    pins = wheels.requirement_pins()
    names = [r.name for r in wheels.stack_roots(pins)]
    assert {"ray", "fastapi", "pydantic", "llguidance", "locust", "openai"} <= set(names)
    assert not {"torch", "triton"} & set(names)
    ray = next(r for r in wheels.stack_roots(pins) if r.name == "ray")
    assert ray.extras == {"serve"} and str(ray.specifier) == str(pins["ray"].specifier)


def test_committed_lock_carries_every_pinned_root_the_machine_lacks():
    """requirements.txt bumped without --relock would stage the old version: caught here."""
    pins = wheels.requirement_pins()
    gpu = closure.read_gpu_packages()
    lock = wheels.read_lock()
    for r in wheels.stack_roots(pins):
        name = r.name.lower()
        if name in gpu:
            continue
        assert name in lock, f"{name} missing from wheels.lock"
        assert closure.fits(r, lock[name][0]), f"wheels.lock has {name} {lock[name][0]}, want {r}"
        assert len(lock[name][1]) == 64


def test_lock_round_trip(tmp_path):
    w = make_wheel(tmp_path, "rayish", "2.0")
    lock = tmp_path / "wheels.lock"
    wheels.write_lock({"rayish": w}, lock)
    version, digest = wheels.read_lock(lock)["rayish"]
    assert version == "2.0" and len(digest) == 64
