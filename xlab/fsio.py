"""Atomic file writes and hashing.

Every XLab stage writes to a temporary name in the destination's folder and renames it into place
(``os.replace`` is atomic on POSIX), so a killed or failed run never leaves a half-written file
where a complete one is expected, and never damages what an earlier run wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: str | os.PathLike, mode: int = 0o666) -> None:
    """Give a file (``mode`` 0o666) or folder (0o777) the permissions a plain open()/mkdir() would
    have given it under the current umask (mkstemp, mkdtemp and some writers create them private)."""
    os.chmod(path, mode & ~_umask())


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk_bytes`` chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        publish_mode(tmp_path, 0o666)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def create_once(path: str | os.PathLike, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; True when this call created it.

    Of any number of processes (on any number of machines sharing the folder) that call this at
    once, exactly one creates the file and every other gets False; a reader never sees the file
    half-written. The bytes go to a temporary file in ``path``'s own folder (a rename or link across
    filesystems fails), which is then hard-linked onto ``path``: ``link`` refuses an existing name
    atomically, also on NFS. Where the filesystem has no hard links the file is created with
    ``O_EXCL`` and written in place (still exactly one creator; a reader may then see it before it
    is complete, so readers should hold a lock the creator holds).

    Raises:
        OSError: the folder cannot be created or written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish_mode(tmp, 0o666)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            import errno

            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
        try:  # no hard links here
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(out, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success it replaces ``path``.

    The old folder (if any) is moved aside and removed only after the new one is in place, so at
    every moment ``path`` is either the old complete folder or the new complete one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        publish_mode(tmp, 0o777)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def lock_path(output: str | os.PathLike, part: str = "") -> Path:
    """The lock file of an output (a stage's folder or file, a run folder), e.g. ``shards/wiki`` ->
    ``.locks/shards-wiki.lock``: in a ``.locks`` folder beside the output's kind folder, never inside
    the output (a stage swaps its whole output folder; a lock must stay on one file) and never in the
    kind folder itself (a refused stage leaves ``data/splits`` uncreated)."""
    output = Path(output)
    return output.parent.parent / ".locks" / f"{output.parent.name}-{output.name}{'.' + part if part else ''}.lock"


@contextlib.contextmanager
def exclusive_lock(
    path: str | os.PathLike, what: str, *, shared: bool = False, wait: float | None = 0.0
) -> Iterator[Path]:
    """Hold an advisory lock on ``path`` (created if needed) while the block runs: one writer per
    run, store or stage output. ``shared`` takes a shared lock instead, which any number of holders
    may hold at once but never together with an exclusive one (parts of one store).

    ``wait``: seconds to wait for a holder to let go before giving up (0, the default: refuse at
    once; None: wait as long as it takes), for short critical sections that processes take in turn.

    The lock is ``fcntl.flock`` on an open file, so the kernel releases it when the holder exits,
    even by SIGKILL: a dead holder never leaves it stuck. The file records the holder's pid and
    host for the message a second writer gets; it is left in place, except when the block fails
    and this call created it (and its folders): then it is removed, with the folders this call
    created if they are empty, so that a command refused in a fresh project leaves no ``.locks/``
    behind. A holder checks after locking that the file it locked is still the one at ``path``
    (else it locks the new one), so removing it never lets two holders in.

    Raises:
        XLabError: another process holds the lock (after ``wait`` seconds; naming ``what``, its
            pid and host).
    """
    import fcntl
    import socket

    from xlab.errors import XLabError

    path = Path(path)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    deadline = None if wait is None else time.monotonic() + wait
    while True:
        fd, created = _open_lock_file(path)
        try:
            try:
                if deadline is None:
                    fcntl.flock(fd, mode)
                else:
                    while True:
                        try:
                            fcntl.flock(fd, mode | fcntl.LOCK_NB)
                            break
                        except BlockingIOError:
                            if time.monotonic() >= deadline:
                                raise
                            time.sleep(0.02)
            except BlockingIOError:
                holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "another process"
                raise XLabError(f"{what} is in use by {holder}; wait for it to finish or stop it first") from None
        except BaseException:
            os.close(fd)
            raise
        if _is_file_at(fd, path):
            break
        os.close(fd)  # its creator removed it (a failed command) while this one waited: lock the new one
    try:
        if not shared:  # shared holders leave the last exclusive holder's line alone
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield path
    except BaseException:
        if created:
            _remove_lock_file(fd, path, created)
        raise
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _open_lock_file(path: Path) -> tuple[int, list[Path]]:
    """Open (creating) the lock file ``path`` and its folders; returns its descriptor and what this
    call created, deepest first (the file itself first), empty when it all existed.

    Raises:
        OSError: the folder cannot be created, or the file not opened.
    """
    while True:
        missing, d = [], path.parent
        while not d.exists() and d != d.parent:
            missing.append(d)
            d = d.parent
        made = []
        for d in reversed(missing):  # outermost first
            try:
                d.mkdir()
                made.append(d)
            except FileExistsError:  # another process made it at the same moment: theirs
                pass
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), [path, *reversed(made)]
        except FileExistsError:
            try:
                return os.open(path, os.O_RDWR), list(reversed(made))
            except FileNotFoundError:  # removed by a failed holder in between: try again
                continue
        except FileNotFoundError:  # a folder removed by a failed holder in between: try again
            continue


def _is_file_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the file at ``path`` (not removed or replaced)."""
    try:
        st, now = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def _remove_lock_file(fd: int, path: Path, created: list[Path]) -> None:
    """Remove the lock file this holder created, and the folders it created if they are empty, when
    no other process holds it (a shared lock is upgraded first; if that fails, all stays)."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # another holder of a shared lock: the file is theirs too
    for p in created:  # the file, then its folders, deepest first
        try:
            p.unlink() if p == path else p.rmdir()
        except OSError:  # a folder that holds something else now: it stays, and so do those above it
            return
