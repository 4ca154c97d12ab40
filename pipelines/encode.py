"""``xlab data encode``: tokenize the splits into a verified shard store.

Work is cut into fixed *units*: unit ``u`` of a split is the articles ``[u * A, (u + 1) * A)`` in the
split's parquet order (``A = shards.articles_per_shard``), and becomes exactly one shard file
``<split>/{u:06d}.npy``. A unit's output depends only on its articles, so the store is
byte-identical for any number of worker processes, machines or interruptions:

- parallel: the main process streams the parquet in batches (pyarrow) and hands units to
  ``shards.num_proc`` worker processes, keeping at most two units per worker in flight, so memory
  stays bounded by a few units whatever the corpus size;
- atomic and resumable: a worker writes its shard to a temporary name, renames it into place, then
  writes a small done-record in ``.work/``; a rerun skips units whose record and shard exist, so a
  run killed at any moment (even SIGKILL) is finished by running the same command again, and the
  worker processes die with it;
- scale-out: with ``--num-shards N --shard-index I`` (or the part an existing launcher gives the
  process) a process encodes the units ``u`` with ``u % N == I`` of every split; all parts may write
  into one shared folder at once. The job record, the parts, the manifest written by the last part,
  ``xlab data merge`` and the swap of a rebuilt store are :mod:`pipelines.encode_parts`;
- the manifest is written last, after every shard exists; a store whose manifest is absent is
  incomplete, and an outdated manifest is removed before any shard is rewritten.

Bad input never stops a run halfway: empty articles are skipped and counted, text the tokenizer
rejects (``ValueError``) is skipped and reported with the article's id.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines import encode_job, encode_parts
from pipelines.encode_job import SPLIT_FIX, WORK, EncodeJob
from pipelines.stage import console, output_lock, parquet_file, reading_parquet, skipped
from xlab.config import SPLITS, stage_paths
from xlab.distributed import die_with_parent
from xlab.errors import XLabError
from xlab.fsio import atomic_write_json, read_json
from xlab.store.lock import changing
from xlab.tokenizer import LONG_TEXT

if TYPE_CHECKING:
    from omegaconf import DictConfig

SUB_BATCH = 256  # articles tokenized at a time inside a unit (bounds the Python token lists)
READ_BATCH = 1024  # parquet rows per streamed record batch
# The version of this stage's output format and code, recorded in its manifest: bump when this
# stage's output for the same inputs and params would differ (an upgrade that leaves it alone
# redoes nothing; see pipelines/stage.py).
STAGE_VERSION = 1


def load_tokenizer(path: str | os.PathLike):
    """The XLab tokenizer at ``path`` (module-level so worker processes can receive it by name)."""
    from xlab.tokenizer import Tokenizer

    return Tokenizer.load(path)


# ------------------------------------------------------------------------------------------ worker
_W: dict = {}  # per-process worker state: tokenizer and settings


def _init_worker(loader: Callable, tok_path: str, settings: dict, parent_pid: int | None = None) -> None:
    """Worker initializer: tie the worker's life to its parent's (pool workers only), then load
    the tokenizer once per process."""
    if parent_pid is not None:
        die_with_parent(parent_pid)
    _W["tok"] = loader(tok_path)
    _W.update(settings)


def _encode_texts(tok, texts: list[str], threads: int) -> list[Any]:
    """Token lists for ``texts``; an entry is a ``str`` error message where the tokenizer raised
    ValueError for that text (the batch is retried text by text to find which). A text longer than
    the tokenizer's LONG_TEXT is encoded alone into an int32 array (``encode_array``), so one huge
    article costs a few bytes per token, not a Python list's."""
    long = LONG_TEXT if hasattr(tok, "encode_array") else None  # test stand-ins have no encode_array
    if long and any(len(t) > long for t in texts):
        out = []
        for t in texts:
            try:
                out.append(tok.encode_array(t) if len(t) > long else tok.encode([t], num_threads=threads)[0])
            except ValueError as e:
                out.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return out
    try:
        return tok.encode(texts, num_threads=threads)
    except ValueError:
        out: list[Any] = []
        for t in texts:
            try:
                out.append(tok.encode([t], num_threads=1)[0])
            except ValueError as e:
                out.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return out


def _encode_unit(split: str, unit: int, ids: list, texts: list) -> dict:
    """Encode one unit's articles into its shard and done-record; return the record.

    Record: articles (encoded), empty, rejected [{id, error}], rows, real_tokens, target_tokens,
    text_bytes, text_chars, sha256, file.
    """
    import numpy as np

    from xlab.store import pack, real_tokens, split_layout, target_tokens, write_shard

    tok, seq_len, out = _W["tok"], _W["seq_len"], Path(_W["out"])
    layout = split_layout(split, _W["layout"])
    ids_kw = {"sos_id": tok.sos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id, "vocab_size": tok.vocab_size}
    parts, packed = [], []  # padded: rows per sub-batch; packed: the unit's articles, cut at the end
    rec = {
        "articles": 0,
        "empty": 0,
        "rejected": [],
        "rows": 0,
        "real_tokens": 0,
        "target_tokens": 0,
        "text_bytes": 0,
        "text_chars": 0,
    }
    for a in range(0, len(texts), SUB_BATCH):
        b_ids, b_texts = ids[a : a + SUB_BATCH], texts[a : a + SUB_BATCH]
        keep_idx = [i for i, t in enumerate(b_texts) if t and not t.isspace()]
        rec["empty"] += len(b_texts) - len(keep_idx)
        encoded = _encode_texts(tok, [b_texts[i] for i in keep_idx], _W["threads"])
        good = []
        for i, enc in zip(keep_idx, encoded):
            if isinstance(enc, str):
                rec["rejected"].append({"id": str(b_ids[i]), "error": enc})
            elif len(enc) == 0:
                rec["empty"] += 1
            else:
                t = b_texts[i]
                rec["text_chars"] += len(t)
                rec["text_bytes"] += len(t.encode("utf-8", "surrogatepass"))
                good.append(enc)
        if good:
            if layout == "packed":  # one stream per unit, so padding ends the shard and nowhere else
                packed.extend(good)
            else:
                parts.append(pack(good, seq_len, layout=layout, **ids_kw))
            rec["articles"] += len(good)
            rec["target_tokens"] += target_tokens(good)
    if packed:
        parts = [pack(packed, seq_len, layout=layout, **ids_kw)]
        del packed
    dtype = np.dtype(_W["dtype"])
    rows = np.concatenate(parts) if parts else np.empty((0, seq_len + 1), dtype=dtype)
    rec["rows"] = int(rows.shape[0])
    rec["real_tokens"] = real_tokens(rows, tok.pad_id)
    rel = f"{split}/{unit:06d}.npy"
    rec["file"] = rel
    rec["sha256"] = write_shard(out / rel, rows)
    # The record is written after the shard is in place: a record always means a complete shard.
    atomic_write_json(out / WORK / split / f"{unit:06d}.json", rec)
    return rec


def run(
    cfg, force: bool = False, num_shards: int = 1, shard_index: int = 0, tokenizer_loader: Callable = load_tokenizer
) -> dict:
    """Encode ``data/splits/<name>/*.parquet`` into ``shards/<name>/`` (see the module docstring).

    Args:
        cfg: XLab configuration (uses ``shards.seq_len``, ``shards.articles_per_shard``,
            ``shards.num_proc``, the paths and ``data.name``).
        force: redo the stage (this part's units) even if up to date.
        num_shards, shard_index: encode only the units ``u % num_shards == shard_index`` (see
            :func:`pipelines.encode_parts.choose_part` for the part a launcher gives). Parts may run
            at once in one folder; the part that finds every unit of every part done writes the
            manifest (parts in separate folders: ``xlab data merge`` once they are copied together).
            A part run on
            a complete store that is up to date changes nothing (without ``force``); with
            ``force`` a part redoes its own units.
        tokenizer_loader: ``path -> tokenizer`` (picklable; tests pass a stand-in).

    Returns:
        The store manifest (dict) when the store is complete, else a summary of this part.

    Raises:
        XLabError: missing splits or tokenizer, bad part options, a part of a job other than the
            one recorded in the folder (other tokenizer, parameters, inputs or number of parts:
            nothing is changed then).
    """
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise XLabError(
            f"--shard-index must be in [0, --num-shards) and --num-shards >= 1 (got {shard_index} of {num_shards})"
        )
    out = stage_paths(cfg).shards
    if num_shards == 1:
        with output_lock(out, "encode"):
            return _run(cfg, force, tokenizer_loader)
    # Parts of one store may run at once (one lock each); the whole-store lock is shared among them
    # and keeps a whole-store encode or a merge out while any part runs.
    part = f"encode part {shard_index} of {num_shards}"
    with (
        output_lock(out, "encode", shared=True, doing=part),
        output_lock(out, "encode", f"part-{shard_index}-of-{num_shards}"),
    ):
        return _run_part(cfg, force, num_shards, shard_index, tokenizer_loader)


# ------------------------------------------------------------------------------------------ driver
@dataclass(frozen=True)
class _Inputs:
    """What an encode reads and how: the split files, the tokenizer file and its loader, and the
    worker processes (``shards.num_proc``, default every core)."""

    split_files: dict[str, Path]
    tok_path: Path
    loader: Callable
    num_proc: int


def _inputs(cfg: DictConfig, tokenizer_loader: Callable) -> tuple[_Inputs, Any]:
    """The encode's inputs and the loaded tokenizer.

    Raises:
        XLabError: a split file or the tokenizer missing, or a tokenizer file that does not load.
    """
    d = stage_paths(cfg).splits
    split_files = {s: d / f"{s}.parquet" for s in SPLITS}
    missing = [str(p) for p in split_files.values() if not p.is_file()]
    if missing:
        raise XLabError(f"split file(s) not found: {', '.join(missing)}; run `xlab data split` first")
    tok_path = stage_paths(cfg).tokenizer
    if not tok_path.is_file():
        raise XLabError(f"tokenizer not found ({tok_path}); run `xlab tokenizer train` first")
    try:
        tok = tokenizer_loader(str(tok_path))
    except ValueError as e:  # an empty, foreign or damaged .model file
        raise XLabError(
            f"{tok_path} is not a usable XLab tokenizer ({e}); run `xlab tokenizer train --force`"
        ) from None
    num_proc = int(cfg.shards.num_proc or os.cpu_count() or 1)
    return _Inputs(split_files, tok_path, tokenizer_loader, num_proc), tok


def _run(cfg: DictConfig, force: bool, tokenizer_loader: Callable) -> dict:
    """The whole store in one process (it holds the store's exclusive lock)."""
    inp, tok = _inputs(cfg, tokenizer_loader)
    out = stage_paths(cfg).shards
    job = EncodeJob.of(cfg, tok, inp.split_files, inp.tok_path, parts=1, stage_version=STAGE_VERSION)
    mpath = out / "manifest.json"
    build = out.parent / f".{out.name}.rebuild"  # where a complete store is rebuilt (see below)
    if not force and encode_job.up_to_date(out, job):
        shutil.rmtree(build, ignore_errors=True)  # a killed --force rebuild the user did not rerun
        skipped("encode", mpath)
        return read_json(mpath)
    # From here the store changes: refused at once while a training or evaluation reads it.
    with changing(out, "encode rebuilds it"):
        if not mpath.exists() and encode_job.up_to_date(build, job):  # a rebuild killed between its two renames
            encode_job.swap(build, out)
            return read_json(mpath)
        if mpath.exists():
            # Never damage a complete store, even an outdated one: build the new one beside it and
            # swap the folders when it is complete (a failure or Ctrl-C leaves the old one in place).
            encode_job.prepare(build, job)  # keeps what a killed rebuild of this job did
            _encode_units(build, job, inp, force=False)
            manifest = encode_job.finalize(build, job, shown=out)
            encode_job.swap(build, out)
            return manifest
        encode_job.prepare(out, job)
        _encode_units(out, job, inp, force)
        return encode_job.finalize(out, job)


def _run_part(cfg: DictConfig, force: bool, num_shards: int, shard_index: int, tokenizer_loader: Callable) -> dict:
    """One part of the store; other parts of the same job may be running into the same folder."""
    inp, tok = _inputs(cfg, tokenizer_loader)
    out = stage_paths(cfg).shards
    job = EncodeJob.of(cfg, tok, inp.split_files, inp.tok_path, parts=num_shards, stage_version=STAGE_VERSION)
    mpath = out / "manifest.json"

    def complete() -> dict:
        # A complete store made from these very inputs and parameters already holds every unit of
        # every part (a unit's bytes depend only on its articles), so a part run has nothing to add;
        # redoing it would first have to remove the manifest and the other parts' shards.
        console.print(
            f"[bold]encode[/bold]: the store {out} is already complete and up to date "
            f"(it holds part {shard_index} of {num_shards}); nothing to do. Use --force to "
            f"re-encode it from scratch in parts."
        )
        return read_json(mpath)

    if not force and encode_job.up_to_date(out, job):
        shutil.rmtree(out.parent / f".{out.name}.rebuild", ignore_errors=True)  # a killed whole-store rebuild
        return complete()
    with changing(out, f"encode part {shard_index} of {num_shards} writes it"):
        with encode_parts.job_lock(out):
            if encode_parts.join(out, job, force) == "complete":
                return complete()
        n_mine = _encode_units(out, job, inp, force, shard_index)
        with encode_parts.job_lock(out):
            return encode_parts.finish_part(out, job, shard_index, n_mine)


def _encode_units(out: Path, job: EncodeJob, inp: _Inputs, force: bool, shard_index: int = 0) -> int:
    """Encode the units of part ``shard_index`` (of ``job.parts``) that are not done yet (the job is
    recorded in ``out``); return the number of units of this part. Touches only this part's files."""
    work = out / WORK
    n = job.parts
    if n > 1:  # a killed run's temporaries of this part's units (other parts' are in use)
        for d in [out / s for s in SPLITS] + [work / s for s in SPLITS]:
            for p in d.glob(".*.tmp"):
                if p.name[1:7].isdigit() and int(p.name[1:7]) % n == shard_index:
                    p.unlink(missing_ok=True)
    a = job.articles_per_shard
    mine = {s: job.part_units(s, shard_index) for s in SPLITS}
    if force:
        for s in SPLITS:
            for u in mine[s]:
                (work / s / f"{u:06d}.json").unlink(missing_ok=True)
    todo = {s: {u for u in mine[s] if not encode_job.done(out, s, u)} for s in SPLITS}
    n_todo = sum(len(v) for v in todo.values())
    n_mine = sum(len(v) for v in mine.values())
    # Tokenizer threads per process: the cores divided among the processes (one process with all
    # cores' threads avoids the pool altogether).
    threads = max(1, (os.cpu_count() or 1) // inp.num_proc)
    settings = {"seq_len": job.seq_len, "out": str(out), "dtype": job.dtype, "threads": threads, "layout": job.layout}
    units = (u for s in SPLITS if todo[s] for u in _iter_units(inp.split_files[s], s, todo[s], a))
    # The bar counts articles, not units: a split's last unit is shorter, and an article is the
    # unit of the download and split stages' rates too.
    n_articles = sum(min(a, job.articles[s] - u * a) for s in SPLITS for u in todo[s])
    label = f"encode ({n_mine - n_todo}/{n_mine} units done before)" if n_todo < n_mine else "encode"
    _execute(units, n_todo, n_articles, inp.num_proc, inp.loader, str(inp.tok_path), settings, label)
    return n_mine


def _iter_units(path: Path, split: str, wanted: set[int], articles_per_unit: int) -> Iterator[tuple]:
    """Stream ``(split, unit, ids, texts)`` for the units in ``wanted``, in parquet order."""
    pf = parquet_file(path, SPLIT_FIX)
    with reading_parquet(path, SPLIT_FIX):
        yield from _units_of(pf, split, wanted, articles_per_unit)


def _units_of(pf, split: str, wanted: set[int], articles_per_unit: int) -> Iterator[tuple]:
    ids: list = []
    texts: list = []
    unit = 0
    row = 0
    for batch in pf.iter_batches(batch_size=READ_BATCH, columns=["id", "text"]):
        n = batch.num_rows
        b_ids = b_texts = None
        k = 0
        while k < n:
            take = min(n - k, (unit + 1) * articles_per_unit - row)
            if unit in wanted:
                if b_ids is None:
                    b_ids = batch.column(0).to_pylist()
                    b_texts = batch.column(1).to_pylist()
                ids.extend(b_ids[k : k + take])
                texts.extend("" if t is None else t for t in b_texts[k : k + take])
            k += take
            row += take
            if row == (unit + 1) * articles_per_unit:
                if unit in wanted:
                    yield split, unit, ids, texts
                ids, texts = [], []
                unit += 1
    if row > unit * articles_per_unit and unit in wanted:  # the last, shorter unit
        yield split, unit, ids, texts


def _execute(
    units: Iterator[tuple],
    total: int,
    articles: int,
    num_proc: int,
    loader: Callable,
    tok_path: str,
    settings: dict,
    label: str,
) -> None:
    """Encode every unit (``total`` of them, holding ``articles``), in this process (``num_proc == 1``)
    or in a pool of ``num_proc`` processes."""
    from xlab.progress import unit_progress

    if total == 0:
        return
    rejected = []
    with unit_progress("articles", console) as bar:
        task = bar.add_task(label, total=articles)

        def done(rec):
            rejected.extend(rec["rejected"])
            # every article of the unit is in exactly one of these counts (see _encode_unit)
            bar.advance(task, rec["articles"] + rec["empty"] + len(rec["rejected"]))

        if num_proc <= 1 or total == 1:
            _init_worker(loader, tok_path, settings)
            for item in units:
                done(_encode_unit(*item))
        else:
            import multiprocessing as mp

            # spawn, not fork: the parent holds pyarrow/tokenizer threads that fork would copy mid-state.
            with ProcessPoolExecutor(
                num_proc,
                mp_context=mp.get_context("spawn"),
                initializer=_init_worker,
                initargs=(loader, tok_path, settings, os.getpid()),
            ) as pool:
                pending = set()
                for item in units:
                    pending.add(pool.submit(_encode_unit, *item))
                    if len(pending) >= 2 * num_proc:  # bound the texts in flight
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for f in finished:
                            done(f.result())
                for f in pending:
                    done(f.result())
    for r in rejected[:20]:
        console.print(f"[yellow]skipped article {r['id']}[/yellow]: the tokenizer rejected it ({r['error']})")
    if len(rejected) > 20:
        console.print(f"[yellow]... and {len(rejected) - 20} more rejected articles (listed in the manifest)[/yellow]")
