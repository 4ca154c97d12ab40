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


# ------------------------------------------------------------------------------------------ locks
def test_a_failed_holder_removes_the_lock_and_folders_it_created(tmp_path):
    """A command refused in a fresh project left `data/.locks/` behind."""
    from xlab.fsio import exclusive_lock, lock_path

    lock = lock_path(tmp_path / "data" / "raw" / "wiki")  # data/.locks/raw-wiki.lock
    with pytest.raises(ValueError):
        with exclusive_lock(lock, "stage"):
            assert lock.is_file()
            raise ValueError
    assert list(tmp_path.iterdir()) == []
    with exclusive_lock(lock, "stage"):  # success: the lock file stays, as before
        pass
    assert lock.is_file()
    with pytest.raises(ValueError):  # a failure over a lock file that was there: it stays
        with exclusive_lock(lock, "stage"):
            raise ValueError
    assert lock.is_file()
    other = lock_path(tmp_path / "data" / "splits" / "wiki")  # .locks existed: only the new file goes
    with pytest.raises(ValueError):
        with exclusive_lock(other, "stage"):
            raise ValueError
    assert sorted(p.name for p in lock.parent.iterdir()) == ["raw-wiki.lock"]
    a, b = exclusive_lock(other, "a", shared=True), exclusive_lock(other, "b", shared=True)
    a.__enter__()  # creates the file
    b.__enter__()
    assert a.__exit__(ValueError, ValueError(), None) is False  # a fails while b still holds the file
    assert other.is_file()  # b's, too: it stays
    b.__exit__(None, None, None)


def test_a_waiter_on_a_removed_lock_file_locks_the_new_one(tmp_path):
    """The holder that created the lock file removes it when it fails; a process already waiting on
    that file must not then hold a lock nobody else sees (two holders)."""
    import threading

    from xlab.errors import XLabError
    from xlab.fsio import exclusive_lock

    lock = tmp_path / ".locks" / "x.lock"
    held, release, waiter_in, waiter_out = (threading.Event() for _ in range(4))

    def first():
        with pytest.raises(RuntimeError), exclusive_lock(lock, "first"):
            held.set()
            release.wait(10)
            raise RuntimeError

    def waiter():
        with exclusive_lock(lock, "waiter", wait=None):
            waiter_in.set()
            waiter_out.wait(10)

    t1 = threading.Thread(target=first)
    t1.start()
    held.wait(10)
    t2 = threading.Thread(target=waiter)
    t2.start()
    import time

    time.sleep(0.3)  # the waiter has opened the first holder's file and waits on it
    release.set()
    t1.join(10)
    assert waiter_in.wait(10)
    with pytest.raises(XLabError, match="in use"):  # the waiter holds the file at the path now
        with exclusive_lock(lock, "third"):
            pass
    waiter_out.set()
    t2.join(10)


def test_an_atomic_write_never_replaces_a_device_or_a_fifo(tmp_path):
    """`xlab evaluate --json /dev/full` run as root replaced the device by a JSON file (the rename of
    an atomic write); a FIFO or a device is refused, a regular file still replaced."""
    import os

    from xlab.errors import XLabError
    from xlab.fsio import atomic_write_text

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(XLabError, match="is a FIFO or socket, not a file XLab may replace"):
        atomic_write_text(fifo, "{}")
    assert fifo.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["fifo.json"]
    with pytest.raises(XLabError, match="/dev/null is a device"):
        atomic_write_text("/dev/null", "{}")
    (tmp_path / "f.json").write_text("old")
    atomic_write_text(tmp_path / "f.json", "new")
    assert (tmp_path / "f.json").read_text() == "new"


def test_json_nested_too_deeply_is_a_decode_error(tmp_path):
    """A crafted manifest of 100,000 nested lists raised RecursionError: a traceback in validate,
    train and stats. It reads as a damaged JSON file, which every reader reports in one line."""
    import json

    from xlab.fsio import read_json

    p = tmp_path / "m.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(json.JSONDecodeError, match="nested too deeply"):
        read_json(p)
