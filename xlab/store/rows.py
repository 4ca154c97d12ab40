"""Row-level checks of shard contents, one chunk of consecutive rows at a time, for
:mod:`xlab.store.integrity` (the structure itself is described there and in :mod:`xlab.store.format`).

Each function adds ``{problem kind: [row numbers]}`` to ``found`` for a chunk ``rows``
``(n, seq_len + 1)`` whose first row is row ``start`` of its shard; ``prev_last`` is the last row of
the previous chunk (None at the top of the shard).
"""

from __future__ import annotations

import numpy as np


def _adder(found: dict, start: int):
    def add(kind: str, mask: np.ndarray) -> None:
        idx = np.flatnonzero(mask)
        if len(idx):
            found[kind].extend((idx + start).tolist())

    return add


def id_problems(rows: np.ndarray, start: int, *, vocab_size: int, found: dict) -> None:
    """Rows holding an id at or above ``vocab_size`` (the kind names the largest)."""
    too_big = rows.astype(np.int64) >= vocab_size
    if too_big.any():
        bad_rows = np.flatnonzero(too_big.any(1))
        worst = int(rows[bad_rows].max())
        found[f"token id >= vocabulary size {vocab_size} (largest {worst})"].extend((bad_rows + start).tolist())


def _common(rows: np.ndarray, start: int, found: dict, pad: int):
    """The checks both layouts share (padding only at a row's tail, a target in every row); returns
    the rows as int64, their pad mask and the ``add(kind, row_mask)`` that records further problems."""
    r = rows.astype(np.int64)
    add = _adder(found, start)
    is_pad = r == pad
    add(
        "padding followed by a token (padding must end the row)", (np.logical_or.accumulate(is_pad, 1) != is_pad).any(1)
    )
    add("no target token (the row's targets are all padding)", is_pad[:, 1:].all(1))
    return r, is_pad, add


def _previous(r: np.ndarray, prev_last) -> tuple[np.ndarray, np.ndarray]:
    """Each row's previous row (``prev_last`` before the first), and which rows have one."""
    n = len(r)
    prev = np.empty_like(r)
    if n > 1:
        prev[1:] = r[:-1]
    if prev_last is None:
        return prev, np.arange(n) > 0
    prev[0] = prev_last.astype(np.int64)
    return prev, np.ones(n, dtype=bool)


def padded_row_problems(rows, start: int, prev_last, *, pad: int, sos: int, eos: int, found: dict) -> None:
    """The structure of a ``padded`` split: ``<sos>`` only at column 0, nothing but padding after
    ``<eos>``, padding right after ``<eos>``, and each row either starts an article or continues the
    full row before it."""
    r, is_pad, add = _common(rows, start, found, pad)
    n = len(r)
    add("<sos> after column 0", (r[:, 1:] == sos).any(1))
    eos_mid = (r[:, :-1] == eos) & ~is_pad[:, 1:]
    add("a token after <eos> (only padding may follow it)", eos_mid.any(1))
    has_pad = is_pad.any(1)
    first_pad = np.argmax(is_pad, 1)
    before = r[np.arange(n), np.maximum(first_pad - 1, 0)]
    add("padding not preceded by <eos>", has_pad & (first_pad > 0) & (before != eos))
    # Continuation: row i either starts an article (<sos>) or continues row i-1, which then must be
    # full (no padding, not ended by <eos>) and end with row i's first token.
    starts = r[:, 0] == sos
    prev, check = _previous(r, prev_last)
    if prev_last is None:
        add("the shard does not begin with <sos>", (np.arange(n) == 0) & ~starts)
    prev_open = (prev != pad).all(1) & (prev[:, -1] != eos)
    add("the previous row's article is cut short before this <sos>", check & starts & prev_open)
    add(
        "the row continues no article (previous row ended or does not overlap)",
        check & ~starts & (~prev_open | (prev[:, -1] != r[:, 0])),
    )


def packed_row_problems(rows, start: int, prev_last, *, last_row: int, pad: int, sos: int, eos: int,
                        found: dict) -> None:  # fmt: skip
    """The structure of a ``packed`` shard whose last row is row ``last_row``: padding only in that
    row, ``<sos>`` only after ``<eos>``, ``<eos>`` followed by ``<sos>`` or padding, and every row
    overlapping the one before by one token."""
    r, is_pad, add = _common(rows, start, found, pad)
    n = len(r)
    add("padding before the shard's last row (a packed split pads only its end)",
        is_pad.any(1) & (np.arange(n) + start < last_row))  # fmt: skip
    first_pad = np.argmax(is_pad, 1)
    before = r[np.arange(n), np.maximum(first_pad - 1, 0)]
    add("padding not preceded by <eos>", is_pad.any(1) & (first_pad > 0) & (before != eos))
    add("<sos> not preceded by <eos>", ((r[:, 1:] == sos) & (r[:, :-1] != eos)).any(1))
    add("<eos> followed by neither <sos> nor padding", ((r[:, :-1] == eos) & (r[:, 1:] != sos) & ~is_pad[:, 1:]).any(1))
    prev, check = _previous(r, prev_last)
    if prev_last is None:
        add("the shard does not begin with <sos>", (np.arange(n) == 0) & (r[:, 0] != sos))
    add("the row does not continue the previous one (rows overlap by one token)", check & (prev[:, -1] != r[:, 0]))
