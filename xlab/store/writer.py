"""Writing shards and small stores. ``xlab data encode`` (pipelines/encode.py, encode_job.py) builds a
store from text with :func:`write_shard` and :class:`~xlab.store.format.StoreManifest`;
:func:`write_store` writes the same format from token lists (tests, benchmarks, tools)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from xlab.fsio import atomic_path, atomic_write_bytes, sha256_bytes, sha256_file
from xlab.store.format import (
    TOKENIZER_COPY,
    ShardEntry,
    SplitEntry,
    StoreManifest,
    TokenizerEntry,
    pack,
    real_tokens,
    split_layout,
    target_tokens,
    token_dtype,
)

# The version of write_store's output format and code, recorded as the manifest's stage_version:
# bump when this stage's output for the same inputs and params would differ.
STAGE_VERSION = 1


def write_shard(path: str | os.PathLike, rows: np.ndarray) -> str:
    """Write ``rows`` ``(n, seq_len + 1)`` as a ``.npy`` file atomically; return its hex sha256."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(rows), allow_pickle=False)
        digest = sha256_file(tmp)
    return digest


def write_store(
    path: str | os.PathLike,
    splits: dict[str, Sequence[Sequence[int]]],
    *,
    seq_len: int,
    tokenizer: TokenizerEntry,
    tokenizer_bytes: Optional[bytes] = None,
    texts: Optional[dict[str, Sequence[str]]] = None,
    articles_per_shard: int = 1024,
    layout: str = "padded",
) -> StoreManifest:
    """Write a complete store from already-tokenized articles.

    Args:
        path: the store folder (created; shards of the same names are replaced).
        splits: split name -> articles, each a list of text token ids (empty articles are skipped).
        seq_len: tokens per training sequence.
        tokenizer: the ids and sha256 the store records (e.g. ``TokenizerEntry.of(tok, file)``).
        tokenizer_bytes: the tokenizer file's bytes, copied into the store as ``tokenizer.model``
            (its sha256 then replaces ``tokenizer.sha256``); None: no copy.
        texts: split name -> the articles' texts, parallel to ``splits``, for ``text_bytes`` and
            ``text_chars`` (bits per byte); None: both 0.
        articles_per_shard: articles per shard file.
        layout: ``padded`` or ``packed``; packing applies to the train split only (``split_layout``).

    Returns:
        The manifest written to ``path/manifest.json``.

    Raises:
        ValueError: an id outside ``[0, tokenizer.vocab_size)``, or an unknown layout.
    """
    path = Path(path)
    dtype = token_dtype(tokenizer.vocab_size)
    tok = TokenizerEntry(**{**tokenizer.__dict__, "copy": None})
    if tokenizer_bytes is not None:
        atomic_write_bytes(path / TOKENIZER_COPY, tokenizer_bytes)
        tok.copy, tok.sha256 = TOKENIZER_COPY, sha256_bytes(tokenizer_bytes)
    out: dict[str, SplitEntry] = {}
    for split, articles in splits.items():
        split_texts = (texts or {}).get(split)
        keep = [i for i, a in enumerate(articles) if len(a)]
        entry = SplitEntry(empty_articles=len(articles) - len(keep), layout=split_layout(split, layout))
        for k, a in enumerate(range(0, max(len(keep), 1), articles_per_shard)):
            idx = keep[a : a + articles_per_shard]
            chunk = [articles[i] for i in idx]
            ids_kw = {"sos_id": tok.sos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id, "vocab_size": tok.vocab_size}
            rows = (
                pack(chunk, seq_len, layout=entry.layout, **ids_kw)
                if chunk
                else np.empty((0, seq_len + 1), dtype=dtype)
            )
            rel = f"{split}/{k:06d}.npy"
            shard = ShardEntry(rel, int(rows.shape[0]), real_tokens(rows, tok.pad_id), write_shard(path / rel, rows))
            chunk_texts = [split_texts[i] for i in idx] if split_texts is not None else []
            entry.add_shard(
                shard,
                articles=len(chunk),
                target_tokens=target_tokens(chunk),
                text_bytes=sum(len(t.encode("utf-8", "surrogatepass")) for t in chunk_texts),
                text_chars=sum(len(t) for t in chunk_texts),
            )
        out[split] = entry
    from xlab.version import __version__

    manifest = StoreManifest(
        seq_len=int(seq_len),
        dtype=dtype.name,
        tokenizer=tok,
        splits=out,
        params={"seq_len": int(seq_len), "articles_per_shard": int(articles_per_shard), "layout": layout},
        stage="write_store",
        stage_version=STAGE_VERSION,
        xlab_version=__version__,
    )
    manifest.write(path)
    return manifest
