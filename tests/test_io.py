"""Atomic writes: all or nothing, and the permissions of an ordinary write."""

import os

import pytest

from xlab.fsio import atomic_dir, atomic_write_bytes, atomic_write_json, read_json, sha256_file


def test_atomic_write_replaces_whole_and_keeps_old_on_failure(tmp_path):
    p = tmp_path / "a" / "f.json"
    atomic_write_json(p, {"x": 1})
    assert read_json(p) == {"x": 1}
    with pytest.raises(RuntimeError):
        from xlab.fsio import atomic_path

        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed halfway")
    assert read_json(p) == {"x": 1}
    assert sorted(os.listdir(p.parent)) == ["f.json"]  # no temporary left behind


def test_modes_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "f", b"abc")
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert sha256_file(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_atomic_dir_swaps_whole_folders(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as d:
        (d / "old").write_text("1")
    with pytest.raises(ValueError):
        with atomic_dir(target) as d:
            (d / "new").write_text("2")
            raise ValueError
    assert sorted(os.listdir(target)) == ["old"]
    with atomic_dir(target) as d:
        (d / "new").write_text("2")
    assert sorted(os.listdir(target)) == ["new"]
    assert sorted(os.listdir(tmp_path)) == ["out"]
