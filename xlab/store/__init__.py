"""The shard store: XLab's one contract between the data side and the training side.

``format`` owns the layout (dtype, row packing, :class:`StoreManifest`, the ignore index),
``writer`` writes shards and small stores, ``reader`` opens a store (:class:`ShardStore`) and
``loader`` deals its rows into training batches (:class:`ShardLoader`).
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
    pack_articles,
    read_npy_header,
    real_tokens,
    target_tokens,
    to_targets,
    token_dtype,
)
from xlab.store.loader import ShardLoader
from xlab.store.reader import ShardStore
from xlab.store.writer import write_shard, write_store

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "IGNORE_INDEX",
    "MANIFEST",
    "TOKENIZER_COPY",
    "ShardEntry",
    "ShardLoader",
    "ShardStore",
    "SplitEntry",
    "StoreManifest",
    "TokenizerEntry",
    "pack_articles",
    "read_npy_header",
    "real_tokens",
    "target_tokens",
    "to_targets",
    "token_dtype",
    "write_shard",
    "write_store",
]
