"""``xlab data split``: ``data/raw/<name>/articles.parquet`` -> ``data/splits/<name>/{train,val,test,predict}.parquet``.

Splits by article, seeded. How an article finds its split: its key is the first 8 bytes of
``sha256("<seed>:<id>")``, a uniform number that depends only on the seed and the article's id;
articles are ordered by key and the order is cut at the cumulative fractions into exact counts
(train first, then val, test, predict). Hence:

- the same input and seed give the same split in every process and on every machine (Python's
  ``hash()`` is salted per process and is never used);
- no article can be in two splits, and the counts match the fractions to one article;
- adding or removing articles moves only articles whose keys lie near a cut point, so the
  evaluation splits stay nearly the same when the corpus grows (a random permutation of row
  positions would reshuffle everything);
- every split with a non-zero fraction gets at least one article when there are enough articles.

Within a split, articles keep the order of ``articles.parquet``. The raw file is read in record
batches, so memory holds the ids and one batch, never the whole corpus.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.stage import (
    console,
    is_up_to_date,
    output_lock,
    parquet_file,
    reading_parquet,
    require_manifest,
    skipped,
    write_manifest,
)
from xlab.config import SPLITS, stage_paths
from xlab.errors import XLabError
from xlab.fsio import atomic_dir, read_json, remove_leftovers, sha256_file

if TYPE_CHECKING:
    from omegaconf import DictConfig

STAGE = "split"
# The version of this stage's output format and code, recorded in its manifest: bump when this
# stage's output for the same inputs and params would differ (an upgrade that leaves it alone
# redoes nothing; see pipelines/stage.py).
STAGE_VERSION = 1


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Articles per split: ``n * fraction`` rounded by largest remainder, so they sum to ``n``.

    When ``n`` is at least the number of non-zero fractions, each such split gets at least one
    article (taken from the largest split). Zero fractions always get zero.

    Example: ``split_counts(10, (0.9, 0.05, 0.025, 0.025)) == [7, 1, 1, 1]``.
    """
    exact = [f * n for f in fractions]
    counts = [math.floor(x) for x in exact]
    # Hand out what flooring lost to the largest remainders (earlier split first on ties).
    for i in sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))[: n - sum(counts)]:
        counts[i] += 1
    nonzero = [i for i, f in enumerate(fractions) if f > 0]
    if n >= len(nonzero):
        for i in nonzero:
            if counts[i] == 0:
                counts[max(range(len(counts)), key=lambda j: counts[j])] -= 1
                counts[i] = 1
    return counts


def assign_splits(ids: Sequence[str], seed: int, fractions: Sequence[float]):
    """Split index (position in ``fractions``) of every article.

    Args:
        ids: article ids (unique).
        seed: the split seed.
        fractions: one fraction per split, summing to 1.

    Returns:
        ``np.ndarray`` of shape ``(len(ids),)``, dtype int8: ``out[i]`` is the split of ``ids[i]``.
        The result for an id depends only on the seed, the set of ids and the fractions, not on
        their order or the process.
    """
    import numpy as np

    n = len(ids)
    keys = np.fromiter(
        (int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") for i in ids),
        dtype=np.uint64,
        count=n,
    )
    # Ties of 64-bit keys are all but impossible; the id breaks them so the order is total anyway.
    order = np.lexsort((np.asarray(ids, dtype=object).astype(str), keys)) if n else np.zeros(0, np.int64)
    out = np.empty(n, dtype=np.int8)
    start = 0
    for k, c in enumerate(split_counts(n, fractions)):
        out[order[start : start + c]] = k
        start += c
    return out


def run(cfg: DictConfig, force: bool = False) -> dict:
    """Split the raw articles into ``data/splits/<name>/{train,val,test,predict}.parquet``.

    Args:
        cfg: the XLab configuration (``cfg.data.split_seed``, ``cfg.data.*_fraction``, paths).
        force: redo the stage even when its manifest is up to date.

    Returns:
        ``{"skipped": bool, "path": str, "counts": {split: articles, ..., "articles": total,
        "characters": {split: characters}}, "seconds": float}``.

    Raises:
        XLabError: the raw articles are missing (run ``xlab data download``), empty, or have
            duplicate ids.
    """
    out = stage_paths(cfg).splits
    with output_lock(out, "split"):
        remove_leftovers(out)  # what a killed run of this stage left (no live writer: we hold the lock)
        return _run(cfg, force)


def _run(cfg: DictConfig, force: bool) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    from xlab.progress import unit_progress

    d = cfg.data
    paths = stage_paths(cfg)
    raw = paths.raw / "articles.parquet"
    require_manifest(paths.raw / "manifest.json", "raw articles", "xlab data download")
    if not raw.is_file():
        raise XLabError(f"raw articles not found ({raw}); run `xlab data download` first")
    fractions = [float(getattr(d, f"{s}_fraction")) for s in SPLITS]
    params = {"seed": int(d.split_seed), "fractions": dict(zip(SPLITS, fractions))}
    inputs = {"articles.parquet": sha256_file(raw)}
    out_dir = paths.splits
    manifest_path = out_dir / "manifest.json"
    outputs = [out_dir / f"{s}.parquet" for s in SPLITS]
    if not force and is_up_to_date(manifest_path, params, inputs, outputs, stage_version=STAGE_VERSION):
        skipped(STAGE, manifest_path)
        return {"skipped": True, "path": str(out_dir), "counts": read_json(manifest_path)["counts"], "seconds": 0.0}

    t0 = time.perf_counter()
    fix = "xlab data download --force"
    pf = parquet_file(raw, fix)
    with reading_parquet(raw, fix):
        ids = pf.read(columns=["id"]).column("id").to_pylist()
    if not ids:  # checked before anything is written: the earlier splits stay
        raise XLabError(f"{raw} holds no articles; rerun `xlab data download --force` with a source that has some")
    if len(set(ids)) != len(ids):
        raise XLabError(f"{raw} has duplicate article ids; run `xlab data download --force`")
    labels = assign_splits(ids, params["seed"], fractions)
    counts = {s: int(np.count_nonzero(labels == k)) for k, s in enumerate(SPLITS)}
    chars = {s: 0 for s in SPLITS}
    with atomic_dir(out_dir) as tmp, unit_progress("articles", console) as progress, reading_parquet(raw, fix):
        task = progress.add_task("splitting", total=len(ids))
        writers = [pq.ParquetWriter(tmp / f"{s}.parquet", pf.schema_arrow) for s in SPLITS]
        try:
            start = 0
            for batch in pf.iter_batches(batch_size=4096):
                lab = labels[start : start + batch.num_rows]
                start += batch.num_rows
                for k, s in enumerate(SPLITS):
                    part = batch.filter(lab == k)
                    if part.num_rows:
                        writers[k].write_batch(part)
                        chars[s] += _chars(part)
                progress.update(task, completed=start)
        finally:
            for w in writers:
                w.close()
        counts.update(articles=len(ids), characters=chars)
        write_manifest(
            tmp / "manifest.json", stage=STAGE, params=params, inputs=inputs, counts=counts, stage_version=STAGE_VERSION
        )
    seconds = time.perf_counter() - t0
    _print_summary(counts, seconds, out_dir)
    return {"skipped": False, "path": str(out_dir), "counts": counts, "seconds": seconds}


def _chars(batch) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.utf8_length(batch.column("text"))).as_py() or 0)


def _print_summary(counts: dict, seconds: float, out_dir: Path) -> None:
    from rich.table import Table

    total = max(1, counts["articles"])
    table = Table(title=f"split -> {out_dir}")
    for col in ("split", "articles", "share", "characters"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for s in SPLITS:
        table.add_row(s, f"{counts[s]:,}", f"{counts[s] / total:.2%}", f"{counts['characters'][s]:,}")
    console.print(table)
    console.print(f"{counts['articles']:,} articles split in {seconds:.1f} s")
    empty = [s for s in SPLITS if counts[s] == 0]
    if empty:
        console.print(
            f"[bold yellow]warning[/bold yellow]: the {', '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} "
            f"empty ({counts['articles']:,} articles in all); stages that read "
            f"{'them' if len(empty) > 1 else 'it'} will have nothing to work on. Use more articles "
            f"(data.max_articles) or other data.*_fraction values."
        )
