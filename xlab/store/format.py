"""The shard-store format: constants, the token dtype, row packing and :class:`StoreManifest`.

A store is a folder ``shards/<name>/`` with ``manifest.json`` and one subfolder per split holding
``.npy`` token shards. Each shard is a 2-D array ``(rows, seq_len + 1)`` of ``uint16`` (vocabularies
up to 65,536 ids) or ``uint32``; a row is one training sequence: ``inputs = row[:-1]``,
``targets = row[1:]``. An article of ``n`` tokens is stored as ``<sos> t1..tn <eos>`` cut into
``ceil((n + 1) / seq_len)`` windows that start every ``seq_len`` tokens (consecutive windows share
one token, so every token after ``<sos>`` is a target exactly once); the last window is padded
with ``pad_id``. Targets at pad positions become :data:`IGNORE_INDEX`.

That is the ``padded`` layout, the 0.2 format. A split can instead be ``packed``
(:func:`pack_documents`): the articles' ``<sos> t1..tn <eos>`` sequences are concatenated and cut
into windows every ``seq_len`` tokens, so rows hold several articles back to back and only the last
row of a shard is padded. The tokens themselves mark the documents (each begins with ``<sos>``), so
the format needs no side file; a target that is ``<sos>`` (the step from one article into the next)
is ignored like a pad target. Only the train split is ever packed (:func:`split_layout`): evaluation
splits stay padded so that validation and test losses mean the same thing for every store.

The ``.npy`` header (dtype and shape) makes every shard self-describing, after llm.c's token files;
the dtype follows the vocabulary size as in Megatron. :class:`StoreManifest` is the one place the
manifest is built and parsed: encode, merge, :func:`~xlab.store.writer.write_store`, the reader,
the tests and the benchmarks all go through it, so a store written anywhere validates everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from xlab.config import Layout

FORMAT = "xlab-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_COPY = "tokenizer.model"  # the store's own copy of its tokenizer
IGNORE_INDEX = -100  # the loss's ignore index for targets at pad positions (torch's default)
ENCODE_HINT = "xlab data encode"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id below ``vocab_size``.

    ``uint16`` when ``vocab_size <= 65536`` (2 bytes per token), else ``uint32``.

    Raises:
        ValueError: ``vocab_size <= 0``.
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def real_tokens(rows: np.ndarray, pad_id: int) -> int:
    """Non-pad tokens of ``rows`` ``(n, seq_len + 1)``, every column counted (the manifest's
    ``real_tokens`` of a shard; the row overlap makes it larger than the number of targets)."""
    return int(np.count_nonzero(rows != pad_id))


def target_tokens(articles: Sequence[Sequence[int]]) -> int:
    """Targets the articles give a model: ``n + 1`` per article of ``n`` text tokens (each text token
    and the ``<eos>``; ``<sos>`` is never a target)."""
    return sum(len(a) + 1 for a in articles)


def to_targets(targets: np.ndarray, pad_id: int, sos_id: Optional[int] = None) -> np.ndarray:
    """``targets`` (any integer shape) as int64 with :data:`IGNORE_INDEX` where the pad id is, and
    where ``sos_id`` is when given (in a packed row the target after an article's ``<eos>`` is the
    next article's ``<sos>``, which no context predicts; a padded row never has ``<sos>`` as target)."""
    t = np.asarray(targets).astype(np.int64, copy=False)
    ignore = t == pad_id
    if sos_id is not None:
        ignore |= t == sos_id
    return np.where(ignore, IGNORE_INDEX, t)


def row_counts(rows: np.ndarray, *, layout: str, pad_id: int, sos_id: int, first: bool) -> tuple[int, int]:
    """``(articles, target_tokens)`` of consecutive rows ``(n, seq_len + 1)`` of one shard of a split
    of ``layout``; ``first``: ``rows[0]`` is the shard's first row. Targets are the non-pad, non-``<sos>``
    tokens after column 0; articles are the ``<sos>`` tokens, counted once although consecutive packed
    rows share a token."""
    tail = rows[:, 1:]
    sos_after = int(np.count_nonzero(tail == sos_id))
    targets = int(np.count_nonzero(tail != pad_id)) - sos_after
    if layout == "packed":
        return sos_after + int(first and len(rows) > 0 and rows[0, 0] == sos_id), targets
    return int(np.count_nonzero(rows[:, 0] == sos_id)), targets


def split_layout(split: str, layout: str) -> str:
    """The layout a store of ``layout`` gives ``split``: ``packed`` applies to ``train`` only.

    Packing is a training-throughput choice; val, test and predict stay ``padded``, so every token of
    an evaluation split is scored with the same context (the preceding tokens of its own window)
    whichever layout the training rows use, and losses and bits per byte compare across stores.

    Raises:
        ValueError: ``layout`` is not a :class:`~xlab.config.Layout`.
    """
    if layout not in tuple(Layout):
        raise ValueError(f"unknown shards.layout {layout!r}: use padded or packed")
    return layout if split == "train" else "padded"


def _framed(
    ids: Sequence[Sequence[int]], *, sos_id: int, eos_id: int, vocab_size: int, extra: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, type]:
    """``(flat, n, start, idt)``: the articles as one stream ``<sos> t <eos> <sos> ...`` with ``extra``
    trailing slots (filled by the caller), their text lengths ``n`` and the offsets of their ``<sos>``.

    Raises:
        ValueError: an empty article or an id outside ``[0, vocab_size)`` (never wrapped).
    """
    n = np.fromiter((len(a) for a in ids), dtype=np.int64, count=len(ids))
    if (n == 0).any():
        raise ValueError("pack_articles: empty article (skip it before packing)")
    total = int(n.sum())
    # Ids and offsets in int32 while they fit (all practical stores): a quarter of the memory of
    # Python ints, half of int64, for the few arrays of a unit's size below.
    big = max(total + 2 * len(n) + extra, vocab_size) >= 2**31
    idt = np.int64 if big else np.int32
    parts = [np.asarray(a, dtype=np.int64) for a in ids]  # int64 first: a negative id must not wrap
    text = parts[0] if len(parts) == 1 else np.concatenate(parts)
    del parts
    if total and (text.min() < 0 or text.max() >= vocab_size):
        bad = int(text.max() if text.max() >= vocab_size else text.min())
        raise ValueError(f"token id {bad} outside the vocabulary [0, {vocab_size})")
    text = text.astype(idt, copy=False)
    full_len = n + 2
    start = np.zeros(len(n), dtype=np.int64)  # offset of each article's <sos> in `flat`
    np.cumsum(full_len[:-1], out=start[1:])
    flat_len = int(full_len.sum())
    flat = np.empty(flat_len + extra, dtype=idt)
    is_text = np.ones(flat_len, dtype=bool)
    is_text[start] = False
    is_text[start + n + 1] = False
    flat[:flat_len][is_text] = text
    flat[start] = sos_id
    flat[start + n + 1] = eos_id
    return flat, n, start, idt


def pack_documents(
    ids: Sequence[Sequence[int]], seq_len: int, *, sos_id: int, eos_id: int, pad_id: int, vocab_size: int
) -> np.ndarray:
    """Pack tokenized articles back to back into fixed-length rows (the ``packed`` layout).

    Args: as :func:`pack_articles`.

    Returns:
        ``(ceil((L - 1) / seq_len), seq_len + 1)`` array of :func:`token_dtype` (vocab_size), where
        ``full`` is every article's ``[sos] + t + [eos]`` in order and ``L = len(full)``: row ``k`` holds
        ``full[k * seq_len : k * seq_len + seq_len + 1]``, the last row padded. Every token of
        ``full`` but the first is a target exactly once, as in the padded layout; rows are cut
        without regard to article boundaries (an article continues in the next row).

    Raises:
        ValueError: an article is empty or an id is outside ``[0, vocab_size)``.
    """
    dtype = token_dtype(vocab_size)
    row_len = seq_len + 1
    if len(ids) == 0:
        return np.empty((0, row_len), dtype=dtype)
    flat, _, _, idt = _framed(ids, sos_id=sos_id, eos_id=eos_id, vocab_size=vocab_size, extra=row_len)
    flat_len = len(flat) - row_len
    flat[flat_len:] = pad_id
    rows = -(-(flat_len - 1) // seq_len)
    idx = (np.arange(rows, dtype=idt) * seq_len)[:, None] + np.arange(row_len, dtype=idt)[None, :]
    return flat[idx].astype(dtype, copy=False)


def pack_articles(
    ids: Sequence[Sequence[int]], seq_len: int, *, sos_id: int, eos_id: int, pad_id: int, vocab_size: int
) -> np.ndarray:
    """Pack tokenized articles into fixed-length rows.

    Args:
        ids: one list of text token ids per article, each non-empty (callers skip empty articles).
        seq_len: tokens per training sequence; rows hold ``seq_len + 1`` tokens.
        sos_id, eos_id, pad_id: special ids framing and padding each article.
        vocab_size: every id must be in ``[0, vocab_size)``.

    Returns:
        ``(sum_a ceil((n_a + 1) / seq_len), seq_len + 1)`` array of :func:`token_dtype` (vocab_size),
        articles in the given order, row ``k`` of an article holding
        ``full[k * seq_len : k * seq_len + seq_len + 1]`` of ``full = [sos] + t + [eos]``, padded.

    Raises:
        ValueError: an article is empty or an id is outside ``[0, vocab_size)`` (never wrapped).
    """
    dtype = token_dtype(vocab_size)
    row_len = seq_len + 1
    if len(ids) == 0:
        return np.empty((0, row_len), dtype=dtype)
    # One padding window past the end so every gather below stays in bounds.
    flat, n, start, idt = _framed(ids, sos_id=sos_id, eos_id=eos_id, vocab_size=vocab_size, extra=row_len)
    flat[len(flat) - row_len :] = pad_id
    full_len = n + 2

    r = (n + seq_len) // seq_len  # rows per article: ceil((n + 1) / seq_len)
    art = np.repeat(np.arange(len(n)), r)  # article of each row
    first_row = np.zeros(len(n), dtype=np.int64)
    np.cumsum(r[:-1], out=first_row[1:])
    k = np.arange(len(art)) - first_row[art]  # window index within its article
    row_start = (start[art] + k * seq_len).astype(idt)
    row_end = (start[art] + full_len[art]).astype(idt)  # one past the article's <eos>
    idx = row_start[:, None] + np.arange(row_len, dtype=idt)[None, :]
    rows = flat[idx]
    rows[idx >= row_end[:, None]] = pad_id
    return rows.astype(dtype, copy=False)


def pack(ids: Sequence[Sequence[int]], seq_len: int, *, layout: str, **ids_kw: int) -> np.ndarray:
    """Rows of ``ids`` in ``layout``: :func:`pack_articles` (``padded``) or :func:`pack_documents`
    (``packed``); keyword ids as theirs (sos_id, eos_id, pad_id, vocab_size).

    Raises:
        ValueError: an unknown layout, an empty article or an id outside the vocabulary.
    """
    if layout == "padded":
        return pack_articles(ids, seq_len, **ids_kw)
    if layout == "packed":
        return pack_documents(ids, seq_len, **ids_kw)
    raise ValueError(f"unknown shards.layout {layout!r}: use padded or packed")


def read_npy_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """``(shape, dtype, fortran_order, data_offset)`` of a ``.npy`` file, reading only its header.

    Also checks that the file's size is exactly the header plus ``prod(shape) * itemsize`` bytes.

    Raises:
        ValueError: not a ``.npy`` file, a damaged header, or a file shorter (truncated) or longer
            than its header says.
        OSError: the file cannot be opened.
    """
    fmt = np.lib.format
    with open(path, "rb") as f:
        try:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = fmt.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - numpy parses the header with Python's tokenizer
            raise ValueError(f"damaged .npy header ({type(e).__name__}: {e})") from None
        offset = f.tell()
        size = os.fstat(f.fileno()).st_size
    shape, dtype = tuple(shape), np.dtype(dtype)
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != need:
        raise ValueError(
            f"{'truncated' if size < need else 'trailing bytes'}: the file has {size:,} bytes, its header says {need:,}"
        )
    return shape, dtype, bool(fortran), offset


# ------------------------------------------------------------------------------------ manifest
@dataclass
class ShardEntry:
    """One shard file of a split: its path relative to the store, rows, non-pad tokens, sha256."""

    file: str
    rows: int
    real_tokens: int
    sha256: str


@dataclass
class SplitEntry:
    """A split's totals and shards. ``target_tokens`` (tokens a model predicts) and ``text_bytes``
    (UTF-8 bytes of the text) give bits per byte; ``rejected`` lists at most a bounded number of the
    articles the tokenizer refused (``rejected_articles`` counts them all)."""

    rows: int = 0
    articles: int = 0
    real_tokens: int = 0
    target_tokens: int = 0
    text_bytes: int = 0
    text_chars: int = 0
    empty_articles: int = 0
    rejected_articles: int = 0
    layout: str = Layout.padded.value  # a Layout value; see split_layout
    rejected: list = field(default_factory=list)
    shards: list[ShardEntry] = field(default_factory=list)

    def add_shard(
        self, shard: ShardEntry, *, articles: int, target_tokens: int, text_bytes: int = 0, text_chars: int = 0
    ) -> None:
        """Append ``shard`` and add its counts to the split's totals."""
        self.shards.append(shard)
        self.rows += shard.rows
        self.real_tokens += shard.real_tokens
        self.articles += articles
        self.target_tokens += target_tokens
        self.text_bytes += text_bytes
        self.text_chars += text_chars


@dataclass
class TokenizerEntry:
    """The tokenizer a store was encoded with: its ids, sha256, original path and the store's copy."""

    vocab_size: int
    pad_id: int
    sos_id: int
    eos_id: int
    unk_id: int
    sha256: str = ""
    file: str = ""
    copy: Optional[str] = TOKENIZER_COPY

    @classmethod
    def of(cls, tok: Any, file: str | os.PathLike = "") -> TokenizerEntry:
        """The entry of an XLab :class:`~xlab.tokenizer.Tokenizer` (its ids and sha256)."""
        return cls(
            vocab_size=int(tok.vocab_size),
            pad_id=int(tok.pad_id),
            sos_id=int(tok.sos_id),
            eos_id=int(tok.eos_id),
            unk_id=int(tok.unk_id),
            sha256=str(tok.sha256),
            file=str(file),
        )


@dataclass
class StoreManifest:
    """``manifest.json`` of a shard store: written last, so a store without one is incomplete.

    ``params``, ``inputs`` and ``stage_version`` are what the encode stage's up-to-date check compares
    (parameters, input hashes, the version of the stage's output format and code, 1 when absent: the
    stores of XLab 0.6 and earlier); ``xlab_version`` is recorded for information; ``dtype`` is a numpy dtype name and must be :func:`token_dtype` of the vocabulary.
    """

    seq_len: int
    dtype: str
    tokenizer: TokenizerEntry
    splits: dict[str, SplitEntry]
    params: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    stage: str = "encode"
    stage_version: int = 1
    xlab_version: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def row_len(self) -> int:
        """Tokens per stored row: ``seq_len + 1`` (inputs and targets overlap by all but one)."""
        return self.seq_len + 1

    def to_json(self) -> dict:
        """The manifest as plain JSON containers, keys in a stable order."""
        d = asdict(self)
        head = {k: d.pop(k) for k in ("format", "format_version", "stage", "stage_version", "xlab_version", "seq_len")}
        return {**head, "row_len": self.row_len, **d}

    @classmethod
    def from_json(cls, d: Any, found: Optional[list[str]] = None) -> StoreManifest:
        """Parse :meth:`to_json` output (unknown keys are ignored); see
        :func:`xlab.store.manifest_json.parse`.

        Args:
            found: None to refuse any inconsistency; a list to collect those that leave the
                manifest readable (counts, shard names, the row length) as ``xlab data validate``
                lines instead, so that they are listed beside the store's other problems.

        Raises:
            ValueError: not an object, another format or version, a missing or mistyped field
                needed to read rows (seq_len, dtype, the tokenizer's ids, the splits and their
                shards), or (without ``found``) any other inconsistency.
        """
        from xlab.store.manifest_json import parse

        return parse(cls, d, found)

    def write(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/manifest.json`` atomically; return its path."""
        from xlab.fsio import atomic_write_json

        path = Path(folder) / MANIFEST
        atomic_write_json(path, self.to_json())
        return path


def shard_name(split: str, k: int) -> str:
    """The file of shard ``k`` of ``split``, relative to the store: ``<split>/<k:06d>.npy``."""
    return f"{split}/{k:06d}.npy"
