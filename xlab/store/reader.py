"""Reading a shard store: :class:`ShardStore` opens a store folder, checks it against its manifest
and gathers rows by global index with positioned reads (bounded resident memory)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from xlab.errors import XLabError
from xlab.store.format import (
    ENCODE_HINT,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    StoreManifest,
    read_npy_header,
    row_counts,
    token_dtype,
)


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
                raise XLabError(
                    f"the shard store at {self.path} is not complete yet (no {MANIFEST}); rerun "
                    f"`{ENCODE_HINT}` to finish it, or after --num-shards parts, run the missing "
                    f"parts and then `xlab data merge`"
                )
            raise XLabError(f"no shard store at {self.path} (missing {MANIFEST}); run `{ENCODE_HINT}` first")
        try:
            with open(mpath, encoding="utf-8") as f:
                self.manifest: dict = json.load(f)
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
            self.info: StoreManifest = StoreManifest.from_json(m)
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
                raise XLabError(
                    f"tokenizer sha256 {tokenizer.sha256[:12]} does not match the shard store's "
                    f"{self.tokenizer_sha256[:12]} ({self.path}); re-encode with `{ENCODE_HINT} --force`"
                )
            if int(tokenizer.vocab_size) != self.vocab_size:
                raise XLabError(
                    f"tokenizer vocabulary {tokenizer.vocab_size} != shard store's {self.vocab_size}; {fix}"
                )
        for split in self.splits:
            for sh in self.split_info(split)["shards"]:
                p = self.path / sh["file"]
                if not p.is_file():
                    raise XLabError(f"missing shard {p}; {fix}")
                try:
                    shape, dtype, fortran, _ = read_npy_header(p)
                except (OSError, ValueError) as e:
                    raise XLabError(
                        f"unreadable shard {p} ({e}); run `xlab data validate` to list every "
                        f"problem, `{ENCODE_HINT} --force` to rebuild the store"
                    ) from None
                if dtype != self.dtype or shape != (int(sh["rows"]), self.row_len) or fortran:
                    raise XLabError(
                        f"shard {p} is {dtype}{list(shape)}, manifest says "
                        f"{self.dtype}[{sh['rows']}, {self.row_len}]; {fix}"
                    )

    def verify(self, chunk_rows: int = 65536) -> int:
        """Check the store against its manifest by reading every shard once: its sha256, its token
        ids (below the vocabulary), and the counts the manifest states (non-pad tokens per shard;
        articles and targets per split), plus the tokenizer copy's sha256. The trainer runs it before
        its first step and encode before it calls a store up to date; ``xlab data validate`` checks
        the row structure too and lists every problem. Return the bytes read.

        Raises:
            XLabError: the first difference, naming the file and the commands that list and fix it.
        """
        import hashlib

        def bad(what: str) -> XLabError:
            return XLabError(f"{what}; run `xlab data validate` to list every problem, `{ENCODE_HINT} --force` "
                             "to rebuild the store")  # fmt: skip

        tok = self.info.tokenizer
        copy = self.path / tok.copy if tok.copy else None
        if copy is not None and copy.is_file():
            from xlab.fsio import sha256_file

            if sha256_file(copy) != tok.sha256:
                raise bad(f"{copy} is not the tokenizer the manifest names (sha256 differs)")
        if self.info.inputs.get("tokenizer", tok.sha256) != tok.sha256:
            raise bad(f"{self.path / MANIFEST}: its tokenizer sha256 differs from the one it was encoded with")
        total = 0
        row_bytes = self.row_len * self.dtype.itemsize
        for split in self.splits:
            entry, articles, targets = self.info.splits[split], 0, 0
            for sh in entry.shards:
                p = self.path / sh.file
                digest, real, first = hashlib.sha256(), 0, True
                try:
                    _, _, _, offset = read_npy_header(p)
                    with open(p, "rb") as f:
                        digest.update(f.read(offset))
                        while block := f.read(chunk_rows * row_bytes):
                            digest.update(block)
                            rows = np.frombuffer(block, dtype=self.dtype).reshape(-1, self.row_len)
                            if rows.size and int(rows.max()) >= self.vocab_size:
                                raise bad(f"shard {p} holds token id {int(rows.max())} >= vocabulary {self.vocab_size}")
                            real += int(np.count_nonzero(rows != self.pad_id))
                            a, t = row_counts(rows, layout=entry.layout, pad_id=self.pad_id, sos_id=self.sos_id,
                                              first=first)  # fmt: skip
                            articles, targets, first = articles + a, targets + t, False
                except (OSError, ValueError) as e:
                    raise bad(f"cannot read shard {p} ({e})") from None
                if digest.hexdigest() != sh.sha256:
                    raise bad(f"shard {p} changed since it was encoded (sha256 differs from the manifest)")
                if real != sh.real_tokens:
                    raise bad(f"shard {p} holds {real} non-pad tokens, the manifest says {sh.real_tokens}")
                total += offset + sh.rows * row_bytes
            for key, found in (("articles", articles), ("target_tokens", targets)):
                if getattr(entry, key) != found:
                    raise bad(f"split {split} of {self.path} holds {found} {key.replace('_', ' ')}, "
                              f"the manifest says {getattr(entry, key)}")  # fmt: skip
        return total

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
