"""Reading a shard store: :class:`ShardStore` opens a store folder, checks it against its manifest
(through :mod:`xlab.store.integrity`, the one judge) and gathers rows by global index with positioned reads (bounded resident memory)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from xlab.errors import XLabError
from xlab.fsio import read_json
from xlab.store.format import ENCODE_HINT, FORMAT, FORMAT_VERSION, MANIFEST, StoreManifest, read_npy_header
from xlab.store.integrity import problems


class ShardStore:
    """Read access to a shard store folder (``manifest.json`` + ``<split>/NNNNNN.npy``).

    Rows are read with positioned reads (``os.pread``) rather than a memory map: pages a memory
    map touched stay in the process's resident set until it is unmapped, whereas ``pread`` copies
    only the requested rows and leaves the file's pages to the kernel's page cache, so resident
    memory stays bounded however much of the store is read.

    ``lenient`` (``xlab data validate``): a manifest whose rows can be read but that is
    inconsistent (see :mod:`xlab.store.manifest_json`) opens, its faults kept in
    :attr:`manifest_problems` for :func:`~xlab.store.integrity.problems` to list; otherwise (every
    reader) they are refused here.

    Raises:
        XLabError: the folder or its manifest is missing, unreadable or of another format, or
            (without ``lenient``) inconsistent.
    """

    def __init__(self, path: str | os.PathLike, *, lenient: bool = False):
        self.path = Path(path)
        self.manifest_problems: list[str] = []
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            if (self.path / ".work" / "job.json").is_file():
                # Encoding began but did not finish: a killed run, or scale-out parts not yet merged.
                raise XLabError(
                    f"the shard store at {self.path} is not complete yet (no {MANIFEST}); rerun "
                    f"`{ENCODE_HINT}` to finish it, or after --num-shards parts, run the missing "
                    f"parts and then `xlab data merge`"
                )
            raise XLabError(f"no shard store at {self.path} (missing {MANIFEST}); run `{ENCODE_HINT}` first")
        try:
            self.manifest: dict = read_json(mpath)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise XLabError(f"unreadable shard manifest {mpath}: {e}; run `{ENCODE_HINT} --force`") from None
        m = self.manifest
        if not isinstance(m, dict):
            raise XLabError(
                f"{mpath} is not a shard store manifest (a JSON {type(m).__name__}, not an object); "
                f"run `{ENCODE_HINT} --force`"
            )
        if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
            raise XLabError(
                f"{mpath} is not an XLab shard store of format version {FORMAT_VERSION} "
                f"(found {m.get('format')!r} v{m.get('format_version')}); run `{ENCODE_HINT} --force`"
            )
        try:
            self.info: StoreManifest = StoreManifest.from_json(m, self.manifest_problems if lenient else None)
            self.row_len: int = int(m["row_len"])
        except (KeyError, TypeError, ValueError) as e:
            raise XLabError(f"malformed shard manifest {mpath} ({e}); run `{ENCODE_HINT} --force`") from None
        info, tok = self.info, self.info.tokenizer
        self.seq_len: int = info.seq_len
        self.dtype: np.dtype = np.dtype(info.dtype)
        self.vocab_size, self.pad_id, self.sos_id, self.eos_id, self.unk_id = (
            tok.vocab_size,
            tok.pad_id,
            tok.sos_id,
            tok.eos_id,
            tok.unk_id,
        )
        self.tokenizer_sha256: str = tok.sha256
        self._splits: dict = m["splits"]  # the JSON entries, for split_info()
        self._offsets = {  # split -> cumulative row offsets, len(shards) + 1
            s: np.concatenate([[0], np.cumsum([sh.rows for sh in e.shards], dtype=np.int64)]).astype(np.int64)
            for s, e in info.splits.items()
        }
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

    def layout(self, split: str) -> str:
        """``"padded"`` or ``"packed"``: how ``split``'s rows hold articles (see xlab/store/format.py)."""
        self.split_info(split)  # an unknown split is refused
        return self.info.splits[split].layout

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
        tok = self.info.tokenizer
        candidates = ([self.path / tok.copy] if tok.copy else []) + ([Path(tok.file)] if tok.file else [])
        return next((p for p in candidates if p.is_file()), None)

    def tokenizer_bytes(self) -> bytes:
        """The bytes of the store's tokenizer model (:attr:`tokenizer_path`), checked against the
        manifest's sha256: what the trainer loads and saves in its checkpoints.

        Raises:
            XLabError: no tokenizer file, or one that is not the tokenizer the store was encoded with.
        """
        from xlab.fsio import sha256_bytes

        path = self.tokenizer_path
        if path is None:
            raise XLabError(f"the tokenizer of shard store {self.path} is missing; run `{ENCODE_HINT} --force`")
        data = path.read_bytes()
        if sha256_bytes(data) != self.tokenizer_sha256:
            raise XLabError(f"tokenizer {path} does not match shard store {self.path}; run `{ENCODE_HINT} --force`")
        return data

    def check(self, tokenizer: Any = None, *, tokenizer_file: str | os.PathLike | None = None) -> None:
        """Cheap consistency checks (headers only), run before training, evaluation and stats start.

        The manifest's row length and dtype, every shard file present with the manifest's shape
        ``(rows, seq_len + 1)`` and the store dtype, and, when given, ``tokenizer`` (its sha256 and
        vocabulary size) and ``tokenizer_file`` (its sha256; skipped when the file is missing) against
        the manifest. The cheap depth of :func:`xlab.store.integrity.problems`; :meth:`verify` reads
        the shards, ``xlab data validate`` lists every problem.

        Raises:
            XLabError: naming the first problem found and the command that fixes it.
        """
        files = [Path(tokenizer_file)] if tokenizer_file is not None else []
        for problem in problems(self, tokenizer=tokenizer, tokenizer_files=files):
            raise XLabError(problem.error)

    def verify(self, chunk_rows: int = 65536) -> int:
        """:meth:`check`, then one read of every shard against the manifest: its sha256, its token ids
        (below the vocabulary), and the counts the manifest states (non-pad tokens per shard; articles
        and targets per split), plus the tokenizer copy's sha256 (the deep depth of
        :func:`xlab.store.integrity.problems`). The trainer runs it before its first step and encode
        before it calls a store up to date; ``xlab data validate`` checks the row structure too and
        lists every problem. Return the bytes of the shards read.

        Raises:
            XLabError: the first problem, naming the file and the commands that list and fix it.
        """
        self.check()  # a header problem is named as such, before the sha256 it also changes
        for problem in problems(self, deep=True, chunk_rows=chunk_rows):
            raise XLabError(problem.error)
        return sum((self.path / sh.file).stat().st_size for e in self.info.splits.values() for sh in e.shards)

    def changed_since_opened(self) -> str | None:
        """What changed in the store's manifest since this object read it (a store re-encoded,
        perhaps with another tokenizer), in a few words, or None when it is the same.

        A process that holds the store (:func:`xlab.store.lock.reading`) never sees it change; this
        names the cause when rows read anyway are not what the manifest said."""
        try:
            now = read_json(self.path / MANIFEST)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return f"its {MANIFEST} is gone or unreadable since this process opened it (being rebuilt?)"
        if now == self.manifest:
            return None
        tok = now.get("tokenizer") if isinstance(now, dict) else None
        if isinstance(tok, dict) and tok.get("sha256") != self.tokenizer_sha256:
            return (f"it was re-encoded with another tokenizer (vocabulary {tok.get('vocab_size')}, was "
                    f"{self.vocab_size}) since this process opened it")  # fmt: skip
        return "it was re-encoded since this process opened it"

    # ------------------------------------------------------------------------------ reading
    def _fd(self, split: str, shard: int) -> tuple[int, int]:
        key = (split, shard)
        got = self._fds.get(key)
        if got is None:
            with self._lock:
                got = self._fds.get(key)
                if got is None:
                    p = self.path / self.info.splits[split].shards[shard].file  # the checked name
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
                got = os.preadv(fd, [view[pos : pos + nbytes]], data_offset + int(local[a]) * row_bytes)
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
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn os down
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
