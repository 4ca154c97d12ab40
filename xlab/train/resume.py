"""What a run starts from: a fresh run folder, or ``--resume`` from ``last.pt`` with the configuration
reconciled (the model section is the checkpoint's; train settings may change and are reported), and
the one definition of "the same run" (:func:`run_differences`) that ``--resume`` and ``xlab pipeline``
both use."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from xlab.checkpoint import load_checkpoint
from xlab.config import from_dict, saved_config, to_dict
from xlab.errors import XLabError

# The sections that define a run, and the settings in them that change neither the data a run sees
# nor the weights it computes (where it runs, how often it logs, evaluates and saves, how fast).
RUN_SECTIONS = ("data", "tokenizer", "shards", "model", "train")
NOT_IDENTITY = frozenset(
    {"num_proc", "num_threads", "threads", "device", "log_every", "eval_every", "eval_batches",
     "checkpoint_every", "keep_best", "compile", "hf_timeout_s"}
)  # fmt: skip


def run_identity(cfg: dict) -> dict[str, object]:
    """What defines a training run in the configuration ``cfg`` (a :func:`~xlab.config.to_dict`
    dict, e.g. a checkpoint's): ``{"section.key": value}`` over :data:`RUN_SECTIONS` without
    :data:`NOT_IDENTITY`. Each section is read through today's schema where it can be, so a key an
    older XLab did not have counts with its default (e.g. ``model.qk_norm`` before 0.5: off), and the
    store's ``model.vocab_size`` / ``max_len`` that configurations before 0.7 held are left out."""
    out: dict[str, object] = {}
    for section in RUN_SECTIONS:
        values = cfg.get(section) or {}
        try:
            values = to_dict(from_dict({section: dict(values)}))[section]
        except Exception:  # noqa: BLE001 - a setting this XLab no longer has: compare what was saved
            values = dict(values)
        out |= {f"{section}.{k}": v for k, v in values.items() if k not in NOT_IDENTITY}
    return out


def run_differences(saved: dict, asked: dict) -> dict[str, tuple]:
    """The settings that make ``asked`` another run than ``saved`` (both :func:`~xlab.config.to_dict`
    dicts): ``{"section.key": (saved value, asked value)}``, sorted by key; empty for the same run.
    ``xlab pipeline`` retrains on any difference; ``--resume`` refuses those of the model section and
    ``train.optimizer``, and reports the others."""
    a, b = run_identity(saved), run_identity(asked)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def start_checkpoint(ckpt_dir: Path, resume: bool, tokenizer_sha256: str, store_path: Path) -> Optional[dict]:
    """The checkpoint a run continues from: ``last.pt`` with ``resume``, else None.

    Raises:
        XLabError: ``resume`` without ``last.pt``; a ``last.pt`` with a configuration this XLab cannot
            build (:func:`~xlab.config.saved_config`) or impossible counters (:func:`check_counters`),
            or trained with another tokenizer than the store's; a fresh run over a folder that already has checkpoints (it would mix two runs).
    """
    run_dir = ckpt_dir.parent
    if resume:
        last = ckpt_dir / "last.pt"
        if not last.is_file():
            raise XLabError(f"nothing to resume: {last} does not exist; drop --resume to start a new run")
        ckpt = load_checkpoint(last)
        saved_config(ckpt, last)  # the run's model and settings must be ones this XLab can build
        check_counters(ckpt, last)
        if ckpt.get("tokenizer_sha256") != tokenizer_sha256:
            raise XLabError(f"{last} was trained on a store with another tokenizer than {store_path}")
        return ckpt
    if ckpt_dir.is_dir() and any(ckpt_dir.glob("*.pt")):
        raise XLabError(
            f"run folder {run_dir} already has checkpoints; pass --resume to continue it "
            "or --run-name to start a new run"
        )
    return None


def _count(value: object, low: int = 0) -> bool:
    """Whether ``value`` is an integer (not a bool) of at least ``low``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _problem(ckpt: dict) -> Optional[str]:
    """The first counter of ``ckpt`` that no run can have reached, described; None when all can. A
    missing one is left to the loading of the training state, which reports the file incomplete."""
    step, total = ckpt.get("step"), ckpt.get("total_steps")
    if step is not None and not _count(step):
        return f"step {step!r} is not a count of steps (0 or more)"
    if total is not None and not _count(total, 1):
        return f"total_steps {total!r} is not a count of steps (1 or more)"
    if None not in (step, total) and step > total:  # a run stops at its total and saves nothing after it
        return f"step {step} is beyond its run's total_steps {total}"
    loader = ckpt.get("loader", {"epoch": 0, "position": 0})
    if not isinstance(loader, dict) or not all(_count(loader.get(k)) for k in ("epoch", "position")):
        return f"loader state {loader!r} has no epoch and position (counts, 0 or more)"
    elapsed = ckpt.get("elapsed_s", 0.0)
    if not isinstance(elapsed, (int, float)) or not 0 <= elapsed < math.inf:
        return f"elapsed_s {elapsed!r} is not a number of seconds"
    best = ckpt.get("best", [])
    if not isinstance(best, list):
        return f"best list {best!r} is not a list"
    for b in best:
        # The keeper deletes the files that fall out of this list: each must be its own snapshot's name.
        ok = isinstance(b, dict) and _count(b.get("step"), 1) and b["step"] <= (math.inf if step is None else step)
        ok = ok and b.get("file") == f"best-step{b['step']:07d}.pt" and isinstance(b.get("loss"), (int, float))
        if not ok or not math.isfinite(b["loss"]):
            return f"best list entry {b!r} is not a snapshot of this run (step 1..{step}, best-stepNNNNNNN.pt, a loss)"
    return None


def check_counters(ckpt: dict, last: Path) -> None:
    """Refuse a checkpoint whose counters no run can have reached (edited, or damaged without the file
    failing to load): ``step`` and ``total_steps`` not counts or step beyond total_steps, a loader
    ``epoch`` or ``position`` not a count (a position beyond the store's batches is refused when the
    loader takes it), ``elapsed_s`` not a finite number of seconds, a ``best`` entry that is not a
    snapshot of this run (the keeper deletes what falls out of that list, so a name must be a
    ``best-stepNNNNNNN.pt`` of its folder). Resuming from any of these would train a wrong number of
    steps, on other data, or remove another file.

    Raises:
        XLabError: one line naming the counter.
    """
    problem = _problem(ckpt)
    if problem:
        raise XLabError(f"cannot resume from {last}: its {problem}; the file was edited or is damaged")


def store_record(store) -> dict:
    """What a checkpoint records of the store its run trains on: rows of how many tokens, which
    layout, how many train rows (the loader's position counts batches of those rows)."""
    return {"seq_len": int(store.seq_len), "layout": store.layout("train"), "train_rows": int(store.rows("train"))}


def check_store(ckpt: Optional[dict], store, last: Path) -> None:
    """Refuse to resume ``ckpt`` on a store whose rows differ from its run's (another ``seq_len``
    would exceed the model's ``max_len`` or shift every position; another layout or row count would
    make the loader's saved position point into other data). Checkpoints from before 0.6 record only
    ``seq_len`` (in their configuration).

    Raises:
        XLabError: one line naming what differs and the store the run trained on.
    """
    if ckpt is None:
        return
    was = dict(ckpt.get("store") or {})
    was.setdefault("seq_len", (ckpt.get("config", {}).get("shards") or {}).get("seq_len"))
    now = store_record(store)
    differ = [f"{k.replace('_', ' ')} {was[k]} there, {now[k]} here" for k in now if was.get(k) is not None
              and was[k] != now[k]]  # fmt: skip
    if differ:
        raise XLabError(
            f"cannot resume {last} on the shard store at {store.path}: its run trained on another store "
            f"({'; '.join(differ)}); resume with --shards {ckpt.get('shards', '<its store>')} or start a new "
            "run with --run-name"
        )


def reconcile(cfg: DictConfig, ckpt: Optional[dict], run_dir: Path) -> list[str]:
    """The train settings that changed since the checkpoint ``ckpt`` (None: a fresh run, none), each
    as ``"key old->new"``: train settings may change on resume (e.g. a larger ``max_steps``); the
    model section and ``train.optimizer`` (the checkpoint holds that optimizer's state) may not.

    Raises:
        XLabError: a model setting that differs from the checkpoint's, naming every such key; another
            ``train.optimizer`` than the checkpoint's.
    """
    if ckpt is None:
        return []
    diff = run_differences(ckpt["config"], to_dict(cfg))
    model = {k.split(".", 1)[1]: v for k, v in diff.items() if k.startswith("model.")}
    if model:
        what = ", ".join(f"{k} {old!r} (checkpoint) vs {new!r} (asked)" for k, (old, new) in model.items())
        raise XLabError(
            f"model settings cannot change on --resume: {what}; resume with the run's "
            f"settings ({run_dir / 'config.yaml'}) or start a new run with --run-name"
        )
    old = ckpt["config"].get("train", {})
    if "train.optimizer" in diff:
        raise XLabError(
            f"train.optimizer cannot change on --resume ({old.get('optimizer', 'adamw')} in the checkpoint, "
            f"{cfg.train.optimizer} asked): its state is the optimizer's; start a new run with --run-name"
        )
    return [f"{k} {old.get(k)!r}->{v!r}" for k, v in to_dict(cfg)["train"].items() if k in old and old[k] != v]


def take_store_settings(cfg: DictConfig, *, seq_len: int, vocab_size: int, layout: str = "padded") -> list[str]:
    """Record in ``cfg`` the store's ``shards.seq_len``, ``shards.layout`` (the train split's) and
    ``tokenizer.vocab_size``, so the run's saved configuration says which rows it trained on (a
    ``--resume`` from it finds the same store); return a notice for each setting that said otherwise.
    The model does not read these: it is built from :meth:`~xlab.config.ModelConfig.of` the store."""
    notes = []
    store = (
        ("seq_len", cfg.shards, seq_len),
        ("layout", cfg.shards, layout),
        ("vocab_size", cfg.tokenizer, vocab_size),
    )
    for key, section, value in store:
        if str(section[key]) != str(value):
            notes.append(f"{key} {section[key]} -> {value} (the shard store's)")
            section[key] = type(section[key])(value)  # the declared type (an int, or the Layout choice)
    return notes
