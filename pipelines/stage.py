"""What every data stage shares: its manifest, the up-to-date check and its console.

A stage's manifest records the stage's parameters, the sha256 of its inputs, its output counts, its
stage version and the XLab version. A stage is skipped when its manifest holds the same parameters,
input hashes and stage version (and its outputs still exist), and redone with ``--force``.

The stage version is the version of that stage's own output format and code: each stage module
holds a ``STAGE_VERSION``, bumped when the stage's output for the same inputs and parameters would
differ. The XLab version is recorded for information only, so a release that leaves a stage alone
leaves its output up to date. A change upstream still reaches the later stages through their input
hashes. Manifests written before stage versions existed (XLab 0.6 and earlier) hold none and count
as version 1 (:data:`FIRST_STAGE_VERSION`), the version of every stage of 0.6.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from xlab.errors import XLabError, first_line
from xlab.fsio import atomic_write_json, exclusive_lock, is_disk_full, lock_path, read_json
from xlab.version import __version__

console = Console(stderr=False, highlight=False)


def output_lock(output: Path, stage: str, part: str = "", *, shared: bool = False, doing: str = ""):
    """``with output_lock(path, stage):`` hold the one-writer lock of ``output`` (see
    :func:`xlab.fsio.exclusive_lock`); a second writer gets a one-line XLabError naming the holders
    that still live, each with ``doing`` (default: the stage and part)."""
    what = f"{stage}{' ' + part if part else ''}"
    return exclusive_lock(lock_path(output, part), f"{output} ({what})", shared=shared, doing=doing or what)


def read_manifest(path: Path) -> dict | None:
    """The manifest at ``path``, or None when it does not exist, cannot be parsed or is not a
    JSON object (a manifest of the wrong shape counts as absent: the stage is redone)."""
    try:
        m = read_json(path)
    except (FileNotFoundError, IsADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return m if isinstance(m, dict) else None


def parquet_file(path: Path, fix: str, columns: Sequence[str] = ("id", "text")):
    """``pyarrow.parquet.ParquetFile(path, pre_buffer=False)`` with its schema checked.

    ``pre_buffer=False``: with pyarrow's default (``True``) the reader keeps every column chunk it
    has read until the file is closed, so streaming a file with ``iter_batches`` holds about the
    whole file in memory (a 142 MB split reached 130 MB of Arrow allocations); without it the
    memory of a pass is that of the batches in flight, whatever the file's size.

    Args:
        path: an articles parquet file (raw articles or a split).
        fix: the command that rewrites the file, named in the error.
        columns: columns that must exist; ``text`` must also hold strings.

    Raises:
        XLabError: the file is not a readable parquet file (empty, truncated, foreign bytes), lacks
            a column, or its ``text`` column is not strings. The message names ``path`` and ``fix``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, pre_buffer=False)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError, ValueError) as e:
        raise XLabError(f"{path} is not a readable parquet file ({first_line(e)}); run `{fix}`") from None
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise XLabError(f"{path} lacks the column(s) {', '.join(missing)} (has {', '.join(schema.names)}); run `{fix}`")
    if "text" in columns:
        t = schema.field("text").type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise XLabError(f"{path}: column text holds {t}, not strings; run `{fix}`")
    return pf


@contextlib.contextmanager
def reading_parquet(path: Path, fix: str) -> Iterator[None]:
    """Turn pyarrow's errors while reading ``path`` (a damaged data page) into :class:`XLabError`
    naming the file and the command ``fix``."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, OSError) and (e.errno is not None or is_disk_full(e)):
            raise  # the machine's error (a full disk while writing, a permission), not a damaged file
        raise XLabError(f"cannot read {path} ({type(e).__name__}: {first_line(e)}); run `{fix}`") from None


def require_manifest(path: Path, what: str, fix: str) -> dict:
    """The manifest at ``path``; raise :class:`XLabError` naming the command ``fix`` when absent."""
    m = read_manifest(path)
    if m is None:
        if path.exists():
            raise XLabError(f"{what}: {path} is unreadable or not a manifest; run `{fix} --force`")
        raise XLabError(f"{what} not found ({path}); run `{fix}` first")
    return m


# The stage version a manifest without one was written by: every stage of XLab 0.6 and earlier.
FIRST_STAGE_VERSION = 1


def manifest_stage_version(m: dict) -> Any:
    """The stage version recorded in the manifest ``m`` (:data:`FIRST_STAGE_VERSION` when absent)."""
    return m.get("stage_version", FIRST_STAGE_VERSION)


def is_up_to_date(
    manifest_path: Path,
    params: dict,
    inputs: dict,
    outputs: Iterable[Path] = (),
    *,
    stage_version: int = FIRST_STAGE_VERSION,
) -> bool:
    """True when the manifest at ``manifest_path`` was written with these params, input hashes and
    ``stage_version`` (the caller's ``STAGE_VERSION``), and every path in ``outputs`` exists.

    The XLab version in the manifest is not compared: another release with the same stage version
    produces the same output. A manifest without a stage version counts as version 1.
    """
    m = read_manifest(manifest_path)
    if m is None:
        return False
    same = (
        m.get("params") == _jsonable(params)
        and m.get("inputs") == _jsonable(inputs)
        and manifest_stage_version(m) == stage_version
    )
    return same and all(Path(p).exists() for p in outputs)


def write_manifest(
    manifest_path: Path,
    *,
    stage: str,
    params: dict,
    inputs: dict,
    counts: dict,
    stage_version: int = FIRST_STAGE_VERSION,
    extra: dict | None = None,
) -> dict:
    """Write a stage manifest atomically and return it; ``stage_version`` is the stage's
    ``STAGE_VERSION`` (compared by :func:`is_up_to_date`), the XLab version is recorded beside it
    for information."""
    m = {
        "stage": stage,
        "stage_version": int(stage_version),
        "xlab_version": __version__,
        "params": _jsonable(params),
        "inputs": _jsonable(inputs),
        "counts": _jsonable(counts),
        "created_unix": round(time.time(), 3),
    }
    if extra:
        m.update(_jsonable(extra))
    atomic_write_json(manifest_path, m)
    return m


def skipped(stage: str, manifest_path: Path, redo: str = "use --force to redo") -> None:
    """Print the one line that says a stage was up to date, and how to redo it."""
    console.print(f"[bold]{stage}[/bold]: up to date ({manifest_path}); {redo}")


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True, default=str))
