"""What a run starts from: a fresh run folder, or ``--resume`` from ``last.pt`` with the configuration
reconciled (the model section is the checkpoint's; train settings may change and are reported)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from xlab.checkpoint import load_checkpoint
from xlab.config import from_dict, to_dict
from xlab.errors import XLabError

# Model settings that come from the store, not from the user: they never count as a change.
FROM_STORE = ("vocab_size", "max_len")


def start_checkpoint(ckpt_dir: Path, resume: bool, tokenizer_sha256: str, store_path: Path) -> Optional[dict]:
    """The checkpoint a run continues from: ``last.pt`` with ``resume``, else None.

    Raises:
        XLabError: ``resume`` without ``last.pt``; a ``last.pt`` trained with another tokenizer than the
            store's; a fresh run over a folder that already has checkpoints (it would mix two runs).
    """
    run_dir = ckpt_dir.parent
    if resume:
        last = ckpt_dir / "last.pt"
        if not last.is_file():
            raise XLabError(f"nothing to resume: {last} does not exist; drop --resume to start a new run")
        ckpt = load_checkpoint(last)
        if ckpt.get("tokenizer_sha256") != tokenizer_sha256:
            raise XLabError(f"{last} was trained on a store with another tokenizer than {store_path}")
        return ckpt
    if ckpt_dir.is_dir() and any(ckpt_dir.glob("*.pt")):
        raise XLabError(
            f"run folder {run_dir} already has checkpoints; pass --resume to continue it "
            "or --run-name to start a new run"
        )
    return None


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


def reconcile(
    cfg: DictConfig, ckpt: Optional[dict], run_dir: Path, *, vocab_size: int, max_len: int
) -> tuple[DictConfig, list[str]]:
    """The configuration in force and the train settings that changed since the checkpoint.

    The model's ``vocab_size`` and ``max_len`` are the store's. On resume the model section must
    equal the checkpoint's (the architecture cannot change mid-run); train settings may change
    (e.g. a larger ``max_steps``), each reported as ``"key old->new"``, except ``train.optimizer``
    (the checkpoint holds that optimizer's state).

    Raises:
        XLabError: a model setting that differs from the checkpoint's, naming every such key; another
            ``train.optimizer`` than the checkpoint's.
    """
    cfg = from_dict(to_dict(cfg))
    cfg.model.vocab_size, cfg.model.max_len = int(vocab_size), int(max_len)
    if ckpt is None:
        return cfg, []
    d = to_dict(cfg)
    # A key the checkpoint's XLab did not have yet had its default then (e.g. qk_norm before 0.5).
    saved = to_dict(from_dict({"model": dict(ckpt["config"]["model"])}))["model"]
    asked = d["model"]
    differ = sorted(k for k in set(saved) | set(asked) if k not in FROM_STORE and saved.get(k) != asked.get(k))
    if differ:
        what = ", ".join(f"{k} {saved.get(k)!r} (checkpoint) vs {asked.get(k)!r} (asked)" for k in differ)
        raise XLabError(
            f"model settings cannot change on --resume: {what}; resume with the run's "
            f"settings ({run_dir / 'config.yaml'}) or start a new run with --run-name"
        )
    d["model"] = saved
    cfg = from_dict(d)
    old = ckpt["config"].get("train", {})
    if str(old.get("optimizer", "adamw")) != str(cfg.train.optimizer):
        raise XLabError(
            f"train.optimizer cannot change on --resume ({old.get('optimizer', 'adamw')} in the checkpoint, "
            f"{cfg.train.optimizer} asked): its state is the optimizer's; start a new run with --run-name"
        )
    changed = [f"{k} {old.get(k)!r}->{v!r}" for k, v in to_dict(cfg)["train"].items() if k in old and old[k] != v]
    return cfg, changed


def take_store_settings(cfg: DictConfig, *, seq_len: int, vocab_size: int, layout: str = "padded") -> list[str]:
    """Set ``shards.seq_len``, ``shards.layout`` (the train split's) and ``tokenizer.vocab_size`` of
    ``cfg`` to the store's (the trainer can apply no other: the rows are what the store holds), so the
    saved configuration says what was used; return a notice for each setting that said otherwise."""
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
