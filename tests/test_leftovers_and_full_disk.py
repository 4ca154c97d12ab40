"""What a killed stage leaves is removed by its next run, and a full disk is named in one line
(xlab/fsio.py: atomic_dir, remove_leftovers, naming_full_disk)."""

import errno
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_split import make_cfg, read_splits, write_raw

from pipelines import split
from xlab.errors import XLabError
from xlab.fsio import atomic_dir, atomic_path, atomic_write_bytes, leftovers, remove_leftovers
from xlab.store.writer import write_shard


def _litter(folder, name):
    """What kills leave beside output ``name``: atomic_dir's folder and moved-aside old output,
    atomic_path's file; plus temporaries of other outputs that must stay."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f".{name}.ab12cd_9.tmp").mkdir()
    (folder / f".{name}.ab12cd_9.tmp" / "articles.parquet").write_bytes(b"x" * 1000)
    (folder / f".{name}.zz99yy88.old").write_bytes(b"old")  # --force over a regular file
    (folder / f".{name}.qq11ww22.old").symlink_to(folder)  # --force over a symlink (not followed)
    (folder / f".{name}.k3k3k3k3.tmp").write_bytes(b"half")
    keep = [folder / f".{name}.v2.abcdefgh.tmp", folder / f".{name}x.abcdefgh.tmp", folder / f".{name}.abc.tmp"]
    for p in keep:
        p.write_bytes(b"another output's")
    return keep


def test_a_rerun_of_split_removes_what_a_killed_split_left_and_nothing_else(tmp_path):
    write_raw(tmp_path, 40)
    cfg = make_cfg(tmp_path)
    keep = _litter(tmp_path / "data" / "splits", "wiki")
    assert len(leftovers(tmp_path / "data" / "splits" / "wiki")) == 4
    split.run(cfg)
    assert leftovers(tmp_path / "data" / "splits" / "wiki") == [] and all(p.exists() for p in keep)
    first = read_splits(tmp_path)
    (tmp_path / "data/splits/.wiki.ab12cd_9.tmp").mkdir()
    assert split.run(cfg)["skipped"] is True  # up to date: the leftovers still go
    assert leftovers(tmp_path / "data" / "splits" / "wiki") == [] and read_splits(tmp_path) == first


def test_a_rerun_of_download_removes_a_killed_downloads_parquet(tmp_path):
    from pipelines import download
    from xlab.config import load_config

    cfg = load_config(overrides=[f"paths.data_dir={tmp_path / 'data'}", "data.max_articles=5", "data.num_proc=1"],
                      use_defaults_file=False)  # fmt: skip
    keep = _litter(tmp_path / "data" / "raw", "wiki")
    download.run(cfg)
    assert leftovers(tmp_path / "data" / "raw" / "wiki") == [] and all(p.exists() for p in keep)


@pytest.mark.parametrize("kind", ["file", "symlink", "dangling"])
def test_force_over_a_file_or_a_symlink_leaves_no_old_copy(tmp_path, kind):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious").write_text("kept")
    out = tmp_path / "splits" / "wiki"
    out.parent.mkdir()
    if kind == "file":
        out.write_text("a file where the folder goes")
    else:
        out.symlink_to(target if kind == "symlink" else tmp_path / "nowhere")
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("new")
    assert out.is_dir() and not out.is_symlink() and (out / "a").read_text() == "new"
    assert sorted(p.name for p in out.parent.iterdir()) == ["wiki"]  # no .wiki.XXXX.old
    assert (target / "precious").read_text() == "kept"  # a link's target is never removed


def test_remove_leftovers_is_exact(tmp_path):
    keep = _litter(tmp_path, "wiki.model")
    assert len(remove_leftovers(tmp_path / "wiki.model")) == 4
    assert sorted(tmp_path.iterdir()) == sorted(keep)


FULL = [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError("7161 requested and 4032 written"),  # numpy's short write, without errno
    OSError("[errno 28] No space left on device"),  # pyarrow's text, without errno
]


@pytest.mark.parametrize("error", FULL, ids=["enospc", "numpy-short-write", "pyarrow-text"])
def test_every_full_disk_names_the_file_in_one_line(tmp_path, monkeypatch, error):
    # a file written through atomic_path (as every stage's manifests and shards are)
    with pytest.raises(XLabError) as e:
        with atomic_path(tmp_path / "m.json"):
            raise error
    assert str(e.value).startswith(f"cannot write {tmp_path / 'm.json'}: the disk is full")
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []  # and no temporary left
    # a shard, whose bytes numpy writes
    real_save = np.save

    def full_save(f, *a, **k):
        raise error

    monkeypatch.setattr(np, "save", full_save)
    shard = tmp_path / "train" / "000000.npy"
    with pytest.raises(XLabError, match=rf"cannot write {shard}: the disk is full"):
        write_shard(shard, np.zeros((2, 5), np.uint16))
    monkeypatch.setattr(np, "save", real_save)
    assert list((tmp_path / "train").iterdir()) == []
    # a folder a stage fills (the parquet files of split and download)
    with pytest.raises(XLabError, match=rf"cannot write {tmp_path / 'splits'}: the disk is full"):
        with atomic_dir(tmp_path / "splits"):
            raise error
    # and the rename itself
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(error))
    with pytest.raises(XLabError, match="the disk is full"):
        atomic_write_bytes(tmp_path / "x.bin", b"1")


def test_other_write_errors_pass_unchanged(tmp_path):
    with pytest.raises(PermissionError):
        with atomic_path(tmp_path / "m.json"):
            raise PermissionError(errno.EACCES, "Permission denied")


def test_a_full_disk_while_splitting_is_one_line_naming_the_output(tmp_path, monkeypatch):
    """pyarrow's ENOSPC while writing a split file, with its text only: named as a full disk at the
    output, not blamed on the raw file it reads; the earlier splits stay."""
    write_raw(tmp_path, 40)
    cfg = make_cfg(tmp_path)
    split.run(cfg)
    first = read_splits(tmp_path)

    def full(self, *a, **k):
        raise OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_batch", full)
    with pytest.raises(XLabError, match=r"cannot write .*data/splits/wiki: the disk is full"):
        split.run(cfg, force=True)
    assert read_splits(tmp_path) == first and leftovers(tmp_path / "data/splits/wiki") == []


def test_encode_force_over_a_symlinked_store_leaves_no_old_copy(tmp_path):
    from test_encode import config, encode, store_bytes, write_corpus

    write_corpus(tmp_path, n=10)
    cfg = config(tmp_path)
    encode(cfg)
    real = tmp_path / "elsewhere"
    (tmp_path / "shards" / "wiki").rename(real)
    (tmp_path / "shards" / "wiki").symlink_to(real)
    before = store_bytes(real)
    encode(cfg, force=True)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["wiki"]  # no .wiki.old
    assert store_bytes(tmp_path / "shards" / "wiki") == before and store_bytes(real) == before


def test_sigkill_during_split_then_rerun_leaves_nothing_behind(tmp_path):
    """A split killed while its temporary folder is half written; the rerun removes that folder."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    write_raw(tmp_path, 3000)
    root = Path(__file__).resolve().parent.parent
    script = (
        "import time, pyarrow.parquet as pq\n"
        "real = pq.ParquetWriter.write_batch\n"
        "def slow(self, *a, **k):\n"
        "    real(self, *a, **k); time.sleep(0.5)\n"
        "pq.ParquetWriter.write_batch = slow\n"
        "from pipelines import split\nfrom xlab.config import load_config\n"
        f"split.run(load_config(overrides=['paths.data_dir={tmp_path / 'data'}'], use_defaults_file=False))\n"
    )
    p = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(root)})
    splits = tmp_path / "data" / "splits"
    deadline = time.monotonic() + 120
    while not leftovers(splits / "wiki") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert leftovers(splits / "wiki") and not (splits / "wiki").exists()
    split.run(make_cfg(tmp_path))
    assert sorted(p.name for p in splits.iterdir()) == ["wiki"]
