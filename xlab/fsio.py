"""Atomic file writes and hashing.

Every XLab stage writes to a temporary name in the destination's folder and renames it into place
(``os.replace`` is atomic on POSIX), so a killed or failed run never leaves a half-written file
where a complete one is expected, and never damages what an earlier run wrote.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
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


# errno 28 (ENOSPC) and a quota's EDQUOT; numpy's short write ("7161 requested and 4032 written", an
# OSError without errno) and pyarrow's "[errno 28]" text reach us without the code set.
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_FULL_TEXT = re.compile(r"\d+ requested and \d+ written|errno 28\b|no space left on device|disk quota exceeded", re.I)


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` says a write found no space: errno ENOSPC or EDQUOT, numpy's short write, or a
    library's text of errno 28 (pyarrow, torch)."""
    if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
        return True
    return isinstance(e, (OSError, RuntimeError)) and bool(_FULL_TEXT.search(str(e)))


@contextlib.contextmanager
def naming_full_disk(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk while the block writes ``path`` (a file, or a folder being filled) into one
    :class:`~xlab.errors.XLabError` that names the file and says the disk is full, whichever writer
    found it (``write``, ``np.save``, pyarrow); every other error passes unchanged.

    Raises:
        XLabError: the block raised an error :func:`is_disk_full` recognises.
    """
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        from xlab.errors import XLabError

        raise XLabError(
            f"cannot write {path}: the disk is full (no space left on device); free some space and rerun "
            "the same command"
        ) from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.

    Raises:
        XLabError: the disk (or quota) filled up while the block or the rename wrote, naming ``path``
            (see :func:`naming_full_disk`).
    """
    path = Path(path)
    _refuse_special_file(path)
    with naming_full_disk(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with naming_full_disk(path):
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            publish_mode(tmp_path, 0o666)
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _refuse_special_file(path: Path) -> None:
    """Refuse to replace a device, FIFO or socket at ``path``: the rename of an atomic write would put
    a regular file in its place (``--json /dev/full`` run as root replaced the device).

    Raises:
        XLabError: naming the path and what it is.
    """
    import stat

    from xlab.errors import XLabError

    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode) or stat.S_ISDIR(mode)):
        kind = "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a FIFO or socket"
        raise XLabError(f"{path} is {kind}, not a file XLab may replace; pass the path of a regular file")


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
        XLabError: the disk is full (naming ``path``).
        OSError: the folder cannot be created or written.
    """
    with naming_full_disk(path):
        return _create_once(Path(path), data)


def _create_once(path: Path, data: bytes) -> bool:
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
    """Yield a fresh temporary folder beside ``path`` (``.<name>.XXXXXXXX.tmp``); on success it
    replaces ``path``.

    The old folder (if any) is moved aside (``.<name>.XXXXXXXX.old``) and removed only after the new
    one is in place, so at every moment ``path`` is either the old complete folder or the new
    complete one. A kill leaves those temporaries behind: the next run of the same stage removes
    them with :func:`remove_leftovers`, under the stage's output lock.

    Raises:
        XLabError: the disk filled up while the block wrote (naming ``path``, see
            :func:`naming_full_disk`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with naming_full_disk(path):
            yield tmp
        publish_mode(tmp, 0o777)
        old = None
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            remove_path(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _temporaries(name: str) -> re.Pattern:
    """The names :func:`atomic_path`, :func:`create_once` and :func:`atomic_dir` give the temporaries
    of an output whose name matches the regular expression ``name``: ``.<name>.XXXXXXXX.tmp`` (or
    ``.old``, an old folder moved aside before removal), tempfile's 8 random characters."""
    return re.compile(rf"\.{name}\.[a-z0-9_]{{8}}\.(tmp|old)")


def remove_path(p: Path) -> None:
    """Remove a file, a symbolic link (not what it points to) or a folder tree; nothing if absent."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def leftovers(path: str | os.PathLike) -> list[Path]:
    """The temporaries that :func:`atomic_dir` and :func:`atomic_path` leave beside ``path`` when
    killed (files, folders or links), matched exactly, so those of another output whose name begins
    alike (``wiki`` and ``wiki.v2``) never match."""
    path = Path(path)
    pattern = _temporaries(re.escape(path.name))
    try:
        names = os.listdir(path.parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(path.parent / n for n in names if pattern.fullmatch(n))


def remove_leftovers(path: str | os.PathLike) -> list[Path]:
    """Remove what a killed writer of ``path`` left beside it (:func:`leftovers`); return them.

    Call it only while holding ``path``'s one-writer lock: then no live writer of ``path`` owns a
    temporary of that name (another output's temporaries never match)."""
    found = leftovers(path)
    for p in found:
        remove_path(p)
    return found


def remove_temporaries(folder: str | os.PathLike, extra: Sequence[str] = ()) -> list[Path]:
    """Remove what killed writers left in ``folder`` (not below it): the temporaries of every
    output in it (:func:`leftovers`, whatever the name), and the names that match the glob patterns
    ``extra`` (a writer's own temporaries). A missing folder has none.

    Call it only while holding the lock of the folder's writer (:func:`exclusive_lock`): a live
    writer's temporaries look the same. Returns the paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    every = _temporaries(".+")
    found = [p for p in folder.iterdir() if every.fullmatch(p.name)]
    found += [p for pattern in extra for p in folder.glob(pattern)]
    for p in found:
        remove_path(p)
    return found


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file.

    Raises:
        json.JSONDecodeError: not JSON, or nested too deeply for Python's parser (a crafted file of
            ``[[[...]]]`` raised RecursionError, which no caller expected).
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text[:64], 0) from None


def lock_path(output: str | os.PathLike, part: str = "") -> Path:
    """The lock file of an output (a stage's folder or file, a run folder), e.g. ``shards/wiki`` ->
    ``.locks/shards-wiki.lock``: in a ``.locks`` folder beside the output's kind folder, never inside
    the output (a stage swaps its whole output folder; a lock must stay on one file) and never in the
    kind folder itself (a refused stage leaves ``data/splits`` uncreated)."""
    output = Path(output)
    return output.parent.parent / ".locks" / f"{output.parent.name}-{output.name}{'.' + part if part else ''}.lock"


SHARED_GRACE_S = 1.0  # the least a shared taker waits (see exclusive_lock)


@contextlib.contextmanager
def exclusive_lock(
    path: str | os.PathLike, what: str, *, shared: bool = False, wait: float | None = 0.0, doing: str = ""
) -> Iterator[Path]:
    """Hold an advisory lock on ``path`` (created if needed) while the block runs: one writer per
    run, store or stage output. ``shared`` takes a shared lock instead, which any number of holders
    may hold at once but never together with an exclusive one (parts of one store, readers).

    ``wait``: seconds to wait for a holder to let go before giving up (0, the default: refuse at
    once; None: wait as long as it takes), for short critical sections that processes take in turn.

    The lock is ``fcntl.flock`` on an open file, so the kernel releases it when the holder exits,
    even by SIGKILL: a dead holder never leaves it stuck. The file records its holders, one line
    each (``pid P on HOST``, with ``doing`` in parentheses), for the message a refused process gets:
    the first holder after a time without any (an exclusive one, or a shared one that found none)
    starts the record afresh, later shared holders add their line. A refusal names only holders
    that may still live (a recorded pid of this host that no longer exists is left out), so it never
    names an earlier, finished holder. The file is left in place, except when the block fails and
    this call created it (and its folders): then it is removed, with the folders this call created
    if they are empty, so that a command refused in a fresh project leaves no ``.locks/`` behind. A
    holder checks after locking that the file it locked is still the one at ``path`` (else it locks
    the new one), so removing it never lets two holders in.

    Raises:
        XLabError: another process holds the lock (after ``wait`` seconds; naming ``what`` and the
            holders it recorded that still live).
    """

    path = Path(path)
    # A shared holder takes the lock exclusively for an instant (to learn whether it is alone):
    # another shared taker waits that instant out rather than being refused.
    deadline = None if wait is None else time.monotonic() + max(wait, SHARED_GRACE_S if shared else 0.0)
    line = _holder_line(doing).encode()
    while True:
        fd, created = _open_lock_file(path)
        try:
            _acquire(fd, path, shared, line, deadline, what)
        except BaseException:
            os.close(fd)
            raise
        if _is_file_at(fd, path):
            break
        os.close(fd)  # its creator removed it (a failed command) while this one waited: lock the new one
    try:
        yield path
    except BaseException:
        if created:
            _remove_lock_file(fd, path, created)
        raise
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _acquire(fd: int, path: Path, shared: bool, line: bytes, deadline: float | None, what: str) -> None:
    """Take the lock of the open lock file ``fd`` (at ``path``) and record ``line`` among its holders.

    Raises:
        XLabError: still held by another process at ``deadline`` (None: wait as long as it takes).
    """
    import fcntl

    from xlab.errors import XLabError

    while True:
        if _try_flock(fd, fcntl.LOCK_EX):  # no other holder: start the record afresh
            os.ftruncate(fd, 0)
            os.pwrite(fd, line, 0)
            # flock converts a lock in two steps (release, then take): another process may take
            # an exclusive lock between them, and the shared one then fails like any refusal.
            if not shared or _try_flock(fd, fcntl.LOCK_SH):
                return
        elif shared and _try_flock(fd, fcntl.LOCK_SH):  # beside other shared holders: add this one
            add = os.open(path, os.O_WRONLY | os.O_APPEND)  # O_APPEND writes of a line do not interleave
            try:
                os.write(add, line)
            finally:
                os.close(add)  # flock belongs to ``fd``'s open file: closing another descriptor keeps it
            return
        if deadline is not None and time.monotonic() >= deadline:
            holders = ", ".join(_live_holders(fd)) or "another process"
            raise XLabError(f"{what} is in use by {holders}; wait for it to finish or stop it first")
        time.sleep(0.02)


def _try_flock(fd: int, mode: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder_line(doing: str) -> str:
    import socket

    return f"pid {os.getpid()} on {socket.gethostname()}{f' ({doing})' if doing else ''}\n"


def _live_holders(fd: int) -> list[str]:
    """The holder lines recorded in a lock file, without those of this host whose pid is gone."""
    import socket

    text = os.pread(fd, 1 << 16, 0).decode("utf-8", "replace")
    host, live = socket.gethostname(), []
    for line in dict.fromkeys(ln.strip() for ln in text.splitlines() if ln.strip()):
        m = re.match(r"pid (\d+) on (\S+)", line)
        if m and m.group(2) == host and not _pid_alive(int(m.group(1))):
            continue  # a finished holder (its pid may only be reused by an unrelated process)
        live.append(line)
    return live


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


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
