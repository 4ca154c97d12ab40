"""One-line complaints about a path a user gave where a file is expected (a configuration file, a
dump, a checkpoint): what the path is, and what to pass instead. A folder given for a file is named
as a folder, with the files of the expected kind it holds (``runs/demo/checkpoints`` ->
``runs/demo/checkpoints/last.pt``), never as "not found".

Imports nothing heavy, so that the command line stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path

SHOWN = 3  # files named in a suggestion; more are counted


def files_in(folder: Path, suffixes: tuple[str, ...], look_in: tuple[str, ...] = ()) -> list[Path]:
    """The files of ``folder`` (and of its subfolders ``look_in``, e.g. a run folder's
    ``checkpoints``) whose names end with one of ``suffixes``: ``last.pt`` first, then by name.
    Unreadable folders count as empty."""
    found: list[Path] = []
    for d in (folder, *(folder / s for s in look_in)):
        try:
            found += sorted((p for p in d.iterdir() if p.is_file() and p.name.endswith(suffixes)),
                            key=lambda p: (p.name != "last.pt", p.name))  # fmt: skip
        except OSError:  # missing, not a folder, or not readable: nothing to suggest there
            continue
    return found


def suggestion(folder: Path, suffixes: tuple[str, ...], look_in: tuple[str, ...], otherwise: str) -> str:
    """What to pass instead of ``folder``: ``"pass one of the .pt files it holds: a, b"`` naming up to
    :data:`SHOWN` of its files with ``suffixes`` (see :func:`files_in`), else ``"pass " + otherwise``."""
    found = files_in(folder, suffixes, look_in)
    if not found:
        return f"pass {otherwise}"
    more = f" (and {len(found) - SHOWN} more)" if len(found) > SHOWN else ""
    return f"pass one of the {'/'.join(suffixes)} files it holds: {', '.join(str(p) for p in found[:SHOWN])}{more}"


def folder_problem(
    path: Path, what: str, expected: str, suffixes: tuple[str, ...], look_in: tuple[str, ...] = ()
) -> str:
    """The complaint about the folder ``path`` given as ``what`` where ``expected`` ("a .pt file")
    was, with its :func:`suggestion`."""
    return f"{what} {path} is a folder, not {expected}; {suggestion(path, suffixes, look_in, expected)}"


def file_problem(
    path: str | os.PathLike, what: str, kinds: str, suffixes: tuple[str, ...] = (), look_in: tuple[str, ...] = ()
) -> str | None:
    """None when ``path`` is a regular file (or a link to one), else one line saying what it is.

    Args:
        path: the path the user gave.
        what: what the command expected, as the message names it ("config file", "dump file").
        kinds: the kind of file, for "not a ... file" (".yaml", ".pt", "MediaWiki dump").
        suffixes: endings of the files worth suggesting inside a folder given instead (default:
            ``kinds``).
        look_in: subfolders of a given folder also searched for suggestions.
    """
    path = Path(path)
    if path.is_file():
        return None
    if path.is_dir():
        return folder_problem(path, what, f"a {kinds} file", suffixes or (kinds,), look_in)
    if path.exists():  # a fifo, a socket, a device
        return f"{what} {path} is not a regular file; pass a {kinds} file"
    return f"{what} not found: {path}"
