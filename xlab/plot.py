"""Training curves of run folders as one picture (``xlab plot``): train and val loss (nats per
token) and val bits per byte against optimizer steps, tokens and wall time, one colour per run,
so an ablation is one command.

A run folder is what :mod:`xlab.train` writes: ``metrics.jsonl`` (one record per log and
evaluation step) and ``config.yaml``. Only the main process writes them, and neither records the
number of processes, so the token axis counts the tokens of one process:
``step x train.batch_size x train.grad_accum x shards.seq_len`` (token slots, padding included);
for a run of N processes the run saw N times as many. Val points have no clock of their own:
their wall time is that of the train records around their step (evaluation follows a step).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from xlab.errors import XLabError
from xlab.fsio import atomic_path


@dataclass
class RunCurves:
    """The points of one run: ``train`` and ``val`` map ``step``, ``loss``, ``time`` (wall seconds
    since the run's start) and, for val, ``bits_per_byte`` to equal-length lists (NaN where a
    record lacks the value); ``tokens_per_step`` is one process's token slots per optimizer step."""

    name: str
    train: dict[str, list[float]]
    val: dict[str, list[float]]
    tokens_per_step: int


def _records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill: the run's next write starts a fresh line
        if isinstance(r, dict) and isinstance(r.get("step"), int) and r.get("split") in ("train", "val"):
            out.append(r)
    return out


def _number(r: dict, key: str) -> float:
    v = r.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _tokens_per_step(run: Path) -> int:
    import yaml

    cfg_path = run / "config.yaml"
    try:
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        t, s = cfg["train"], cfg["shards"]
        n = int(t["batch_size"]) * int(t["grad_accum"]) * int(s["seq_len"])
    except FileNotFoundError:
        raise XLabError(f"run folder {run} has no config.yaml (the token axis needs it)") from None
    except (yaml.YAMLError, TypeError, KeyError, ValueError) as e:
        raise XLabError(
            f"{cfg_path} does not give train.batch_size, train.grad_accum and shards.seq_len "
            f"({type(e).__name__}); it is not the config.yaml of an XLab run"
        ) from None
    if n <= 0:
        raise XLabError(f"{cfg_path}: batch_size x grad_accum x seq_len is {n}, not a positive number")
    return n


def read_run(run: str | os.PathLike, name: str | None = None) -> RunCurves:
    """The :class:`RunCurves` of run folder ``run`` (``name`` defaults to the folder's name).

    Raises:
        XLabError: ``run`` is not a run folder (no ``metrics.jsonl``), holds no train record yet,
            or its ``config.yaml`` is missing or lacks the batch settings.
    """
    import numpy as np

    run = Path(run)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise XLabError(f"{run} is not a run folder (no metrics.jsonl); give a folder like runs/<run_name>")
    recs = _records(metrics)
    train = [r for r in recs if r["split"] == "train"]
    val = [r for r in recs if r["split"] == "val"]
    if not train:
        raise XLabError(f"{metrics} holds no train record yet; plot the run after its first log step")
    tr = {k: [_number(r, k) for r in train] for k in ("step", "loss", "time")}
    va = {k: [_number(r, k) for r in val] for k in ("step", "loss", "bits_per_byte")}
    known = [(s, t) for s, t in zip(tr["step"], tr["time"]) if not math.isnan(t)]
    if known:
        steps, times = zip(*known)
        va["time"] = [float(x) for x in np.interp(va["step"], steps, times)]
    else:
        va["time"] = [math.nan] * len(val)
    return RunCurves(name or run.name, tr, va, _tokens_per_step(run))


def _time_unit(runs: list[RunCurves]) -> tuple[str, float]:
    longest = max((t for r in runs for t in r.train["time"] if not math.isnan(t)), default=0.0)
    if longest > 2 * 3600:
        return "hours", 3600.0
    if longest > 2 * 60:
        return "minutes", 60.0
    return "seconds", 1.0


def curves_figure(runs: list[RunCurves]):
    """A matplotlib Figure of 2 x 3 panels: loss (train solid, val dashed with markers) on top and
    val bits per byte below, against steps, tokens (one process's) and wall time. Lines are
    labelled ``<run> train`` and ``<run> val`` (loss) and ``<run>`` (bits per byte); the legends
    are in the panels against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit, per = _time_unit(runs)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), sharex="col", squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(runs):
        c = colours[i % len(colours)]
        xs = {
            "step": (r.train["step"], r.val["step"]),
            "tokens": (
                [s * r.tokens_per_step for s in r.train["step"]],
                [s * r.tokens_per_step for s in r.val["step"]],
            ),
            "time": ([t / per for t in r.train["time"]], [t / per for t in r.val["time"]]),
        }
        for j, (xt, xv) in enumerate(xs.values()):
            axes[0, j].plot(xt, r.train["loss"], color=c, linewidth=1.2, label=f"{r.name} train")
            if r.val["step"]:
                axes[0, j].plot(xv, r.val["loss"], color=c, linestyle="--", marker="o", markersize=3,
                                label=f"{r.name} val")  # fmt: skip
                axes[1, j].plot(xv, r.val["bits_per_byte"], color=c, linestyle="--", marker="o", markersize=3,
                                label=r.name)  # fmt: skip
    from matplotlib.ticker import EngFormatter

    axes[1, 1].xaxis.set_major_formatter(EngFormatter(sep=""))  # 1.2M, not 1200000 run into its neighbour
    for j, xlabel in enumerate(("optimizer step", "tokens (per process)", f"wall time ({unit})")):
        axes[1, j].set_xlabel(xlabel)
        for k in (0, 1):
            axes[k, j].grid(True, alpha=0.3)
    axes[0, 0].set_ylabel("loss (nats/token)")
    axes[1, 0].set_ylabel("val bits per byte")
    for ax in axes[:, 0]:
        if ax.get_lines():
            ax.legend(fontsize="small")
    fig.suptitle("XLab training curves: " + ", ".join(r.name for r in runs))
    fig.tight_layout()
    return fig


def check_png_path(out: str | os.PathLike, option: str = "--out") -> Path:
    """``out`` as a Path once it names a ``.png`` file in a folder that exists.

    Raises:
        XLabError: ``out`` is a folder, does not end in ``.png``, or its folder does not exist
            (refused rather than created: a typo would otherwise make a new tree).
    """
    out = Path(out)
    if out.is_dir() or out.suffix.lower() != ".png":
        what = "a folder" if out.is_dir() else "not .png"
        raise XLabError(f"{option} needs the path of a .png file, got {str(out)!r} ({what}); e.g. {option} curves.png")
    if not out.parent.is_dir():
        raise XLabError(f"{option} {str(out)!r}: folder {str(out.parent)!r} does not exist; create it first")
    return out


def plot_runs(runs: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Draw :func:`curves_figure` of the run folders ``runs`` into the PNG ``out``, replacing it
    atomically if it exists; returns ``out``. A run is labelled with its folder's name, or with
    the path as given when two runs share a name.

    Raises:
        XLabError: a bad ``out`` (see :func:`check_png_path`), a folder that is not a run (see
            :func:`read_run`), no run, the same run twice, or ``out`` cannot be written.
    """
    import matplotlib.pyplot as plt

    out = check_png_path(out)
    if not runs:
        raise XLabError("no run folder to plot; give one or more, e.g. runs/demo")
    resolved = [Path(r).resolve() for r in runs]
    twice = sorted({str(r) for r, p in zip(runs, resolved) if resolved.count(p) > 1})
    if twice:
        raise XLabError(f"run {twice[0]} is given more than once; give each run once")
    names = [Path(r).name for r in runs]
    curves = [read_run(r, Path(r).name if names.count(Path(r).name) == 1 else str(r)) for r in runs]
    fig = curves_figure(curves)
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    except OSError as e:
        raise XLabError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return out
