"""``xlab data validate``: verify a shard store completely against its manifest and tokenizer.

The store judges itself (:func:`xlab.store.integrity.problems`, at its deepest): for every shard in
the manifest, the file exists, its sha256, its ``.npy`` shape and dtype, every id below the vocabulary
size, the row structure of its layout and the manifest's row and real-token counts; each split's
articles and target tokens, and its text bytes and characters recomputed from the split file it was
encoded from; the tokenizer's sha256 (``tokenizers/<name>.model`` and the store's copy) against the
manifest. This command lists what it finds: exit code 0 when everything holds, else 1 with every
problem listed by file and row.

A manifest that is wrong but readable is one of those problems (exit 1): a count that disagrees
with its shards or is not a whole number, a ``seq_len`` that disagrees with ``row_len``, a shard
listed under another name (twice, out of order, or outside the store: the file the entry should name
is checked instead, never one outside the store). Exit 2, one line, is for a store that cannot be
read at all: no manifest, one that is not JSON or not a store manifest, another ``format_version``
(its rules are not these; an XLab that knows them judges it), or one lacking what every row needs
(``seq_len``, ``dtype``, the tokenizer's ids, the splits' shard lists). See
:mod:`xlab.store.manifest_json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.stage import console
from xlab.config import stage_paths
from xlab.store.lock import reading

if TYPE_CHECKING:
    from omegaconf import DictConfig


def run(cfg: DictConfig, shards_dir=None) -> int:
    """Validate the store at ``shards_dir`` (default ``shards/<name>``); print every problem.

    Returns:
        0 when the store is sound, 1 otherwise (every problem printed).

    Raises:
        XLabError: no store at that folder, or one that cannot be read at all (see above); a
            process is rebuilding it.
    """
    paths = stage_paths(cfg)
    path = Path(shards_dir) if shards_dir else paths.shards
    with reading(path, "validate"):
        return _validate(path, paths)


def _validate(path: Path, paths) -> int:
    from xlab.progress import unit_progress
    from xlab.store import ShardStore, problems

    store = ShardStore(path, lenient=True)  # an inconsistent manifest is listed, not refused
    shards = [sh for s in store.splits for sh in store.info.splits[s].shards]
    sources = {s: paths.splits / f"{s}.parquet" for s in store.splits}
    with unit_progress("shards", console) as bar:
        checks = problems(store, rows=True, tokenizer_files=[paths.tokenizer], sources=sources,
                          track=lambda entries: bar.track(entries, description="validate"))  # fmt: skip
        found = [p.line for p in checks]
    if found:
        console.print(f"[bold red]validate[/bold red]: {len(found)} problem(s) in {path}")
        for line in found:
            console.print(f"  {line}", markup=False, highlight=False)
        return 1
    console.print(
        f"[bold green]validate[/bold green]: {path} is sound ({len(shards)} shards, "
        f"{sum(sh.rows for sh in shards):,} rows, tokenizer {store.tokenizer_sha256[:12]})"
    )
    return 0
