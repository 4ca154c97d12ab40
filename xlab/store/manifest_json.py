"""Parsing a store's ``manifest.json`` into a :class:`~xlab.store.format.StoreManifest`, strictly or
listing what is wrong.

Two kinds of fault, one rule for each:

- what makes the rows unreadable (not a JSON object, another format or format version, a missing or
  mistyped ``seq_len``, ``dtype``, tokenizer id, ``splits`` or shard list): always a ``ValueError``;
  nothing can be judged without them (``xlab data validate`` exits 2);
- an inconsistency that leaves the rows readable (a count that is not a whole number or disagrees
  with the sum over the shards, a shard listed under another name than ``<split>/NNNNNN.npy`` --
  twice, out of order, or outside the store --, an unknown layout): a ``ValueError`` for readers
  (training, evaluation), a line in ``found`` for the judge (:mod:`xlab.store.integrity`), which
  then checks the file the entry should name, never one outside the store.

The row length (``row_len`` against ``seq_len + 1``) is judged by :func:`xlab.store.integrity.problems`
itself when ``found`` is given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from xlab.config import Layout
from xlab.store.format import FORMAT, FORMAT_VERSION, ShardEntry, SplitEntry, TokenizerEntry, shard_name

if TYPE_CHECKING:
    from xlab.store.format import StoreManifest

COUNTS = ("rows", "articles", "real_tokens", "target_tokens", "text_bytes", "text_chars", "empty_articles",
          "rejected_articles")  # fmt: skip


def parse(cls: type[StoreManifest], d: Any, found: Optional[list[str]] = None) -> StoreManifest:
    """The manifest ``d`` (parsed JSON) as ``cls``; see the module docstring for what raises and
    what, with ``found``, is listed there (``"manifest: ..."`` lines) instead.

    Raises:
        ValueError: the rows cannot be read from this manifest, or (without ``found``) it is
            inconsistent.
    """
    if not isinstance(d, dict):
        raise ValueError(f"a JSON {type(d).__name__}, not an object")
    if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"not an XLab shard store of format version {FORMAT_VERSION} "
            f"(found {d.get('format')!r} v{d.get('format_version')})"
        )
    try:
        tok = d["tokenizer"]
        tokenizer = TokenizerEntry(
            vocab_size=int(tok["vocab_size"]),
            pad_id=int(tok["pad_id"]),
            sos_id=int(tok["sos_id"]),
            eos_id=int(tok["eos_id"]),
            unk_id=int(tok["unk_id"]),
            sha256=str(tok.get("sha256", "")),
            file=str(tok.get("file", "")),
            copy=tok.get("copy"),
        )
        if not isinstance(d["splits"], dict):
            raise TypeError("splits is not an object")
        splits = {str(name): _split(str(name), s, found) for name, s in d["splits"].items()}
        m = cls(
            seq_len=int(d["seq_len"]),
            dtype=str(np.dtype(d["dtype"])),
            tokenizer=tokenizer,
            splits=splits,
            params=dict(d.get("params") or {}),
            inputs=dict(d.get("inputs") or {}),
            stage=str(d.get("stage", "encode")),
            stage_version=int(d.get("stage_version", 1)),
            xlab_version=str(d.get("xlab_version", "")),
        )
        if found is None and int(d.get("row_len", m.row_len)) != m.row_len:
            raise ValueError(f"row_len {d['row_len']} != seq_len + 1")
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None
    return m


def _fault(found: Optional[list[str]], line: str) -> None:
    """Raise ``line`` as a ValueError (strict), or list it."""
    if found is None:
        raise ValueError(line)
    found.append(f"manifest: {line}")


def _count(value: Any, where: str, found: Optional[list[str]]) -> int:
    """``value`` as a count; one that is not a whole number is a fault (taken as 0 when listed)."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        _fault(found, f"{where} is {value!r}, not a whole number")
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        _fault(found, f"{where} is {value!r}, not a whole number")
        return 0


def _split(name: str, s: Any, found: Optional[list[str]]) -> SplitEntry:
    """One split's entry. Shard ``k`` must be the file :func:`~xlab.store.format.shard_name`
    ``(name, k)``: a shard listed twice, out of order or outside the store (``../``) would change
    what the loader deals."""
    if not isinstance(s, dict):
        raise TypeError("a split is not an object")
    shards = []
    for k, sh in enumerate(s["shards"]):
        want = shard_name(name, k)
        if sh.get("file") != want:
            _fault(found, f"shard {k} of split {name} is {sh.get('file')!r}, not {want!r} "
                          "(listed twice, out of order, or outside the store)")  # fmt: skip
        where = f"split {name} shard {k}"
        shards.append(ShardEntry(file=want, rows=_count(sh.get("rows"), f"{where} rows", found),
                                 real_tokens=_count(sh.get("real_tokens", 0), f"{where} real_tokens", found),
                                 sha256=str(sh.get("sha256", ""))))  # fmt: skip
    layout = s.get("layout", "padded")  # stores written before 0.6 are all padded
    if layout not in tuple(Layout):
        _fault(found, f"split {name} has layout {layout!r}, not one of {', '.join(Layout)}")
        layout = Layout.padded.value
    entry = SplitEntry(**{k: _count(s.get(k, 0), f"split {name} {k}", found) for k in COUNTS}, layout=layout,
                       rejected=list(s.get("rejected", [])), shards=shards)  # fmt: skip
    for key in ("rows", "real_tokens"):
        total = sum(getattr(sh, key) for sh in shards)
        if getattr(entry, key) != total:
            _fault(found, f"split {name} {key} {getattr(entry, key)} != {total}, the sum over its shards")
    return entry
