"""A MediaWiki XML dump (``data.source=dump``, ``data.dump_path``: ``.xml``, ``.xml.bz2``,
``.xml.gz``), streamed in constant memory through :mod:`pipelines.wikitext`'s cleaner in worker
processes. A multistream dump with its index beside it is decompressed and parsed in the workers
too; the rows are the same, in the same order, either way."""

from __future__ import annotations

import os
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from pipelines import wikitext
from pipelines.sources.base import Row, Source
from xlab.distributed import die_with_parent
from xlab.errors import XLabError
from xlab.fsio import sha256_file
from xlab.pathcheck import file_problem
from xlab.progress import BYTES

if TYPE_CHECKING:
    from omegaconf import DictConfig


class DumpSource(Source):
    """The dump at ``data.dump_path``: its resolved path is a param, its sha256 the input.

    Raises (when built):
        XLabError: no ``dump_path``, or no file there.
    """

    name = "dump"
    unit = BYTES  # the (compressed) bytes read: the position the reader knows
    no_articles_hint = " Is it a MediaWiki XML dump (<mediawiki><page>...</page></mediawiki>)?"

    def __init__(self, d: DictConfig) -> None:
        super().__init__(d)
        self.path = _dump_path(d.dump_path)

    def params(self) -> dict[str, Any]:
        return {"dump_path": str(self.path)}

    def inputs(self) -> dict[str, str]:
        return {self.path.name: sha256_file(self.path)}

    def rows(self, stats: dict[str, Counter], num_proc: int, progress: Any) -> Iterator[Row]:
        return dump_rows(self.path, stats.setdefault(self.path.name, Counter()), num_proc, progress)


def _dump_path(dump_path: Optional[str]) -> Path:
    if not dump_path:
        raise XLabError("--source dump needs a dump file: `xlab data download --source dump --dump PATH`")
    problem = file_problem(Path(dump_path).expanduser(), "dump file", ".xml or .xml.bz2", (".xml", ".xml.bz2"))
    if problem:
        raise XLabError(problem)
    path = Path(dump_path).expanduser().resolve()
    return path


def _is_article(page: Any, c: Counter) -> bool:
    """Count a dump page in ``c`` (pages, and non_articles, redirects or articles_read); True for an
    article (namespace 0, not a redirect)."""
    c["pages"] += 1
    if page.ns != 0:
        c["non_articles"] += 1
    elif page.redirect:
        c["redirects"] += 1
    else:
        c["articles_read"] += 1
        return True
    return False


def dump_rows(path: Path, c: Counter, num_proc: int, progress: Any) -> Iterator[Row]:
    """Articles of a MediaWiki XML dump, cleaned in ``num_proc`` processes, in dump order; counted in ``c``.

    A multistream dump with its index beside it (:func:`wikitext.multistream_index`) is read by
    :func:`_multistream_rows`: decompression and parsing run in the workers too. Otherwise one
    reader here decompresses and parses, and the workers clean.

    Raises:
        XLabError: the file cannot be read, or is not a MediaWiki XML dump.
    """
    index = wikitext.multistream_index(path)
    if index is not None:
        yield from _multistream_rows(path, index, c, num_proc, progress)
        return
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise XLabError(f"cannot read dump {path}: {e.strerror}") from None
    task = progress.add_task(f"cleaning {path.name}", total=path.stat().st_size)
    import xml.etree.ElementTree as ET

    try:
        stream = wikitext.decompressed(raw)

        def articles() -> Iterator[tuple[str, str, str]]:
            for page in wikitext.iter_dump_pages(stream):
                if _is_article(page, c):
                    yield page.id, page.title, page.text
                progress.update(task, completed=raw.tell())

        for pid, title, text in _ordered_map(wikitext.clean_batch, _batches(articles()), num_proc):
            if text is None:
                c["parse_errors"] += 1
            elif not text:
                c["empty"] += 1
            else:
                yield (pid, wikitext.page_url(title), title, text)
        progress.update(task, completed=path.stat().st_size)
    except ET.ParseError as e:
        raise XLabError(f"{path} is not a readable MediaWiki XML dump: {e}") from None
    except (OSError, EOFError) as e:  # truncated or corrupt compression
        raise XLabError(f"cannot read dump {path}: {e}") from None
    finally:
        raw.close()


def _multistream_rows(path: Path, index: Path, c: Counter, num_proc: int, progress) -> Iterator[Row]:
    """Articles of a multistream dump, each piece of streams decompressed, parsed and cleaned in
    one of ``num_proc`` processes; the same rows, in the same order, as the serial reader gives.

    The index gives the offset of every bz2 stream (about 100 pages each); consecutive streams are
    grouped into pieces of about 256 KiB of compressed bytes (a few seconds of cleaning each), at most ``2 * num_proc`` in flight.
    """
    import xml.etree.ElementTree as ET

    try:
        size = path.stat().st_size
        offsets = wikitext.stream_offsets(index, size)
    except (OSError, EOFError) as e:  # EOFError: a truncated .bz2 (bad input, not a Ctrl-C)
        raise XLabError(
            f"cannot read the dump index {index} ({type(e).__name__}: {e or 'truncated'}); "
            "replace it, or remove it to read the dump serially"
        ) from None
    except ValueError as e:
        raise XLabError(f"{e}; remove or replace the index to read the dump serially") from None
    task = progress.add_task(f"cleaning {path.name} ({len(offsets):,} streams)", total=size)
    keys = ("pages", "non_articles", "redirects", "articles_read", "parse_errors", "empty")
    try:
        for counts, end, rows in _ordered_map(_clean_pieces, _pieces(str(path), offsets, size), num_proc):
            for k in keys:
                c[k] += counts[k]
            yield from rows
            progress.update(task, completed=end)
    except ET.ParseError as e:
        raise XLabError(f"{path} is not a readable MediaWiki XML dump: {e}") from None
    except (OSError, EOFError, ValueError) as e:  # an offset that is no stream start, a truncated file
        raise XLabError(f"cannot read dump {path} with its index {index.name}: {e}") from None


def _pieces(path: str, offsets: list[int], size: int, target: int = 1 << 18) -> Iterator[list]:
    """Tasks of :func:`_clean_pieces`: ``[(path, start, end)]`` byte ranges of whole streams,
    about ``target`` compressed bytes each (small enough to balance the workers), in file order."""
    bounds = [*offsets, size]
    start = 0
    for i in range(1, len(bounds)):
        if bounds[i] - start >= target or i == len(bounds) - 1:
            yield [(path, start, bounds[i])]
            start = bounds[i]


def _clean_pieces(tasks: list[tuple[str, int, int]]) -> list[tuple[Counter, int, list[Row]]]:
    """Decompress, parse and clean byte ranges of whole bz2 streams of a multistream dump.

    Returns one ``(counts, end, rows)`` per range: the counts the serial reader keeps, the range's
    end (progress) and its article rows in order. A top-level function so that workers can run it.
    """
    import bz2

    out = []
    for path, start, end in tasks:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        c: Counter = Counter()
        articles = []
        for page in wikitext.iter_stream_pages(bz2.decompress(data)):
            if _is_article(page, c):
                articles.append((page.id, page.title, page.text))
        rows = []
        for pid, title, text in wikitext.clean_batch(articles):
            if text is None:
                c["parse_errors"] += 1
            elif not text:
                c["empty"] += 1
            else:
                rows.append((pid, wikitext.page_url(title), title, text))
        out.append((c, end, rows))
    return out


def _batches(items: Iterable[tuple[str, str, str]], max_chars: int = 1 << 18, max_items: int = 64):
    """Group pages into batches of about ``max_chars`` of wikitext: large enough to amortize the
    transfer to a worker, small enough to balance the load (one long article can take 0.3 s)."""
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += len(item[2])
        if size >= max_chars or len(batch) >= max_items:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _ordered_map(fn: Callable[[list], list], batches: Iterable[list], num_proc: int) -> Iterator:
    """``fn`` over ``batches`` in ``num_proc`` processes, flattened, in input order.

    At most ``2 * num_proc`` batches are in flight (``Pool.imap`` would read the whole input
    ahead, which breaks constant memory on a large dump). ``num_proc == 1`` runs in this process.
    """
    if num_proc <= 1:
        for b in batches:
            yield from fn(b)
        return
    import multiprocessing

    # spawn: the parent holds threads (the progress bar), which fork would copy in a bad state.
    # die_with_parent: a SIGKILLed download leaves no orphan workers behind.
    ex = ProcessPoolExecutor(
        num_proc, mp_context=multiprocessing.get_context("spawn"), initializer=die_with_parent, initargs=(os.getpid(),)
    )
    try:
        pending: deque = deque()
        for b in batches:
            pending.append(ex.submit(fn, b))
            if len(pending) >= 2 * num_proc:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
