"""``xlab pipeline``: every stage in order, each skipped when its manifest is up to date.

download -> split -> tokenizer train -> encode -> stats -> train (and its curves,
``runs/<run>/curves.png``) -> evaluate -> generate. The closing
summary puts the final validation loss next to a unigram model of the train split (the loss a model
that ignores context would reach), and times every stage.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig
from rich.table import Table

from pipelines import download, encode, split, stats, train_tokenizer
from pipelines.stage import console
from xlab.checkpoint import load_checkpoint, load_model
from xlab.commands import evaluate as evaluate_cmd
from xlab.config import stage_paths, to_dict
from xlab.errors import XLabError
from xlab.fsio import atomic_write_json, read_json, sha256_file
from xlab.plot import plot_runs
from xlab.store import ShardStore


def run(cfg: DictConfig, *, force: bool = False, prompt: str = "The history of") -> dict:
    """Run every stage; returns ``{"times_s": {stage: seconds}, "val_loss", "unigram_loss", "text",
    "train", "curves"}`` (``curves``: the path of the run's loss-curve PNG, beside its checkpoints).

    Raises:
        XLabError: from whichever stage fails (its message names the problem).
    """
    times: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        times[name] = time.perf_counter() - t0
        return out

    timed("download", download.run, cfg, force=force)
    timed("split", split.run, cfg, force=force)
    timed("tokenizer", train_tokenizer.run, cfg, force=force)
    timed("encode", encode.run, cfg, force=force)
    timed("stats", stats.run, cfg)

    summary = timed("train", _train, cfg, force)
    paths = stage_paths(cfg)
    # redrawn every time (a second): a resumed or extended run's picture then shows all its steps
    curves = timed("curves", plot_runs, [paths.run], paths.run / "curves.png")
    console.print(f"[bold]curves[/bold]: {curves}")
    last = paths.run / "checkpoints" / "last.pt"
    metrics = timed("evaluate", _evaluate, cfg, last, paths.shards, force)
    store = ShardStore(paths.shards)
    unigram = stats.unigram_baseline(store, fit_split="train", eval_split="val")

    def _generate():
        from xlab.generate import generate

        model, _, tok = load_model(last, device="cpu")
        g = cfg.generate
        return generate(
            model,
            tok,
            prompt,
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            top_k=g.top_k,
            top_p=g.top_p,
            seed=g.seed,
        )

    text = timed("generate", _generate)

    table = Table(title="XLab pipeline summary")
    table.add_column("stage")
    table.add_column("time (s)", justify="right")
    for name, secs in times.items():
        table.add_row(name, f"{secs:.1f}")
    table.add_row("[bold]total", f"[bold]{sum(times.values()):.1f}")
    console.print(table)
    val_loss = float(metrics["loss"])
    res = Table(title="Validation (whole val split)")
    for col in ("model", "loss (nats/token)", "perplexity", "bits per byte"):
        res.add_column(col, justify="right" if col != "model" else "left")
    res.add_row("XLab decoder", f"{val_loss:.3f}", f"{math.exp(val_loss):.1f}", f"{metrics['bits_per_byte']:.3f}")
    ub = unigram * metrics["bits_per_byte"] / val_loss if val_loss > 0 else float("nan")
    res.add_row("unigram of train split", f"{unigram:.3f}", f"{math.exp(unigram):.1f}", f"{ub:.3f}")
    console.print(res)
    console.rule(f"[bold]Generated from {prompt!r}")
    console.print(text, markup=False, highlight=False)
    return {
        "times_s": times,
        "val_loss": val_loss,
        "unigram_loss": unigram,
        "text": text,
        "train": summary,
        "curves": str(curves),
    }


def _train(cfg: DictConfig, force: bool):
    """Train, resume an interrupted run, or skip a finished one with the same configuration."""
    from xlab.train import train  # imports torch: only once training is due

    run_dir = stage_paths(cfg).run
    status, differ = _run_status(run_dir, cfg)
    if force and status != "none":
        shutil.rmtree(run_dir)
        status = "none"
    if status == "finished":
        console.print(
            f"[bold]train[/bold]: up to date ({run_dir}); --force redoes every stage, or train "
            f"another run with -o train.run_name=NAME"
        )
        return None
    if status == "different":
        what = "; ".join(f"{k} {old!r} there, {new!r} here" for k, (old, new) in list(differ.items())[:3])
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise XLabError(
            f"{run_dir} holds a run with other settings ({what}{more}); pass the same settings, choose "
            f"another run with -o train.run_name=NAME, or retrain it with --force (every stage is redone)"
        )
    return train(cfg, shards_dir=None, resume=(status == "partial"))


def _evaluate(cfg: DictConfig, last: Path, shards: Path, force: bool) -> dict:
    """The metrics of ``last`` on the whole val split of ``shards``, reused from the run's
    ``eval-val.json`` when that names the same checkpoint file and store (a whole-split evaluation
    of the same weights on the same rows gives the same numbers)."""
    record = last.parent.parent / "eval-val.json"
    key = _evaluation_key(last, shards)
    if not force and record.is_file():
        try:
            old = read_json(record)
        except (OSError, ValueError):  # damaged or half-copied: evaluate again and replace it
            old = None
        if isinstance(old, dict) and old.get("key") == key and isinstance(old.get("metrics"), dict):
            console.print(f"[bold]evaluate[/bold]: up to date ({record}); --force redoes it")
            return old["metrics"]
    metrics = evaluate_cmd.run(
        last, split="val", shards_dir=shards, device=cfg.train.device, max_batches=None, json_out=None
    )
    atomic_write_json(record, {"key": key, "metrics": metrics})
    return metrics


def _evaluation_key(last: Path, shards: Path) -> dict:
    """What an evaluation's result depends on: the checkpoint file (a resumed or retrained run
    rewrites it, changing its size or mtime) and the store's manifest (re-encoding rewrites it)."""
    st = last.stat()
    manifest = shards / "manifest.json"
    return {
        "checkpoint": str(last),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "shards": str(shards),
        "manifest_sha256": sha256_file(manifest) if manifest.is_file() else None,
    }


def _run_status(run_dir: Path, cfg: DictConfig) -> tuple[str, dict]:
    """``none`` (no checkpoint), ``finished`` / ``partial`` (the same run, done or not: see
    :func:`xlab.train.resume.run_differences`), or ``different`` (another run, which ``--force``
    would replace); with the settings that differ (empty unless ``different``)."""
    from xlab.train.resume import run_differences

    last = run_dir / "checkpoints" / "last.pt"
    if not last.exists():
        return "none", {}
    ckpt = load_checkpoint(last)
    differ = run_differences(ckpt.get("config", {}), to_dict(cfg))
    if differ:
        return "different", differ
    return ("finished" if int(ckpt["step"]) >= int(ckpt["total_steps"]) else "partial"), {}
