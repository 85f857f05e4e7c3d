"""Wheels in device calls (benchmarks/stack/parts.py): planning, cutting, staging, joining."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks.stack import parts


def _files(tmp_path, sizes: dict[str, int]):
    d = tmp_path / "final"
    d.mkdir(parents=True)
    for name, size in sizes.items():
        (d / name).write_bytes(os.urandom(size))
    return d


def _covered(bins, sizes):
    spans: dict[str, list] = {}
    for b in bins:
        for name, _, offset, size in b:
            spans.setdefault(name, []).append((offset, size))
    for name, size in sizes.items():
        pos = 0
        for offset, n in sorted(spans[name]):
            assert offset == pos, f"{name}: gap or overlap at {pos}"
            pos += n
        assert pos == size, name


@pytest.mark.parametrize(
    "sizes, budget, calls",
    [
        ({"a": 10, "b": 3, "c": 3}, 10, 2),  # fits whole
        ({"big": 25, "s": 4}, 10, 3),  # cut into 10 + 10 + 5, the small file beside the tail
        ({"x": 6, "y": 6, "z": 6}, 9, 2),  # FFD needs 3; cutting one more file saves a call
        ({"one": 1}, 1, 1),
    ],
)
def test_plan_calls_fits_the_budget_with_the_fewest_calls(sizes, budget, calls):
    bins = parts.plan_calls(sizes, budget)
    assert len(bins) == calls
    assert all(sum(it[3] for it in b) <= budget for b in bins)
    _covered(bins, sizes)


def test_plan_calls_refuses_bad_input():
    with pytest.raises(ValueError, match="budget"):
        parts.plan_calls({"a": 1}, 0)
    with pytest.raises(ValueError, match="empty"):
        parts.plan_calls({"a": 0}, 10)


def _plan(tmp_path, sizes, budget):
    final = _files(tmp_path, sizes)
    manifest = parts.build_manifest(final, budget, {"device_checks": []})
    dirs = parts.write_calls(final, manifest, tmp_path / "calls")
    return final, manifest, dirs


def test_round_trip_cut_stage_join(tmp_path):
    sizes = {"ray-1.0-py3-none-any.whl": 250_001, "small-1.0-py3-none-any.whl": 40_000}
    final, manifest, dirs = _plan(tmp_path, sizes, 100_000)
    assert len(dirs) == len(manifest["calls"]) == 3
    big = next(f for f in manifest["files"] if f["name"].startswith("ray"))
    assert len(big["parts"]) == 3 and big["sha256"] == parts.sha256_file(final / big["name"])
    for d in dirs:  # each call folder stays within the budget (the manifest copy aside)
        assert sum(p.stat().st_size for p in d.iterdir() if p.name != parts.MANIFEST) <= 100_000
    staged = tmp_path / "staged"
    for d in dirs:
        parts.stage(d, staged)
    out = parts.assemble(staged, tmp_path / "wheels")
    assert sorted(p.name for p in out) == sorted(sizes)
    for p in out:
        assert p.read_bytes() == (final / p.name).read_bytes()
    again = parts.assemble(staged, tmp_path / "wheels")  # idempotent: kept as they are
    assert [p.name for p in again] == [p.name for p in out]


def test_a_missing_call_is_named(tmp_path):
    _, manifest, dirs = _plan(tmp_path, {"a.whl": 30, "b.whl": 30, "c.whl": 30}, 40)
    staged = tmp_path / "staged"
    parts.stage(dirs[0], staged)
    parts.stage(dirs[2], staged)
    assert set(parts.missing_calls(staged, manifest)) == {2}
    with pytest.raises(FileNotFoundError, match=r"staging call\(s\) 2 again"):
        parts.assemble(staged, tmp_path / "wheels")


def test_corruption_is_caught_at_staging_and_at_joining(tmp_path):
    _, _, dirs = _plan(tmp_path, {"big.whl": 1000}, 400)
    part = next(p for p in dirs[0].iterdir() if p.name != parts.MANIFEST)
    good = part.read_bytes()
    part.write_bytes(bytes([good[0] ^ 1]) + good[1:])
    with pytest.raises(ValueError, match="sha256"):
        parts.stage(dirs[0], tmp_path / "staged")
    part.write_bytes(good)
    staged = tmp_path / "staged"
    for d in dirs:
        parts.stage(d, staged)
    victim = staged / part.name  # flipped after staging (a disk or copy fault)
    victim.write_bytes(bytes([good[0] ^ 1]) + good[1:])
    with pytest.raises(ValueError, match="sha256 mismatch"):
        parts.assemble(staged, tmp_path / "wheels")
    assert not list((tmp_path / "wheels").glob("*.tmp")), "a half-joined file was left behind"


def test_staging_another_plan_empties_the_folder(tmp_path, capsys):
    _, m1, d1 = _plan(tmp_path / "p1", {"a.whl": 50}, 100)
    _, m2, d2 = _plan(tmp_path / "p2", {"b.whl": 60}, 100)
    assert m1["plan_id"] != m2["plan_id"]
    staged = tmp_path / "staged"
    parts.stage(d1[0], staged)
    parts.stage(d2[0], staged)
    assert "another plan" in capsys.readouterr().out
    assert sorted(p.name for p in staged.iterdir()) == sorted([parts.MANIFEST, "b.whl"])
    assert json.loads((staged / parts.MANIFEST).read_text())["plan_id"] == m2["plan_id"]


def test_cli_stage_and_assemble(tmp_path, capsys):
    _, _, dirs = _plan(tmp_path, {"a.whl": 70, "b.whl": 70}, 100)
    staged = tmp_path / "staged"
    assert parts.main(["stage", "--src", str(dirs[0]), "--dest", str(staged)]) == 0
    assert "still to stage: call(s) 2" in capsys.readouterr().out
    assert parts.main(["assemble", "--parts", str(staged), "--out", str(tmp_path / "w")]) == 1
    assert "call(s) 2 again" in capsys.readouterr().err
    assert parts.main(["stage", "--src", str(dirs[1]), "--dest", str(staged)]) == 0
    assert "all 2 call(s) staged" in capsys.readouterr().out
    assert parts.main(["assemble", "--parts", str(staged), "--out", str(tmp_path / "w")]) == 0
