"""The shard store: XLab's one contract between the data side and the training side.

``format`` owns the format (dtype, the padded and packed row layouts, :class:`StoreManifest`, the ignore index),
``writer`` writes shards and small stores, ``reader`` opens a store (:class:`ShardStore`),
``integrity`` (with ``rows``) is the one judge of a store's integrity (:func:`problems`, which
``ShardStore.check``/``verify`` raise and ``xlab data validate`` lists) and ``loader`` deals its rows
into training batches (:class:`ShardLoader`).
"""

from xlab.store.format import (
    FORMAT,
    FORMAT_VERSION,
    IGNORE_INDEX,
    MANIFEST,
    TOKENIZER_COPY,
    ShardEntry,
    SplitEntry,
    StoreManifest,
    TokenizerEntry,
    pack,
    pack_articles,
    pack_documents,
    read_npy_header,
    real_tokens,
    row_counts,
    split_layout,
    target_tokens,
    to_targets,
    token_dtype,
)
from xlab.store.integrity import Problem, problems
from xlab.store.loader import ShardLoader, document_ids
from xlab.store.reader import ShardStore
from xlab.store.writer import write_shard, write_store

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "IGNORE_INDEX",
    "MANIFEST",
    "Problem",
    "TOKENIZER_COPY",
    "ShardEntry",
    "ShardLoader",
    "ShardStore",
    "SplitEntry",
    "StoreManifest",
    "TokenizerEntry",
    "document_ids",
    "pack",
    "pack_articles",
    "pack_documents",
    "problems",
    "read_npy_header",
    "real_tokens",
    "row_counts",
    "split_layout",
    "target_tokens",
    "to_targets",
    "token_dtype",
    "write_shard",
    "write_store",
]
