"""The shard store: XLab's one contract between the data side and the training side.

A store is a folder ``shards/<name>/`` with ``manifest.json`` and one subfolder per split holding
``.npy`` token shards. Each shard is a 2-D array ``(rows, seq_len + 1)`` of ``uint16`` (vocabularies
up to 65,536 ids) or ``uint32``; a row is one training sequence: ``inputs = row[:-1]``,
``targets = row[1:]``. An article of ``n`` tokens is stored as ``<sos> t1..tn <eos>`` cut into
``ceil((n + 1) / seq_len)`` windows that start every ``seq_len`` tokens (consecutive windows share
one token, so every token after ``<sos>`` is a target exactly once); the last window is padded
with ``pad_id``. Targets at pad positions become :data:`IGNORE_INDEX`.

The ``.npy`` header (dtype and shape) makes every shard self-describing, after llm.c's token files;
the dtype follows the vocabulary size as in Megatron; the seeded per-epoch permutation of all rows
follows OLMo's deterministic, resumable data order.

This module imports numpy at the top; torch only where tensors are made.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from xlab.errors import XLabError
from xlab.io import atomic_path, sha256_file

FORMAT = "xlab-shards"
FORMAT_VERSION = 1
IGNORE_INDEX = -100  # the loss's ignore index for targets at pad positions (torch's default)
MANIFEST = "manifest.json"
ENCODE_HINT = "xlab data encode"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id below ``vocab_size``.

    ``uint16`` when ``vocab_size <= 65536`` (2 bytes per token), else ``uint32``.
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def rows_per_article(n_tokens, seq_len: int):
    """Rows filled by an article of ``n_tokens`` text tokens (int or int array): ``ceil((n + 1) / seq_len)``."""
    return (n_tokens + seq_len) // seq_len


def pack_articles(ids: Sequence[Sequence[int]], seq_len: int, *, sos_id: int, eos_id: int, pad_id: int,
                  vocab_size: int) -> np.ndarray:
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
    import itertools

    dtype = token_dtype(vocab_size)
    row_len = seq_len + 1
    n = np.fromiter((len(a) for a in ids), dtype=np.int64, count=len(ids))
    if len(n) == 0:
        return np.empty((0, row_len), dtype=dtype)
    if (n == 0).any():
        raise ValueError("pack_articles: empty article (skip it before packing)")
    total = int(n.sum())
    text = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=total)
    if total and (text.min() < 0 or text.max() >= vocab_size):
        bad = int(text.max() if text.max() >= vocab_size else text.min())
        raise ValueError(f"token id {bad} outside the vocabulary [0, {vocab_size})")
    full_len = n + 2
    start = np.zeros(len(n), dtype=np.int64)  # offset of each article's <sos> in `flat`
    np.cumsum(full_len[:-1], out=start[1:])
    flat_len = int(full_len.sum())
    # One padding window past the end so every gather below stays in bounds.
    flat = np.full(flat_len + row_len, pad_id, dtype=np.int64)
    is_text = np.ones(flat_len, dtype=bool)
    is_text[start] = False
    is_text[start + n + 1] = False
    flat[:flat_len][is_text] = text
    flat[start] = sos_id
    flat[start + n + 1] = eos_id

    r = (n + seq_len) // seq_len  # rows per article
    art = np.repeat(np.arange(len(n)), r)  # article of each row
    first_row = np.zeros(len(n), dtype=np.int64)
    np.cumsum(r[:-1], out=first_row[1:])
    k = np.arange(len(art)) - first_row[art]  # window index within its article
    row_start = start[art] + k * seq_len
    row_end = start[art] + full_len[art]  # one past the article's <eos>
    idx = row_start[:, None] + np.arange(row_len)[None, :]
    rows = flat[idx]
    rows[idx >= row_end[:, None]] = pad_id
    return rows.astype(dtype, copy=False)


def write_shard(path: str | os.PathLike, rows: np.ndarray) -> str:
    """Write ``rows`` as a ``.npy`` file atomically; return the file's hex sha256."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(rows), allow_pickle=False)
        digest = sha256_file(tmp)
    return digest


def read_npy_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """``(shape, dtype, fortran_order, data_offset)`` of a ``.npy`` file, reading only its header.

    Also checks that the file's size is exactly the header plus ``prod(shape) * itemsize`` bytes.

    Raises:
        ValueError: not a ``.npy`` file, a damaged header, or a file shorter (truncated) or longer
            than its header says.
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
        except Exception as e:  # numpy parses the header with Python's tokenizer: TokenError, SyntaxError, ...
            raise ValueError(f"damaged .npy header ({type(e).__name__}: {e})") from None
        offset = f.tell()
        size = os.fstat(f.fileno()).st_size
    shape, dtype = tuple(shape), np.dtype(dtype)
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != need:
        raise ValueError(f"{'truncated' if size < need else 'trailing bytes'}: the file has {size:,} bytes, "
                         f"its header says {need:,}")
    return shape, dtype, bool(fortran), offset


def write_store(path: str | os.PathLike, splits: dict[str, Sequence[Sequence[int]]], *, seq_len: int,
                vocab_size: int, pad_id: int = 0, sos_id: int = 1, eos_id: int = 2, unk_id: int = 3,
                articles_per_shard: int = 1024, tokenizer_sha256: str = "", tokenizer_file: str = "") -> dict:
    """Write a complete store from already-tokenized articles (small stores: tests, tools).

    ``xlab data encode`` is the way to build a store from text; this helper writes the same
    format from token lists. Empty articles are skipped; ``text_bytes``/``text_chars`` are 0.

    Args:
        path: the store folder (created; existing shards of the same names are replaced).
        splits: split name -> list of articles, each a list of text token ids.

    Returns:
        The manifest written to ``path/manifest.json``.
    """
    from xlab.io import atomic_write_json

    path = Path(path)
    dtype = token_dtype(vocab_size)
    out_splits = {}
    for split, articles in splits.items():
        articles = [a for a in articles if len(a)]
        info = {"rows": 0, "articles": len(articles), "real_tokens": 0, "target_tokens": 0, "text_bytes": 0,
                "text_chars": 0, "shards": []}
        for k, a in enumerate(range(0, max(len(articles), 1), articles_per_shard)):
            chunk = articles[a:a + articles_per_shard]
            rows = (pack_articles(chunk, seq_len, sos_id=sos_id, eos_id=eos_id, pad_id=pad_id, vocab_size=vocab_size)
                    if chunk else np.empty((0, seq_len + 1), dtype=dtype))
            rel = f"{split}/{k:06d}.npy"
            digest = write_shard(path / rel, rows)
            real = int(np.count_nonzero(rows != pad_id))
            info["shards"].append({"file": rel, "rows": int(rows.shape[0]), "real_tokens": real, "sha256": digest})
            info["rows"] += int(rows.shape[0])
            info["real_tokens"] += real
            info["target_tokens"] += sum(len(x) + 1 for x in chunk)
        out_splits[split] = info
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "xlab_version": _version(), "seq_len": int(seq_len),
        "row_len": int(seq_len) + 1, "dtype": dtype.name,
        "tokenizer": {"file": tokenizer_file, "sha256": tokenizer_sha256, "vocab_size": int(vocab_size),
                      "pad_id": pad_id, "sos_id": sos_id, "eos_id": eos_id, "unk_id": unk_id},
        "splits": out_splits, "params": {"seq_len": int(seq_len)}, "inputs": {},
    }
    atomic_write_json(path / MANIFEST, manifest)
    return manifest


def _version() -> str:
    import xlab

    return xlab.__version__


class ShardStore:
    """Read access to a shard store folder (``manifest.json`` + ``<split>/NNNNNN.npy``).

    Rows are read with positioned reads (``os.pread``) rather than a memory map: pages a memory
    map touched stay in the process's resident set until it is unmapped, whereas ``pread`` copies
    only the requested rows and leaves the file's pages to the kernel's page cache, so resident
    memory stays bounded however much of the store is read.

    Raises:
        XLabError: the folder or its manifest is missing, unreadable or of another format.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            if (self.path / ".work" / "job.json").is_file():
                # Encoding began but did not finish: a killed run, or scale-out parts not yet merged.
                raise XLabError(f"the shard store at {self.path} is not complete yet (no {MANIFEST}); rerun "
                                f"`{ENCODE_HINT}` to finish it, or after --num-shards parts, run the missing "
                                f"parts and then `xlab data merge`")
            raise XLabError(f"no shard store at {self.path} (missing {MANIFEST}); run `{ENCODE_HINT}` first")
        try:
            with open(mpath, encoding="utf-8") as f:
                self.manifest: dict = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise XLabError(f"unreadable shard manifest {mpath}: {e}; run `{ENCODE_HINT} --force`") from None
        m = self.manifest
        if not isinstance(m, dict):
            raise XLabError(f"{mpath} is not a shard store manifest (a JSON {type(m).__name__}, not an object); "
                            f"run `{ENCODE_HINT} --force`")
        if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
            raise XLabError(f"{mpath} is not an XLab shard store of format version {FORMAT_VERSION} "
                            f"(found {m.get('format')!r} v{m.get('format_version')}); run `{ENCODE_HINT} --force`")
        try:
            tok = m["tokenizer"]
            self.seq_len: int = int(m["seq_len"])
            self.row_len: int = int(m["row_len"])
            self.dtype: np.dtype = np.dtype(m["dtype"])
            self.vocab_size: int = int(tok["vocab_size"])
            self.pad_id: int = int(tok["pad_id"])
            self.sos_id: int = int(tok["sos_id"])
            self.eos_id: int = int(tok["eos_id"])
            self.unk_id: int = int(tok["unk_id"])
            self.tokenizer_sha256: str = str(tok["sha256"])
            self._splits: dict = m["splits"]
            if not isinstance(self._splits, dict) or not all(isinstance(i, dict) for i in self._splits.values()):
                raise ValueError("splits is not an object of split objects")
            self._offsets = {}  # split -> cumulative row offsets, len(shards) + 1
            for s, info in self._splits.items():
                for sh in info["shards"]:
                    if not isinstance(sh.get("file"), str):
                        raise ValueError(f"a shard of split {s!r} has no file name")
                counts = [int(sh["rows"]) for sh in info["shards"]]
                self._offsets[s] = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise XLabError(f"malformed shard manifest {mpath} ({e}); run `{ENCODE_HINT} --force`") from None
        self._fds: dict[tuple[str, int], tuple[int, int]] = {}  # (split, shard) -> (fd, data offset)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------ metadata
    @property
    def splits(self) -> list[str]:
        """Split names in the store: train, val, test, predict first, then any other, by name."""
        from xlab.config import SPLITS

        return sorted(self._splits, key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))

    def split_info(self, split: str) -> dict:
        """The manifest entry of ``split`` (rows, articles, real_tokens, target_tokens, text_bytes,
        text_chars, shards). Raises XLabError for an unknown split."""
        if split not in self._splits:
            raise XLabError(f"split {split!r} not in shard store {self.path} (has {', '.join(self._splits)})")
        return self._splits[split]

    def rows(self, split: str) -> int:
        """Number of rows of ``split``."""
        self.split_info(split)
        return int(self._offsets[split][-1])

    def shard_paths(self, split: str) -> list[Path]:
        """Paths of ``split``'s shard files in order."""
        return [self.path / sh["file"] for sh in self.split_info(split)["shards"]]

    @property
    def tokenizer_path(self) -> Path | None:
        """The tokenizer model: the copy inside the store if present, else the manifest's original
        path if it still exists, else None."""
        tok = self.manifest["tokenizer"]
        for p in (self.path / str(tok.get("copy", "tokenizer.model")), Path(str(tok.get("file", "")))):
            if p.is_file():
                return p
        return None

    def check(self, tokenizer: Any = None) -> None:
        """Cheap consistency checks, run by the trainer before it starts.

        Checks every shard file exists with the manifest's shape ``(rows, seq_len + 1)`` and the
        store dtype (from the ``.npy`` headers only), that the dtype is the one the vocabulary needs,
        and, when ``tokenizer`` is given, that its sha256 and vocabulary size match the manifest.
        Full verification (hashes, ids, row structure) is ``xlab data validate``.

        Raises:
            XLabError: naming the first problem found and the command that fixes it.
        """
        fix = f"run `{ENCODE_HINT} --force`"
        if self.row_len != self.seq_len + 1:
            raise XLabError(f"{self.path}: row_len {self.row_len} != seq_len + 1; {fix}")
        if self.dtype != token_dtype(self.vocab_size):
            raise XLabError(f"{self.path}: dtype {self.dtype} does not fit vocabulary {self.vocab_size}; {fix}")
        if tokenizer is not None:
            if tokenizer.sha256 != self.tokenizer_sha256:
                raise XLabError(f"tokenizer sha256 {tokenizer.sha256[:12]} does not match the shard store's "
                                f"{self.tokenizer_sha256[:12]} ({self.path}); re-encode with `{ENCODE_HINT} --force`")
            if int(tokenizer.vocab_size) != self.vocab_size:
                raise XLabError(f"tokenizer vocabulary {tokenizer.vocab_size} != shard store's {self.vocab_size}; {fix}")
        for split in self.splits:
            for sh in self.split_info(split)["shards"]:
                p = self.path / sh["file"]
                if not p.is_file():
                    raise XLabError(f"missing shard {p}; {fix}")
                try:
                    shape, dtype, fortran, _ = read_npy_header(p)
                except (OSError, ValueError) as e:
                    raise XLabError(f"unreadable shard {p} ({e}); run `xlab data validate` to list every "
                                    f"problem, `{ENCODE_HINT} --force` to rebuild the store") from None
                if dtype != self.dtype or shape != (int(sh["rows"]), self.row_len) or fortran:
                    raise XLabError(f"shard {p} is {dtype}{list(shape)}, manifest says "
                                    f"{self.dtype}[{sh['rows']}, {self.row_len}]; {fix}")

    # ------------------------------------------------------------------------------ reading
    def _fd(self, split: str, shard: int) -> tuple[int, int]:
        key = (split, shard)
        got = self._fds.get(key)
        if got is None:
            with self._lock:
                got = self._fds.get(key)
                if got is None:
                    p = self.path / self._splits[split]["shards"][shard]["file"]
                    try:
                        _, _, _, offset = read_npy_header(p)
                        got = (os.open(p, os.O_RDONLY), offset)
                    except (OSError, ValueError) as e:
                        raise XLabError(f"cannot read shard {p} ({e}); run `xlab data validate`") from None
                    self._fds[key] = got
        return got

    def read_rows(self, split: str, indices: np.ndarray) -> np.ndarray:
        """Gather rows of ``split`` by global row index.

        Args:
            indices: ``(k,)`` integer array of row indices in ``[0, rows(split))``, any order.

        Returns:
            ``(k, seq_len + 1)`` array in the store dtype, ``out[i] = row indices[i]``.

        Raises:
            IndexError: an index out of range.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self.split_info(split)
        offsets = self._offsets[split]
        total = int(offsets[-1])
        out = np.empty((len(indices), self.row_len), dtype=self.dtype)
        if len(indices) == 0:
            return out
        if indices.min() < 0 or indices.max() >= total:
            raise IndexError(f"row index out of range [0, {total}) for split {split!r}")
        row_bytes = self.row_len * self.dtype.itemsize
        # Read in file order (sorted), then scatter back to the requested order.
        order = np.argsort(indices, kind="stable")
        sidx = indices[order]
        shard_of = np.searchsorted(offsets, sidx, side="right") - 1
        buf = bytearray(len(indices) * row_bytes)
        view = memoryview(buf)
        pos = 0
        i = 0
        n = len(sidx)
        while i < n:
            s = int(shard_of[i])
            j = int(np.searchsorted(shard_of, s, side="right"))
            fd, data_offset = self._fd(split, s)
            local = sidx[i:j] - offsets[s]
            # Coalesce runs of consecutive rows into one read (store-order reads become one call).
            breaks = np.flatnonzero(np.diff(local) != 1) + 1
            starts = np.concatenate([[0], breaks])
            ends = np.concatenate([breaks, [len(local)]])
            for a, b in zip(starts.tolist(), ends.tolist()):
                nbytes = (b - a) * row_bytes
                got = os.preadv(fd, [view[pos:pos + nbytes]], data_offset + int(local[a]) * row_bytes)
                if got != nbytes:
                    raise XLabError(f"short read in shard {s} of split {split!r}; run `xlab data validate`")
                pos += nbytes
            i = j
        sorted_rows = np.frombuffer(buf, dtype=self.dtype).reshape(n, self.row_len)
        out[order] = sorted_rows
        return out

    def close(self) -> None:
        """Close the open shard files (reading again reopens them)."""
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):  # file descriptors do not travel to other processes
        d = dict(self.__dict__)
        d["_fds"] = {}
        d["_lock"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ShardStore({str(self.path)!r}, seq_len={self.seq_len}, dtype={self.dtype}, splits={self.splits})"


class ShardLoader:
    """Seeded, shuffled, resumable batches of ``(inputs, targets)`` from one split of a store.

    Each epoch ``e`` orders the split's ``N`` rows by ``numpy.random.default_rng([seed, e])
    .permutation(N)`` (store order when ``shuffle=False``); the first
    ``len(self) * batch_size * world_size`` rows of that order are dealt to the ranks round-robin
    (rank ``r`` takes positions ``r, r + world_size, ...``), so ranks read disjoint rows and all get
    ``len(self)`` batches; the incomplete remainder is dropped. The order depends only on
    ``(seed, epoch)``, so ``(epoch, position)`` fully determines what comes next.

    Args:
        store: a :class:`ShardStore`.
        split: split name, e.g. ``"train"``.
        batch_size: rows per batch per rank.
        seed: permutation seed.
        shuffle: permute rows each epoch; False gives store order.
        rank, world_size: this process's rank and the number of data-parallel ranks.
        device: ``"cpu"`` or a CUDA device; on CUDA batches are read by a background prefetch
            thread into pinned memory and copied with non-blocking transfers.
        prefetch: batches the background thread may read ahead.
        background: use the prefetch thread (default: only on CUDA).

    Iterating yields the remaining batches of the current epoch, each ``(inputs, targets)``, both
    ``torch.int64`` of shape ``(batch_size, seq_len)``: ``inputs = row[:-1]``, ``targets = row[1:]``
    with :data:`IGNORE_INDEX` where the target is the pad id. After the last batch the epoch
    advances and the position resets to 0.

    Raises:
        XLabError: unknown split, or a split too small for one batch per rank.
    """

    def __init__(self, store: ShardStore, split: str, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, device: Any = "cpu", prefetch: int = 4,
                 background: bool | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.store = store
        self.split = split
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.device = device
        self.prefetch = max(1, int(prefetch))
        self.background = _is_cuda(device) if background is None else bool(background)
        self.num_rows = store.rows(split)
        self._len = self.num_rows // (self.batch_size * self.world_size)
        if self._len == 0:
            raise XLabError(f"split {split!r} of {store.path} has {self.num_rows} rows, fewer than one batch of "
                            f"{self.batch_size} x {self.world_size} ranks; lower the batch size or encode more data")
        self.epoch = 0
        self.position = 0
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        return self._len

    def state_dict(self) -> dict:
        """``{"epoch", "position", "seed"}``: enough to continue exactly where this loader is."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, d: dict) -> None:
        """Restore :meth:`state_dict` output; the next batch is the one the saved loader would yield."""
        self.epoch = int(d["epoch"])
        self.position = int(d["position"])
        self.seed = int(d.get("seed", self.seed))
        if not 0 <= self.position <= self._len:
            raise ValueError(f"position {self.position} outside [0, {self._len}]")

    def rank_order(self, epoch: int) -> np.ndarray:
        """This rank's row indices for ``epoch``: ``(len(self) * batch_size,)`` int32 (int64 beyond
        2**31 rows)."""
        if self._order_epoch != epoch:
            used = self._len * self.batch_size * self.world_size
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            else:
                perm = np.arange(self.num_rows, dtype=np.int64)
            order = perm[:used][self.rank::self.world_size]
            # int32 halves the resident order for stores under 2**31 rows (all practical ones)
            self._order = order.astype(np.int32 if self.num_rows < 2**31 else np.int64)
            self._order_epoch = epoch
        return self._order

    def batch_indices(self, epoch: int, position: int) -> np.ndarray:
        """Row indices of batch ``position`` of ``epoch`` for this rank: ``(batch_size,)`` integers."""
        order = self.rank_order(epoch)
        return order[position * self.batch_size:(position + 1) * self.batch_size]

    def make_batch(self, indices: np.ndarray):
        """``(inputs, targets)`` int64 CPU tensors ``(len(indices), seq_len)`` for these rows."""
        import torch

        rows = self.store.read_rows(self.split, indices).astype(np.int64)
        inputs = torch.from_numpy(rows[:, :-1])
        tgt = rows[:, 1:]  # a copy is not needed: `rows` is ours and inputs never alias the last column
        targets = torch.from_numpy(np.where(tgt == self.store.pad_id, IGNORE_INDEX, tgt))
        return inputs, targets

    def _steps(self) -> Iterator[tuple[int, int]]:
        """(epoch, position) of each remaining batch of the current epoch."""
        if self.position >= self._len:  # a loader saved right after its last batch
            self.epoch, self.position = self.epoch + 1, 0
        for p in range(self.position, self._len):
            yield self.epoch, p

    def _advance(self) -> None:
        self.position += 1
        if self.position >= self._len:
            self.epoch, self.position = self.epoch + 1, 0

    def __iter__(self):
        if self.background:
            return self._iter_background()
        return self._iter_plain()

    def _iter_plain(self):
        for e, p in list(self._steps()):
            batch = self.make_batch(self.batch_indices(e, p))
            self._advance()  # before yielding, so state_dict() after a batch points at the next one
            yield batch

    def _iter_background(self):
        cuda = _is_cuda(self.device)
        steps = list(self._steps())
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce():
            try:
                for e, p in steps:
                    if stop.is_set():
                        return
                    x, y = self.make_batch(self.batch_indices(e, p))
                    q.put((x.pin_memory(), y.pin_memory()) if cuda else (x, y))
                q.put(None)
            except BaseException as exc:  # surfaced in the consumer
                q.put(exc)

        t = threading.Thread(target=produce, name="xlab-shard-prefetch", daemon=True)
        t.start()
        try:
            for _ in steps:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                x, y = item
                batch = (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)) if cuda else item
                self._advance()
                yield batch
        finally:
            stop.set()
            while t.is_alive():  # drain so a producer blocked on put() can see `stop`
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            t.join()


def _is_cuda(device: Any) -> bool:
    return str(device).startswith("cuda")
