"""Readers and writers of one shard store: a store is never rebuilt under a process that reads it.

A reader (training, evaluation, stats, validate) opens shards lazily, for as long as it
runs: a store swapped or rewritten meanwhile would hand it the new rows under the old manifest's
counts. So a reader holds the store for its whole life with :func:`reading`, and whatever changes a
complete store (a whole-store encode or rebuild, the parts of an encode, a merge) does so inside
:func:`changing`. The two exclude each other, in one line and exit 2, never by waiting:

- a reader takes the store's *read* lock shared, then checks that no process holds its *write* lock;
- a writer takes the *write* lock shared (the parts of one store write at once), then checks that
  no process holds the *read* lock.

Each side takes its own lock before it checks the other's, so of a reader and a writer starting at
the same moment at least one is refused (both, at worst; a rerun then proceeds), and never both run.
Both locks are ``flock`` locks (:func:`xlab.fsio.exclusive_lock`): a killed holder never blocks
anyone. A writer checks for readers only once it knows the store must change (after encode's
up-to-date check, which reads the store without these locks), so an up-to-date ``xlab data encode``
beside a running training says "up to date" rather than being refused, and a process never waits on
itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from xlab.fsio import exclusive_lock, lock_path

# A check takes the other side's lock exclusively for an instant; two readers (or two parts) checking
# at once wait for each other that long instead of refusing each other.
PROBE_WAIT_S = 2.0


def _locks(store: Path) -> tuple[Path, Path]:
    return lock_path(store, "read"), lock_path(store, "write")


@contextlib.contextmanager
def reading(store: str | os.PathLike, doing: str) -> Iterator[None]:
    """Hold the shard store at ``store`` for reading while the block runs (any number of readers
    at once); ``doing`` names the reader in the message a writer gets (``"train"``).

    Where the lock files cannot be created (a read-only filesystem, another user's folder) no
    process can rebuild the store from here either, and the block runs without them; so it does
    where there is no store (the reader's own error then says so, and no ``.locks`` folder is made
    in a project that has nothing yet).

    Raises:
        XLabError: a process is rebuilding or encoding the store (naming it); nothing was read.
    """
    read, write = _locks(Path(store))
    what = f"shard store {store}"
    with contextlib.ExitStack() as stack:
        if not Path(store).is_dir():
            yield
            return
        try:
            stack.enter_context(exclusive_lock(read, what, shared=True, doing=f"{doing} reads it"))
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
        else:
            with exclusive_lock(write, what, wait=PROBE_WAIT_S, doing="checking for writers"):
                pass  # no writer: from now on none can start (a writer checks for this read lock)
        yield


@contextlib.contextmanager
def changing(store: str | os.PathLike, doing: str) -> Iterator[None]:
    """Hold the shard store at ``store`` for changing it while the block runs (the parts of one
    encode at once; the whole-store writer's own lock keeps other writers out); ``doing`` names
    the writer in the message a reader gets (``"encode rebuilds it"``).

    Raises:
        XLabError: a process reads the store (training, evaluation, ...; naming it): rebuilding it
            now would change its rows under that reader. Nothing was changed.
    """
    read, write = _locks(Path(store))
    what = f"shard store {store}"
    with exclusive_lock(write, what, shared=True, doing=doing):
        with exclusive_lock(read, what, wait=PROBE_WAIT_S, doing="checking for readers"):
            pass  # no reader: from now on none can start (a reader checks for this write lock)
        yield
