"""The parts of an encode: which units a process encodes, and which part writes the manifest.

A *part* is the units ``u % parts == index`` of every split, given by ``--num-shards/--shard-index``
or by the launcher that started the process (:func:`part_from_env`: torchrun, a Slurm job array).
The parts of one job may write into one shared folder at once: the job record
(:class:`~pipelines.encode_job.EncodeJob`) is created once, atomically, by the first part
(:func:`join`), a part of another job (other tokenizer, parameters, inputs or number of parts) is
refused without touching the folder, and the last part to finish writes the manifest
(:func:`finish_part`), which equals the one a single process writes. Parts encoded in separate
folders are copied together and ``xlab data merge`` (:func:`merge`) writes it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.encode_job import WORK, EncodeJob, done, finalize, up_to_date
from pipelines.stage import console, output_lock, read_manifest, skipped
from xlab.config import SPLITS, stage_paths
from xlab.errors import XLabError
from xlab.fsio import create_once, exclusive_lock, lock_path, read_json
from xlab.store.lock import changing

if TYPE_CHECKING:
    from omegaconf import DictConfig

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


# ------------------------------------------------------------------------------------- the parts
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


# ------------------------------------------------------------------------------ the shared folder
def job_lock(out: Path):
    """The short critical sections the parts of one store take in turn: creating or checking the
    job record, and deciding who writes the manifest."""
    return exclusive_lock(lock_path(out, "job"), f"{out} (encode job record)", wait=None)


def join(out: Path, job: EncodeJob, force: bool) -> str:
    """Join the job recorded in ``out``, or record this one when there is none; under the job lock.

    Returns "joined" (the record is this job's), "created" (this part recorded the job, after
    clearing what an earlier job left) or "complete" (the store was completed meanwhile).

    Raises:
        XLabError: the folder holds another job's record; nothing is changed.
    """
    work = out / WORK
    rec = read_manifest(work / "job.json")
    if rec is not None and not job.matches(rec):
        raise XLabError(
            f"{out} holds another encode job ({job.disagreement(rec)}); run this part with the "
            f"recorded settings, or stop every part of that job and remove {work} to start this one"
        )
    for p in [*out.glob(".*.tmp"), *work.glob(".*.tmp")]:  # a killed job-lock holder's temporaries
        p.unlink(missing_ok=True)
    if rec is not None:
        if (out / "manifest.json").is_file():  # the last part was killed between manifest and clean-up
            if not force and up_to_date(out, job):
                shutil.rmtree(work, ignore_errors=True)
                return "complete"
            (out / "manifest.json").unlink()  # the store is about to change: it is no longer complete
        return "joined"
    if not force and (out / "manifest.json").is_file() and up_to_date(out, job):
        return "complete"  # the last part finished (and removed the record) since we looked
    # No record: nothing in the folder belongs to this job (an outdated store, a store being redone,
    # a record removed by hand), and no stale shard may linger beside the new ones. Only the creator
    # clears, under the lock, before the record exists: a part that joins never sees this.
    (out / "manifest.json").unlink(missing_ok=True)
    for s in SPLITS:
        shutil.rmtree(out / s, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    data = (json.dumps(job.to_json(), indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    if not create_once(work / "job.json", data):  # only without a working lock (another creator won)
        rec = read_manifest(work / "job.json")
        if not job.matches(rec):
            raise XLabError(f"{out} holds another encode job ({job.disagreement(rec or {})}); another part won")
        return "joined"
    return "created"


def finish_part(out: Path, job: EncodeJob, shard_index: int, n_mine: int) -> dict:
    """After this part's units: write the manifest when every part's units are done (this part
    finished last), else say which parts are still to come; under the job lock."""
    n = job.parts
    if (out / "manifest.json").is_file() and not (out / WORK / "job.json").exists():
        console.print(
            f"[bold]encode[/bold]: part {shard_index} of {n} complete; the store {out} is complete", soft_wrap=True
        )
        return read_json(out / "manifest.json")  # another part, finishing at the same time, wrote it
    left = [i for i in range(n) if not all(done(out, s, u) for s in SPLITS for u in job.part_units(s, i))]
    if not left:
        console.print(
            f"[bold]encode[/bold]: part {shard_index} of {n} finished last; writing the manifest", soft_wrap=True
        )
        return finalize(out, job)
    console.print(
        f"[bold]encode[/bold]: part {shard_index} of {n} complete ({n_mine} units in {out}); "
        f"parts not done yet: {left}. The last part to finish writes the manifest (parts encoded in "
        f"separate folders: copy them into one, then run `xlab data merge`).",
        soft_wrap=True,
    )
    return {"part": shard_index, "num_shards": n, "units": n_mine, "parts_missing": left}


def merge(cfg: DictConfig) -> dict:
    """Write the manifest of a store encoded in parts (``--num-shards/--shard-index``).

    Every part's shards and ``.work/`` records must be in ``shards/<name>/``.

    Raises:
        XLabError: nothing to merge, a damaged job record, or units still missing (names how many
            and examples).
    """
    out = stage_paths(cfg).shards
    with output_lock(out, "merge", doing="merge"):
        return _merge(out)


def _merge(out: Path) -> dict:
    path = out / WORK / "job.json"
    rec = read_manifest(path)
    if rec is None:
        if (out / "manifest.json").is_file():
            from xlab.store import ShardStore

            store = ShardStore(out)  # XLabError for a manifest that is not a store's
            # The parts' records are gone once merged: a redo is a new encode, not a merge.
            skipped("merge", out / "manifest.json", "the store is complete; `xlab data encode --force` rebuilds it")
            return store.manifest
        raise XLabError(f"nothing to merge in {out}; run `xlab data encode --num-shards N --shard-index I` first")
    job = EncodeJob.from_json(rec, path)
    with changing(out, "merge writes it"):
        return finalize(out, job)
