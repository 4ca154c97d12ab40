"""``xlab data encode`` / ``xlab data merge``: tokenize the splits into a verified shard store.

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
  process: torchrun's ``RANK``/``WORLD_SIZE``, a Slurm job array's task id, see
  :func:`part_from_env`) a process encodes the units ``u`` with ``u % N == I`` of every split. All
  parts may write into one shared folder at once: the job record ``.work/job.json`` is created
  once, atomically, by the first part, and a part of another job (other tokenizer, parameters,
  inputs or number of parts) is refused without touching the folder. The last part to finish
  writes the manifest, which equals the one a single process writes; parts encoded in separate
  folders are copied together and ``xlab data merge`` writes it;
- the manifest is written last, after every shard exists; a store whose manifest is absent is
  incomplete, and an outdated manifest is removed before any shard is rewritten.

Bad input never stops a run halfway: empty articles are skipped and counted, text the tokenizer
rejects (``ValueError``) is skipped and reported with the article's id.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.stage import (
    console,
    die_with_parent,
    is_up_to_date,
    output_lock,
    parquet_file,
    read_manifest,
    reading_parquet,
    skipped,
)
from xlab.config import SPLITS, stage_paths
from xlab.errors import XLabError
from xlab.fsio import (
    atomic_write_bytes,
    atomic_write_json,
    create_once,
    exclusive_lock,
    lock_path,
    read_json,
    sha256_file,
)
from xlab.tokenizer import LONG_TEXT
from xlab.version import __version__

if TYPE_CHECKING:
    from omegaconf import DictConfig

WORK = ".work"
SUB_BATCH = 256  # articles tokenized at a time inside a unit (bounds the Python token lists)
READ_BATCH = 1024  # parquet rows per streamed record batch
MAX_ERRORS_KEPT = 1000  # rejected articles listed in the manifest per split (all are counted)
SPLIT_FIX = "xlab data split --force"
# The version of this stage's output format and code, recorded in its manifest: bump when this
# stage's output for the same inputs and params would differ (an upgrade that leaves it alone
# redoes nothing; see pipelines/stage.py).
STAGE_VERSION = 1
# Recorded in the job record only when above 1, so that a job record of XLab 0.6 still matches.


TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def part_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int, str] | None:
    """The part of the work an existing launcher gave this process, read from its environment.

    - torchrun (any of ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set): part ``RANK`` of
      ``WORLD_SIZE`` (the global rank, so the parts of several nodes do not overlap);
    - a Slurm job array (``SLURM_ARRAY_TASK_ID`` set): part ``SLURM_ARRAY_TASK_ID -
      SLURM_ARRAY_TASK_MIN`` (MIN taken as 0 when absent) of ``SLURM_ARRAY_TASK_COUNT``.

    torchrun's variables win when both are set: Slurm sets its own in every job, also when
    torchrun (started by ``srun`` or inside an array task) is what manages the processes.

    Args:
        env: the environment to read (default ``os.environ``).

    Returns:
        ``(num_parts, index, source)``, ``source`` naming the variables read (for the line that
        says where the part came from), or None when neither launcher's variables are set.

    Raises:
        XLabError: a variable that is not an integer, a missing one (e.g. ``LOCAL_RANK`` without
            ``RANK``), a count below 1 or an index outside ``[0, count)`` (a Slurm array with a
            step, such as ``--array=0-9:2``, has gaps and gives such indices).
    """
    env = os.environ if env is None else env

    def number(name: str, launcher: str) -> int:
        v = env.get(name)
        if v is None:
            raise XLabError(f"{launcher}: {name} is not set; cannot tell which encode part this process is")
        try:
            return int(v.strip())
        except ValueError:
            raise XLabError(f"{launcher}: {name}={v!r} is not an integer") from None

    if any(k in env for k in TORCHRUN_VARS):
        count, index = number("WORLD_SIZE", "torchrun"), number("RANK", "torchrun")
        source = f"torchrun: RANK={index}, WORLD_SIZE={count}"
        hint = ""
    elif "SLURM_ARRAY_TASK_ID" in env:
        task = number("SLURM_ARRAY_TASK_ID", "Slurm job array")
        count = number("SLURM_ARRAY_TASK_COUNT", "Slurm job array")
        low = number("SLURM_ARRAY_TASK_MIN", "Slurm job array") if "SLURM_ARRAY_TASK_MIN" in env else 0
        index = task - low
        source = f"Slurm job array: SLURM_ARRAY_TASK_ID={task}"
        source += f", SLURM_ARRAY_TASK_MIN={low}" if "SLURM_ARRAY_TASK_MIN" in env else ""
        source += f", SLURM_ARRAY_TASK_COUNT={count}"
        hint = "; submit a contiguous array (sbatch --array=0-<N-1>, no step)"
        # A stepped or sparse array (--array=0-30:2, --array=1,5,9) numbers its tasks with gaps: task
        # ids minus the first are then not 0..COUNT-1, some parts would never run and others twice.
        step = number("SLURM_ARRAY_TASK_STEP", "Slurm job array") if "SLURM_ARRAY_TASK_STEP" in env else 1
        high = number("SLURM_ARRAY_TASK_MAX", "Slurm job array") if "SLURM_ARRAY_TASK_MAX" in env else None
        if step != 1 or (high is not None and high - low + 1 != count):
            raise XLabError(f"encode parts need a contiguous Slurm job array, this one has gaps ({source}, "
                            f"SLURM_ARRAY_TASK_STEP={step}, SLURM_ARRAY_TASK_MAX={high}){hint}")  # fmt: skip
    else:
        return None
    if count < 1 or not 0 <= index < count:
        raise XLabError(f"encode part {index} of {count} is not a part ({source}){hint}")
    return count, index, source


def choose_part(
    num_shards: int | None, shard_index: int | None, env: Mapping[str, str] | None = None
) -> tuple[int, int, str | None]:
    """The part ``(num_parts, index, source)`` this process encodes: the explicit
    ``--num-shards/--shard-index`` when either is given (the other defaulting to 1 or 0), else the
    launcher's (:func:`part_from_env`), else the whole store ``(1, 0, None)``. ``source`` says where
    the part came from (None for the whole store by default).

    Raises:
        XLabError: bad launcher variables (see :func:`part_from_env`), or an explicit index outside
            ``0..num_shards - 1``.
    """
    if num_shards is not None or shard_index is not None:
        n, i = 1 if num_shards is None else num_shards, 0 if shard_index is None else shard_index
        if n < 1 or not 0 <= i < n:  # refused here, before the part is announced
            raise XLabError(f"--shard-index must be in [0, --num-shards) and --num-shards >= 1 (got {i} of {n})")
        return n, i, "--num-shards/--shard-index"
    found = part_from_env(env)
    return found if found is not None else (1, 0, None)


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


# ------------------------------------------------------------------------------------------ driver
def _split_files(cfg: DictConfig) -> dict[str, Path]:
    d = stage_paths(cfg).splits
    files = {s: d / f"{s}.parquet" for s in SPLITS}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise XLabError(f"split file(s) not found: {', '.join(missing)}; run `xlab data split` first")
    return files


def _job(cfg: DictConfig, tok, split_files: dict[str, Path], tok_path: Path, parts: int = 1) -> dict:
    """The job record: everything that determines the store's bytes (parameters, input hashes,
    unit counts) and how the work is divided (``parts``)."""
    from xlab.store import FORMAT_VERSION, token_dtype

    a = int(cfg.shards.articles_per_shard)
    units, articles = {}, {}
    for s, p in split_files.items():
        n = parquet_file(p, SPLIT_FIX).metadata.num_rows
        articles[s] = n
        units[s] = math.ceil(n / a)
    params = {"seq_len": int(cfg.shards.seq_len), "articles_per_shard": a, "format_version": FORMAT_VERSION}
    if cfg.shards.layout != "padded":  # absent when padded, so stores encoded before 0.6 stay up to date
        params["layout"] = str(cfg.shards.layout)
    inputs = {"tokenizer": tok.sha256, "splits": {s: sha256_file(p) for s, p in split_files.items()}}
    job = {
        "params": params,
        "inputs": inputs,
        "units": units,
        "articles": articles,
        "dtype": token_dtype(tok.vocab_size).name,
        "tokenizer_file": str(tok_path),
        "parts": int(parts),
        "tokenizer": {
            "vocab_size": int(tok.vocab_size),
            "pad_id": int(tok.pad_id),
            "sos_id": int(tok.sos_id),
            "eos_id": int(tok.eos_id),
            "unk_id": int(tok.unk_id),
        },
    }
    if STAGE_VERSION != 1:
        job["stage_version"] = STAGE_VERSION
    return job


def _same_job(a: dict | None, b: dict, parts: bool = True) -> bool:
    """Whether two job records describe the same store bytes (and, with ``parts``, the same division
    of the work). The tokenizer's path is left out: its sha256 is what identifies it, and the
    machines sharing a folder may see the file under other paths."""
    if a is None:
        return False
    skip = {"tokenizer_file"} if parts else {"tokenizer_file", "parts"}
    return {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


def _disagreement(rec: dict, job: dict) -> str:
    """What differs between the recorded job ``rec`` and this part's ``job``, in a few words."""
    said = []
    r_in, j_in = rec.get("inputs") or {}, job["inputs"]
    if r_in.get("tokenizer") != j_in["tokenizer"]:
        said.append(f"tokenizer sha256 {str(r_in.get('tokenizer'))[:12]} there, {j_in['tokenizer'][:12]} here")
    # the layout is recorded only when packed: absent means padded
    there, here = ({"layout": "padded", **(p or {})} for p in (rec.get("params"), job["params"]))
    for k in sorted(set(there) | set(here)):
        if there.get(k) != here.get(k):
            said.append(f"{k} {there.get(k)} there, {here.get(k)} here")
    changed = [s for s in SPLITS if (r_in.get("splits") or {}).get(s) != j_in["splits"][s]]
    if changed:
        said.append(f"other {'/'.join(changed)} split file(s)")
    if rec.get("stage_version", 1) != job.get("stage_version", 1):
        said.append(f"encode stage version {rec.get('stage_version', 1)} there, {job.get('stage_version', 1)} here")
    if rec.get("parts") != job["parts"]:
        said.append(f"{rec.get('parts')} parts there, {job['parts']} here")
    return "; ".join(said) or "other settings"


def _done(out: Path, split: str, unit: int) -> bool:
    return (out / WORK / split / f"{unit:06d}.json").is_file() and (out / split / f"{unit:06d}.npy").is_file()


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


def run(
    cfg, force: bool = False, num_shards: int = 1, shard_index: int = 0, tokenizer_loader: Callable = load_tokenizer
) -> dict:
    """Encode ``data/splits/<name>/*.parquet`` into ``shards/<name>/`` (see the module docstring).

    Args:
        cfg: XLab configuration (uses ``shards.seq_len``, ``shards.articles_per_shard``,
            ``shards.num_proc``, the paths and ``data.name``).
        force: redo the stage (this part's units) even if up to date.
        num_shards, shard_index: encode only the units ``u % num_shards == shard_index`` (see
            :func:`choose_part` for the part a launcher gives). Parts may run at once in one
            folder; the part that finds every unit of every part done writes the manifest (parts
            in separate folders: ``xlab data merge`` once they are copied together). A part run on
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
    with output_lock(out, "encode", shared=True), output_lock(out, "encode", f"part-{shard_index}-of-{num_shards}"):
        return _run_part(cfg, force, num_shards, shard_index, tokenizer_loader)


def _inputs(cfg: DictConfig, tokenizer_loader: Callable) -> tuple[dict[str, Path], Path, Any]:
    """The split files, the tokenizer's path and the loaded tokenizer (XLabError when missing)."""
    split_files = _split_files(cfg)
    tok_path = stage_paths(cfg).tokenizer
    if not tok_path.is_file():
        raise XLabError(f"tokenizer not found ({tok_path}); run `xlab tokenizer train` first")
    try:
        tok = tokenizer_loader(str(tok_path))
    except ValueError as e:  # an empty, foreign or damaged .model file
        raise XLabError(
            f"{tok_path} is not a usable XLab tokenizer ({e}); run `xlab tokenizer train --force`"
        ) from None
    return split_files, tok_path, tok


def _run(cfg: DictConfig, force: bool, tokenizer_loader: Callable) -> dict:
    """The whole store in one process (it holds the store's exclusive lock)."""
    split_files, tok_path, tok = _inputs(cfg, tokenizer_loader)
    out = stage_paths(cfg).shards
    job = _job(cfg, tok, split_files, tok_path)
    mpath = out / "manifest.json"
    build = out.parent / f".{out.name}.rebuild"  # where a complete store is rebuilt (see below)
    if not force and _up_to_date(out, job):
        shutil.rmtree(build, ignore_errors=True)  # a killed --force rebuild the user did not rerun
        skipped("encode", mpath)
        return read_json(mpath)
    if not mpath.exists() and _up_to_date(build, job):  # a rebuild killed between its two renames
        _swap(build, out)
        return read_json(mpath)
    if mpath.exists():
        # Never damage a complete store, even an outdated one: build the new one beside it and
        # swap the folders when it is complete (a failure or Ctrl-C leaves the old one in place).
        _encode(build, job, cfg, split_files, tok_path, tokenizer_loader, False, 1, 0)  # resumes a killed rebuild
        manifest = _finalize(build, job, shown=out)
        _swap(build, out)
        return manifest
    _encode(out, job, cfg, split_files, tok_path, tokenizer_loader, force, 1, 0)
    return _finalize(out, job)


def _job_lock(out: Path):
    """The short critical sections the parts of one store take in turn: creating or checking the
    job record, and deciding who writes the manifest."""
    return exclusive_lock(lock_path(out, "job"), f"{out} (encode job record)", wait=None)


def _run_part(cfg: DictConfig, force: bool, num_shards: int, shard_index: int, tokenizer_loader: Callable) -> dict:
    """One part of the store; other parts of the same job may be running into the same folder."""
    split_files, tok_path, tok = _inputs(cfg, tokenizer_loader)
    out = stage_paths(cfg).shards
    job = _job(cfg, tok, split_files, tok_path, parts=num_shards)
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

    if not force and _up_to_date(out, job):
        shutil.rmtree(out.parent / f".{out.name}.rebuild", ignore_errors=True)  # a killed whole-store rebuild
        return complete()
    with _job_lock(out):
        if _join(out, job, force) == "complete":
            return complete()
    n_mine = _encode_units(out, job, cfg, split_files, tok_path, tokenizer_loader, force, num_shards, shard_index)
    with _job_lock(out):
        return _finish_part(out, job, shard_index, n_mine)


def _join(out: Path, job: dict, force: bool) -> str:
    """Join the job recorded in ``out``, or record this one when there is none; under the job lock.

    Returns "joined" (the record is this job's), "created" (this part recorded the job, after
    clearing what an earlier job left) or "complete" (the store was completed meanwhile).

    Raises:
        XLabError: the folder holds another job's record; nothing is changed.
    """
    work = out / WORK
    rec = read_manifest(work / "job.json")
    if rec is not None and not _same_job(rec, job):
        raise XLabError(
            f"{out} holds another encode job ({_disagreement(rec, job)}); run this part with the "
            f"recorded settings, or stop every part of that job and remove {work} to start this one"
        )
    for p in [*out.glob(".*.tmp"), *work.glob(".*.tmp")]:  # a killed job-lock holder's temporaries
        p.unlink(missing_ok=True)
    if rec is not None:
        if (out / "manifest.json").is_file():  # the last part was killed between manifest and clean-up
            if not force and _up_to_date(out, job):
                shutil.rmtree(work, ignore_errors=True)
                return "complete"
            (out / "manifest.json").unlink()  # the store is about to change: it is no longer complete
        return "joined"
    if not force and (out / "manifest.json").is_file() and _up_to_date(out, job):
        return "complete"  # the last part finished (and removed the record) since we looked
    # No record: nothing in the folder belongs to this job (an outdated store, a store being redone,
    # a record removed by hand), and no stale shard may linger beside the new ones. Only the creator
    # clears, under the lock, before the record exists: a part that joins never sees this.
    (out / "manifest.json").unlink(missing_ok=True)
    for s in SPLITS:
        shutil.rmtree(out / s, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    data = (json.dumps(job, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    if not create_once(work / "job.json", data):  # only without a working lock (another creator won)
        rec = read_manifest(work / "job.json")
        if not _same_job(rec, job):
            raise XLabError(f"{out} holds another encode job ({_disagreement(rec or {}, job)}); another part won")
        return "joined"
    return "created"


def _finish_part(out: Path, job: dict, shard_index: int, n_mine: int) -> dict:
    """After this part's units: write the manifest when every part's units are done (this part
    finished last), else say which parts are still to come; under the job lock."""
    num_shards = job["parts"]
    if (out / "manifest.json").is_file() and not (out / WORK / "job.json").exists():
        console.print(
            f"[bold]encode[/bold]: part {shard_index} of {num_shards} complete; the store {out} is complete",
            soft_wrap=True,
        )
        return read_json(out / "manifest.json")  # another part, finishing at the same time, wrote it
    left = [
        i
        for i in range(num_shards)
        if not all(_done(out, s, u) for s in SPLITS for u in range(i, job["units"][s], num_shards))
    ]
    if not left:
        console.print(
            f"[bold]encode[/bold]: part {shard_index} of {num_shards} finished last; writing the manifest",
            soft_wrap=True,
        )
        return _finalize(out, job)
    console.print(
        f"[bold]encode[/bold]: part {shard_index} of {num_shards} complete ({n_mine} units in {out}); "
        f"parts not done yet: {left}. The last part to finish writes the manifest (parts encoded in "
        f"separate folders: copy them into one, then run `xlab data merge`).",
        soft_wrap=True,
    )
    return {"part": shard_index, "num_shards": num_shards, "units": n_mine, "parts_missing": left}


def _encode(
    out: Path,
    job: dict,
    cfg: DictConfig,
    split_files: dict[str, Path],
    tok_path: Path,
    tokenizer_loader: Callable,
    force: bool,
    num_shards: int,
    shard_index: int,
) -> int:
    """Encode every unit not done yet into ``out``, a folder this process holds alone (resuming a
    killed run of the same job, whatever its number of parts); return the number of units."""
    # From here the store is being changed: first make sure no manifest claims it is complete.
    (out / "manifest.json").unlink(missing_ok=True)
    work = out / WORK
    if not _same_job(read_manifest(work / "job.json"), job, parts=False):
        # No record of this job (other parameters or inputs, or a finished store being redone):
        # nothing in the folder can be reused, and no stale shard may linger beside the new ones.
        for s in SPLITS:
            shutil.rmtree(out / s, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    for p in out.glob("**/.*.tmp"):  # temporaries of a killed run
        p.unlink(missing_ok=True)
    atomic_write_json(work / "job.json", job)
    return _encode_units(out, job, cfg, split_files, tok_path, tokenizer_loader, force, num_shards, shard_index)


def _encode_units(
    out: Path,
    job: dict,
    cfg: DictConfig,
    split_files: dict[str, Path],
    tok_path: Path,
    tokenizer_loader: Callable,
    force: bool,
    num_shards: int,
    shard_index: int,
) -> int:
    """Encode the units of part ``shard_index`` that are not done yet (the job is recorded in
    ``out``); return the number of units of this part. Touches only this part's files."""
    work = out / WORK
    if num_shards > 1:  # a killed run's temporaries of this part's units (other parts' are in use)
        for d in [out / s for s in SPLITS] + [work / s for s in SPLITS]:
            for p in d.glob(".*.tmp"):
                if p.name[1:7].isdigit() and int(p.name[1:7]) % num_shards == shard_index:
                    p.unlink(missing_ok=True)
    a = job["params"]["articles_per_shard"]
    mine = {s: [u for u in range(job["units"][s]) if u % num_shards == shard_index] for s in SPLITS}
    if force:
        for s in SPLITS:
            for u in mine[s]:
                (work / s / f"{u:06d}.json").unlink(missing_ok=True)
    todo = {s: {u for u in mine[s] if not _done(out, s, u)} for s in SPLITS}
    n_todo = sum(len(v) for v in todo.values())
    n_mine = sum(len(v) for v in mine.values())
    num_proc = int(cfg.shards.num_proc or os.cpu_count() or 1)
    # Tokenizer threads per process: the cores divided among the processes (one process with all
    # cores' threads avoids the pool altogether).
    threads = max(1, (os.cpu_count() or 1) // num_proc)
    settings = {"seq_len": job["params"]["seq_len"], "out": str(out), "dtype": job["dtype"], "threads": threads,
                "layout": job["params"].get("layout", "padded")}  # fmt: skip
    units = (u for s in SPLITS if todo[s] for u in _iter_units(split_files[s], s, todo[s], a))
    # The bar counts articles, not units: a split's last unit is shorter, and an article is the
    # unit of the download and split stages' rates too.
    n_articles = sum(min(a, job["articles"][s] - u * a) for s in SPLITS for u in todo[s])
    label = f"encode ({n_mine - n_todo}/{n_mine} units done before)" if n_todo < n_mine else "encode"
    _execute(units, n_todo, n_articles, num_proc, tokenizer_loader, str(tok_path), settings, label)
    return n_mine


def _swap(build: Path, out: Path) -> None:
    """Put the complete store ``build`` where ``out`` is, then delete the old one. A kill between the
    two renames leaves ``build`` complete and no ``out``: the next run finishes the swap."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(build, out)
    shutil.rmtree(old, ignore_errors=True)


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


def _up_to_date(out: Path, job: dict) -> bool:
    m = read_manifest(out / "manifest.json")
    if m is None:
        return False
    try:
        files = [out / sh["file"] for info in m.get("splits", {}).values() for sh in info.get("shards", [])]
    except (AttributeError, KeyError, TypeError):  # a manifest of the wrong shape: redo the store
        return False
    files.append(out / "tokenizer.model")
    if not is_up_to_date(
        out / "manifest.json", job["params"], job["inputs"], files, stage_version=job.get("stage_version", 1)
    ):
        return False
    from xlab.store import ShardStore

    try:  # a shard or a count changed since it was written is not up to date (one read of the store)
        ShardStore(out).verify()
    except XLabError as e:
        console.print(f"[yellow]encode: {e}; encoding again[/yellow]", markup=True, highlight=False)
        return False
    return True


def _finalize(out: Path, job: dict, shown: Path | None = None) -> dict:
    """Write the store manifest from the done-records (every unit must be done); print a summary
    naming ``shown`` (default ``out``): where the store will be once swapped into place."""
    from xlab.store import MANIFEST, TOKENIZER_COPY, ShardEntry, SplitEntry, StoreManifest, TokenizerEntry, split_layout

    work = out / WORK
    missing = [f"{s}/{u:06d}" for s in SPLITS for u in range(job["units"][s]) if not _done(out, s, u)]
    if missing:
        raise XLabError(
            f"{len(missing)} unit(s) not encoded yet (e.g. {', '.join(missing[:3])}); run the "
            f"missing `xlab data encode --num-shards N --shard-index I` parts (the last one to finish "
            f"writes the manifest)"
        )
    tok_src = Path(job["tokenizer_file"])
    tok_bytes = tok_src.read_bytes()
    from xlab.fsio import sha256_bytes

    if sha256_bytes(tok_bytes) != job["inputs"]["tokenizer"]:
        raise XLabError(f"{tok_src} changed since encoding began; run `xlab data encode --force`")
    splits = {}
    for s in SPLITS:
        entry = SplitEntry(layout=split_layout(s, job["params"].get("layout", "padded")))
        for u in range(job["units"][s]):
            rec = read_json(work / s / f"{u:06d}.json")
            entry.add_shard(
                ShardEntry(rec["file"], rec["rows"], rec["real_tokens"], rec["sha256"]),
                articles=rec["articles"],
                target_tokens=rec["target_tokens"],
                text_bytes=rec["text_bytes"],
                text_chars=rec["text_chars"],
            )
            entry.empty_articles += rec["empty"]
            entry.rejected_articles += len(rec["rejected"])
            room = MAX_ERRORS_KEPT - len(entry.rejected)
            entry.rejected.extend(rec["rejected"][: max(room, 0)])
        splits[s] = entry
    atomic_write_bytes(out / TOKENIZER_COPY, tok_bytes)  # the store carries its own tokenizer
    manifest = StoreManifest(
        seq_len=job["params"]["seq_len"],
        dtype=job["dtype"],
        tokenizer=TokenizerEntry(
            **job["tokenizer"], file=job["tokenizer_file"], copy=TOKENIZER_COPY, sha256=job["inputs"]["tokenizer"]
        ),
        splits=splits,
        params=job["params"],
        inputs=job["inputs"],
        stage="encode",
        stage_version=job.get("stage_version", 1),
        xlab_version=__version__,
    ).to_json()
    atomic_write_json(out / MANIFEST, manifest)
    shutil.rmtree(work, ignore_errors=True)
    _print_summary(shown or out, manifest)
    return manifest


def _print_summary(out: Path, m: dict) -> None:
    from rich.table import Table

    t = Table(title=f"shard store {out} (seq_len {m['seq_len']}, {m['dtype']})")
    for c in ("split", "articles", "empty", "rejected", "rows", "targets", "text MB", "shards"):
        t.add_column(c, justify="right" if c != "split" else "left")
    for s, i in m["splits"].items():
        t.add_row(
            s,
            f"{i['articles']:,}",
            f"{i['empty_articles']:,}",
            f"{i['rejected_articles']:,}",
            f"{i['rows']:,}",
            f"{i['target_tokens']:,}",
            f"{i['text_bytes'] / 1e6:,.2f}",
            str(len(i["shards"])),
        )
    console.print(t)


def merge(cfg: DictConfig) -> dict:
    """Write the manifest of a store encoded in parts (``--num-shards/--shard-index``).

    Every part's shards and ``.work/`` records must be in ``shards/<name>/``.

    Raises:
        XLabError: nothing to merge, or units still missing (names how many and examples).
    """
    out = stage_paths(cfg).shards
    with output_lock(out, "merge"):
        return _merge(out)


def _merge(out: Path) -> dict:
    job = read_manifest(out / WORK / "job.json")
    if job is None:
        if (out / "manifest.json").is_file():
            from xlab.store import ShardStore

            store = ShardStore(out)  # XLabError for a manifest that is not a store's
            # The parts' records are gone once merged: a redo is a new encode, not a merge.
            skipped("merge", out / "manifest.json", "the store is complete; `xlab data encode --force` rebuilds it")
            return store.manifest
        raise XLabError(f"nothing to merge in {out}; run `xlab data encode --num-shards N --shard-index I` first")
    return _finalize(out, job)
