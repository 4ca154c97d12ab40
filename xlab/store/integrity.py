"""The one judge of a shard store's integrity: every way a store can differ from its manifest, its
format (:mod:`xlab.store.format`) or its tokenizer, as one stream of :class:`Problem`.

:func:`problems` checks at three depths, each a superset of the one before:

- cheap (always): the manifest's own consistency, a given tokenizer (object or file) against the
  manifest's, and every shard's ``.npy`` header (present, readable, dtype and shape). Headers only:
  :meth:`ShardStore.check <xlab.store.reader.ShardStore.check>` raises the first of these before
  training, evaluation and stats start.
- ``deep``: one sequential read of every shard: its sha256, ids below the vocabulary, its non-pad
  tokens, each split's articles and targets; and the store's tokenizer copy.
  :meth:`ShardStore.verify <xlab.store.reader.ShardStore.verify>` raises the first problem of this
  depth (the trainer before its first step, encode before it calls a store up to date).
- ``rows``: also the row structure of each layout (below), during the same read, and the text counts
  of the split files the store was encoded from. ``xlab data validate`` lists every problem of this
  depth. Verify leaves the row structure out: it costs several passes over every row, on the path
  of every training start and every up-to-date check, where the sha256 already catches a changed
  shard.

Row structure of a ``padded`` split: padding only at a row's tail right after the article's
``<eos>``, no row whose targets are all padding, ``<sos>`` only at column 0, and an article's rows
continue one another (a row that does not start with ``<sos>`` begins with the last token of the full
row before it); a shard ends with a complete article. A ``packed`` split: every row overlaps the one
before by one token, the shard's stream starts with ``<sos>``, every later ``<sos>`` follows an
``<eos>`` and every ``<eos>`` is followed by ``<sos>`` or by the padding of the shard's last row, the
only row that may hold padding.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from xlab.fsio import sha256_file
from xlab.store.format import ENCODE_HINT, MANIFEST, ShardEntry, read_npy_header, row_counts, token_dtype
from xlab.store.rows import id_problems, packed_row_problems, padded_row_problems

if TYPE_CHECKING:
    from xlab.store.reader import ShardStore

CHUNK_ROWS = 65536  # rows read at a time (bounded memory)
MAX_ROWS_LISTED = 100  # per problem kind and shard; the rest are counted
REENCODE = f"run `{ENCODE_HINT} --force`"
LIST_AND_REENCODE = f"run `xlab data validate` to list every problem, `{ENCODE_HINT} --force` to rebuild the store"


@dataclass(frozen=True)
class Problem:
    """One way a store differs from what it should be.

    Attributes:
        line: the problem as ``xlab data validate`` lists it, ``"<where>: <what>"`` with ``where`` a
            shard's file inside the store (``train/000001.npy``), ``manifest`` or ``tokenizer``.
        error: the same problem as one self-contained sentence ending in the command that fixes it,
            as :meth:`~xlab.store.reader.ShardStore.check` and ``verify`` raise it.
    """

    line: str
    error: str


def problems(
    store: ShardStore,
    *,
    deep: bool = False,
    rows: bool = False,
    tokenizer: Any = None,
    tokenizer_files: Sequence[Path] = (),
    sources: Optional[Mapping[str, Path]] = None,
    track: Optional[Callable[[list], Iterable]] = None,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[Problem]:
    """Every problem of ``store``, lazily, in the order ``xlab data validate`` lists them: the
    manifest, the tokenizer, each shard in split order, then each split's counts.

    Args:
        store: an open :class:`~xlab.store.reader.ShardStore`.
        deep: read every shard (sha256, ids, counts) and check the store's tokenizer copy.
        rows: also check the row structure and, with ``sources``, the text counts (implies ``deep``).
        tokenizer: a loaded tokenizer (``sha256``, ``vocab_size``) the store must have been encoded with.
        tokenizer_files: tokenizer files that must hold the store's tokenizer (a missing one is
            skipped; when ``deep`` and neither they nor the store's copy exist, that is a problem).
        sources: ``{split: path}`` of the split files (parquet) the store was encoded from; each is
            read when it is there, unchanged (sha256 of the manifest's inputs) and every article it
            rejected is listed, to recompute the manifest's ``text_bytes``, ``text_chars`` and
            ``empty_articles``.
        track: wraps the list of ``(split, ShardEntry)`` as they are checked (a progress bar).
        chunk_rows: rows read at a time.
    """
    deep = deep or rows
    at = f"{store.path}: "
    for line in store.manifest_problems:  # faults of a manifest opened leniently (validate)
        yield Problem(line, f"{store.path / MANIFEST}: {line.removeprefix('manifest: ')}; {LIST_AND_REENCODE}")
    if store.row_len != store.seq_len + 1:
        yield Problem(f"manifest: row_len {store.row_len} != seq_len + 1 ({store.seq_len + 1})",
                      f"{at}row_len {store.row_len} != seq_len + 1; {REENCODE}")  # fmt: skip
    want = token_dtype(store.vocab_size)
    if store.dtype != want:
        yield Problem(f"manifest: dtype {store.dtype} is not {want} for vocabulary {store.vocab_size}",
                      f"{at}dtype {store.dtype} does not fit vocabulary {store.vocab_size}; {REENCODE}")  # fmt: skip
    if tokenizer is not None:
        yield from _tokenizer_object_problems(store, tokenizer)
    yield from _tokenizer_file_problems(store, tokenizer_files, deep)
    entries = [(split, sh) for split in store.splits for sh in store.info.splits[split].shards]
    counts = {s: {"articles": 0, "target_tokens": 0} for s in store.splits}
    for split, sh in track(entries) if track is not None else entries:
        yield from shard_problems(store, split, sh, deep=deep, rows=rows, counts=counts[split], chunk_rows=chunk_rows)
    if not deep:
        return
    for split in store.splits:
        entry = store.info.splits[split]
        for key, found in counts[split].items():
            if found != getattr(entry, key):
                yield Problem(
                    f"manifest: split {split} {key} {getattr(entry, key)}, the shards hold {found}",
                    f"split {split} of {store.path} holds {found} {key.replace('_', ' ')}, the manifest says "
                    f"{getattr(entry, key)}; {LIST_AND_REENCODE}",
                )
        if rows and sources is not None and split in sources:
            yield from _text_count_problems(store, split, Path(sources[split]))


def _tokenizer_object_problems(store: ShardStore, tokenizer: Any) -> Iterator[Problem]:
    if tokenizer.sha256 != store.tokenizer_sha256:
        yield Problem(
            f"tokenizer: sha256 {tokenizer.sha256[:12]} differs from the manifest's {store.tokenizer_sha256[:12]}",
            f"tokenizer sha256 {tokenizer.sha256[:12]} does not match the shard store's "
            f"{store.tokenizer_sha256[:12]} ({store.path}); re-encode with `{ENCODE_HINT} --force`",
        )
    if int(tokenizer.vocab_size) != store.vocab_size:
        yield Problem(
            f"tokenizer: vocabulary {tokenizer.vocab_size} differs from the manifest's {store.vocab_size}",
            f"tokenizer vocabulary {tokenizer.vocab_size} != shard store's {store.vocab_size}; {REENCODE}",
        )


def _tokenizer_file_problems(store: ShardStore, files: Sequence[Path], deep: bool) -> Iterator[Problem]:
    tok = store.info.tokenizer
    copy = store.path / tok.copy if tok.copy else None
    candidates = [Path(p) for p in files] + ([copy] if deep and copy is not None else [])
    present = [p for p in dict.fromkeys(candidates) if p.is_file()]
    if deep and files and not present:
        yield Problem("tokenizer: no tokenizer file found to compare with the manifest",
                      f"no tokenizer file found to compare with shard store {store.path}; {REENCODE}")  # fmt: skip
    for p in present:
        if sha256_file(p) == tok.sha256:
            continue
        if p == copy:
            error = f"{copy} is not the tokenizer the manifest names (sha256 differs); {LIST_AND_REENCODE}"
        else:
            error = (f"shard store {store.path} was encoded with another tokenizer than {p} (trained again "
                     f"since?); run `{ENCODE_HINT}` to rebuild the store")  # fmt: skip
        yield Problem(f"tokenizer: sha256 of {p} differs from the manifest's; re-encode with `{ENCODE_HINT} --force`",
                      error)  # fmt: skip
    if deep and store.info.inputs.get("tokenizer", tok.sha256) != tok.sha256:
        yield Problem("manifest: its tokenizer sha256 differs from the one it was encoded with",
                      f"{store.path / MANIFEST}: its tokenizer sha256 differs from the one it was encoded with; "
                      f"{LIST_AND_REENCODE}")  # fmt: skip


def shard_problems(
    store: ShardStore,
    split: str,
    sh: ShardEntry,
    *,
    deep: bool = False,
    rows: bool = False,
    counts: Optional[dict] = None,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[Problem]:
    """The problems of one shard ``sh`` of ``split`` (see :func:`problems` for the depths); when
    ``deep``, adds the shard's ``articles`` and ``target_tokens`` (:func:`~xlab.store.format.row_counts`)
    to ``counts`` when given."""
    deep = deep or rows
    p, name = store.path / sh.file, sh.file
    if not p.is_file():
        yield Problem(f"{name}: missing", f"missing shard {p}; {REENCODE}")
        return
    changed = Problem(f"{name}: sha256 differs from the manifest (file changed or corrupt)",
                      f"shard {p} changed since it was encoded (sha256 differs from the manifest); {LIST_AND_REENCODE}")  # fmt: skip
    try:
        shape, dtype, fortran, offset = read_npy_header(p)
    except (OSError, ValueError) as e:
        if deep and sha256_file(p) != sh.sha256:
            yield changed
        yield Problem(f"{name}: not a readable .npy file ({e})", f"unreadable shard {p} ({e}); {LIST_AND_REENCODE}")
        return
    want = (sh.rows, store.row_len)
    wrong_shape = (f"shard {p} is {dtype}{list(shape)}, manifest says {store.dtype}[{sh.rows}, {store.row_len}]; "
                   f"{REENCODE}")  # fmt: skip
    if dtype != store.dtype or fortran or len(shape) != 2 or shape[1] != store.row_len:
        if deep and sha256_file(p) != sh.sha256:
            yield changed
        yield Problem(f"{name}: array is {dtype}{list(shape)}, the store needs {store.dtype}[rows, {store.row_len}]",
                      wrong_shape)  # fmt: skip
        return
    head = [] if shape == want else [Problem(f"{name}: {shape[0]} rows, the manifest says {want[0]}", wrong_shape)]
    if not deep:
        yield from head
        return
    try:
        digest, real, found = _read_shard(store, p, offset, store.layout(split), rows, counts, chunk_rows)
    except OSError as e:
        yield Problem(f"{name}: not a readable .npy file ({e})", f"cannot read shard {p} ({e}); {LIST_AND_REENCODE}")
        return
    if digest != sh.sha256:
        yield changed
    yield from head
    if real != sh.real_tokens:
        yield Problem(f"{name}: {real} real tokens, the manifest says {sh.real_tokens}",
                      f"shard {p} holds {real} non-pad tokens, the manifest says {sh.real_tokens}; "
                      f"{LIST_AND_REENCODE}")  # fmt: skip
    for kind, at in found.items():
        listed = ", ".join(map(str, at[:MAX_ROWS_LISTED]))
        more = f" and {len(at) - MAX_ROWS_LISTED} more" if len(at) > MAX_ROWS_LISTED else ""
        where = f"{'row' if len(at) == 1 else 'rows'} {listed}{more}: {kind}"
        yield Problem(f"{name}: {where}", f"shard {p}, {where}; {LIST_AND_REENCODE}")


def _read_shard(store: ShardStore, p: Path, offset: int, layout: str, rows: bool, counts: Optional[dict],
                chunk_rows: int) -> tuple[str, int, dict]:  # fmt: skip
    """One sequential read of shard ``p`` (whose header was checked): its sha256, its non-pad tokens,
    and ``{problem kind: [row numbers]}`` (ids always, the row structure when ``rows``); adds to
    ``counts``."""
    digest, real, found = hashlib.sha256(), 0, defaultdict(list)
    ids = {"pad": store.pad_id, "sos": store.sos_id, "eos": store.eos_id}
    row_bytes = store.row_len * store.dtype.itemsize
    start, prev_last, n_rows = 0, None, (p.stat().st_size - offset) // row_bytes
    with open(p, "rb") as f:
        digest.update(f.read(offset))
        while block := f.read(chunk_rows * row_bytes):
            digest.update(block)
            chunk = np.frombuffer(block, dtype=store.dtype).reshape(-1, store.row_len)
            if chunk.size and int(chunk.max()) >= store.vocab_size:
                id_problems(chunk, start, vocab_size=store.vocab_size, found=found)
            real += int(np.count_nonzero(chunk != store.pad_id))
            if counts is not None:
                a, t = row_counts(chunk, layout=layout, pad_id=store.pad_id, sos_id=store.sos_id, first=start == 0)
                counts["articles"] += a
                counts["target_tokens"] += t
            if rows and layout == "packed":
                packed_row_problems(chunk, start, prev_last, last_row=n_rows - 1, found=found, **ids)
            elif rows:
                padded_row_problems(chunk, start, prev_last, found=found, **ids)
            prev_last, start = chunk[-1], start + len(chunk)
    if rows and prev_last is not None and not ((prev_last == store.pad_id).any() or prev_last[-1] == store.eos_id):
        found["the shard ends inside an article (last row has no <eos>)"].append(n_rows - 1)
    return digest.hexdigest(), real, found


def _text_count_problems(store: ShardStore, split: str, parquet: Path) -> Iterator[Problem]:
    """``text_bytes``, ``text_chars`` and ``empty_articles`` of ``split`` recomputed from the split file
    the store was encoded from (when it is there, unchanged, and every rejected article is listed):
    the UTF-8 bytes and characters of its non-blank articles that the tokenizer did not reject."""
    info = store.split_info(split)
    expected_sha = (store.manifest.get("inputs") or {}).get("splits", {}).get(split)
    rejected = {str(r.get("id")) for r in info.get("rejected", [])}
    if not expected_sha or not parquet.is_file() or len(rejected) != int(info.get("rejected_articles", 0)):
        return
    if sha256_file(parquet) != expected_sha:
        return  # another input: judge the store as it is, the up-to-date check is encode's
    import pyarrow.parquet as pq

    n_bytes = n_chars = n_empty = 0
    # pre_buffer=False: the default keeps every column chunk read until the file is closed
    for batch in pq.ParquetFile(parquet, pre_buffer=False).iter_batches(batch_size=4096, columns=["id", "text"]):
        for i, t in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            if not t or t.isspace():
                n_empty += 1  # (non-blank text always has tokens: the codec falls back to bytes)
            elif str(i) not in rejected:
                n_bytes += len(t.encode("utf-8", "surrogatepass"))
                n_chars += len(t)
    for key, n in (("text_bytes", n_bytes), ("text_chars", n_chars), ("empty_articles", n_empty)):
        if n != int(info.get(key, -1)):
            line = f"manifest: split {split} {key} {info.get(key)}, its split file holds {n}"
            yield Problem(line, f"{store.path}: {line}; {LIST_AND_REENCODE}")
