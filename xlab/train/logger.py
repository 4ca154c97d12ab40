"""Run logging: ``config.yaml``, ``metrics.jsonl``, TensorBoard scalars and the console (a rich
progress bar plus one line per log and evaluation step). Only the main rank writes anything."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from xlab.fsio import atomic_write_text


def fmt(x: Optional[float], spec: str) -> str:
    """``format(x, spec)``, or ``n/a`` for None and NaN."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def live_info(loss: float, tokens_per_s: float, val_loss: Optional[float]) -> str:
    """The progress bar's text after the step count: the step's train loss (nats), the training
    throughput (token slots per second) and the latest validation loss (``val n/a`` before the
    first evaluation)."""
    return f"loss {fmt(loss, '.4f')} | {fmt(tokens_per_s, ',.0f')} tok/s | val {fmt(val_loss, '.4f')}"


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep only the records of ``metrics.jsonl`` up to ``max_step`` (a resumed run rewrites the rest)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def wait_for_a_later_event_file(tb_dir: Path) -> None:
    """Sleep (at most a second) until the clock's second is past that of every event file in
    ``tb_dir``.

    TensorBoard reads a folder's event files in name order, and a name starts with the second it
    was created in and ends with the process id and a counter, which do not sort by time. A
    resumed run's file must come after the points it continues, or TensorBoard drops them as out
    of order; only a resume within a second of the first run's start can tie.
    """
    seconds = []
    for p in Path(tb_dir).glob("events.out.tfevents.*"):
        field = p.name.split(".")[3]
        if field.isdigit():
            seconds.append(int(field))
    if seconds:
        delay = max(seconds) + 1 - time.time()
        if 0 < delay <= 1:
            time.sleep(delay)


def latest_val_loss(path: Path) -> Optional[float]:
    """The loss of the last val record of ``metrics.jsonl`` (nats), or None: the progress bar of a
    resumed run shows it until the run evaluates again."""
    loss = None
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(r, dict) and r.get("split") == "val" and isinstance(r.get("loss"), (int, float)):
                loss = float(r["loss"])
    return loss


class LogWindow:
    """Sums of the train steps since the last log line: loss (nats), correct predictions, targets,
    steps and seconds. It is saved in checkpoints, so a resumed run logs the same train loss and
    accuracy as an uninterrupted one."""

    KEYS = ("loss_sum", "correct", "count", "steps", "seconds")

    def __init__(self) -> None:
        self.loss_sum = self.correct = self.count = self.seconds = 0.0
        self.steps = 0

    def add(self, r: dict, seconds: float) -> None:
        """Add one step's ``{"loss_sum", "correct", "count"}`` and its duration."""
        self.loss_sum += r["loss_sum"]
        self.correct += r["correct"]
        self.count += r["count"]
        self.steps += 1
        self.seconds += seconds

    def mean_loss(self) -> float:
        """Mean loss per target over the window (nats); 0 for a window without targets."""
        return self.loss_sum / max(self.count, 1.0)

    def tokens_per_s(self, tokens_per_step: int) -> float:
        """Training throughput over the window (token slots per second, padding included)."""
        return self.steps * tokens_per_step / max(self.seconds, 1e-9)

    def state_dict(self) -> dict:
        return {k: (int(getattr(self, k)) if k == "steps" else float(getattr(self, k))) for k in self.KEYS}

    def load_state_dict(self, d: object) -> None:
        """Restore :meth:`state_dict` output; anything else (an older checkpoint) keeps the window empty."""
        if isinstance(d, dict) and set(d) == set(self.KEYS):
            for k in self.KEYS:
                setattr(self, k, int(d[k]) if k == "steps" else float(d[k]))


def _threads_note() -> str:
    n = torch.get_num_threads()
    return f" ({n} thread{'s' if n != 1 else ''})"


class RunLogger:
    """The logs of one run folder. ``resumed_at`` is the step a resumed run continues from (records
    after it, logged after the checkpoint, are dropped from ``metrics.jsonl`` and hidden in
    TensorBoard; those up to it are kept); None for a fresh run, whose stale ``metrics.jsonl`` (a
    folder without checkpoints holds nothing worth keeping) is removed.

    Use as a context manager; records are dicts with ``step`` and ``split`` plus numeric metrics.
    """

    def __init__(
        self, run_dir: Path, cfg: DictConfig, *, main: bool, total_steps: int, resumed_at: Optional[int] = None
    ):
        self.run_dir, self.main = Path(run_dir), main
        self.console = Console(highlight=False)
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]} |"),
            TimeElapsedColumn(),
            TextColumn("elapsed, eta"),
            TimeRemainingColumn(),  # to total_steps (max_steps, or the configured epochs)
            console=self.console,
            disable=not main,
            transient=True,
        )
        self.total_steps = total_steps
        self.val_loss: Optional[float] = None  # the latest, for the progress bar
        self._jsonl = self._writer = None
        self._task = None
        if not main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
        metrics = self.run_dir / "metrics.jsonl"
        if resumed_at is not None:
            truncate_jsonl(metrics, resumed_at)
            self.val_loss = latest_val_loss(metrics)
        elif metrics.exists():
            metrics.unlink()
        from torch.utils.tensorboard import SummaryWriter

        tb = self.run_dir / "tb"
        purge = None
        if resumed_at is not None:
            wait_for_a_later_event_file(tb)
            # TensorBoard hides every earlier point at or after the purge step: the resumed run's
            # first step, so that the checkpoint's own step (logged before the stop) stays.
            purge = resumed_at + 1
        self._writer = SummaryWriter(log_dir=str(tb), purge_step=purge)
        self._jsonl = open(metrics, "a", encoding="utf-8")

    def __enter__(self) -> RunLogger:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        self.progress.__exit__(*exc)
        self.close()
        return False

    def close(self) -> None:
        """Flush and close ``metrics.jsonl`` and the TensorBoard writer."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def print(self, text: str) -> None:
        """A console line (main rank only), printed above the progress bar."""
        if self.main:
            self.progress.console.print(text, soft_wrap=True)

    def record(self, record: dict) -> None:
        """Append ``record`` to ``metrics.jsonl`` and its numbers to TensorBoard as ``<split>/<key>``."""
        if not self.main:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for k, v in record.items():
            if k not in ("step", "split") and isinstance(v, (int, float)):
                self._writer.add_scalar(f"{record['split']}/{k}", v, record["step"])

    def start_progress(self, step: int) -> None:
        """Show the progress bar at ``step`` of ``total_steps``."""
        self._task = self.progress.add_task("train", total=self.total_steps, completed=step, info="")

    def advance(self, loss: float, tokens_per_s: float) -> None:
        """Advance the progress bar by one step, showing :func:`live_info` of the step's ``loss``
        (nats), ``tokens_per_s`` (token slots per second) and the latest validation loss."""
        self.progress.update(self._task, advance=1, info=live_info(loss, tokens_per_s, self.val_loss))

    def train_line(self, r: dict) -> None:
        """Record and print a train log line: ``r`` has step, loss, accuracy, lr, grad_norm,
        tokens_per_s, gflops (achieved model FLOP/s / 1e9), mfu (a fraction of a published peak, or
        None: on CPU) and time (wall seconds since the run's start, earlier sessions included)."""
        self.record({"step": r["step"], "split": "train", **r})
        self.print(
            f"step {r['step']:>6} | loss {r['loss']:.4f} | acc {r['accuracy']:.3f} | lr {r['lr']:.2e} | "
            f"gnorm {r['grad_norm']:.2f} | {r['tokens_per_s']:,.0f} tok/s | "
            + (f"mfu {100 * r['mfu']:.1f}%" if r["mfu"] is not None else f"{r['gflops']:,.1f} GFLOP/s")
        )

    def header(self, trainer) -> None:
        """The run's first line: parameters, processes, device, rows per step, steps to go."""
        t, info = trainer.cfg.train, trainer.info
        self.print(
            f"[bold]train[/bold] {self.run_dir}: {trainer.model.num_parameters() / 1e6:.2f}M parameters "
            f"({trainer.model.num_parameters(non_embedding=True) / 1e6:.2f}M non-embedding), "
            f"{t.optimizer}, {info.world_size} process(es){' (FSDP)' if getattr(trainer, 'fsdp', False) else ''} "
            f"on {trainer.device}" + (_threads_note() if trainer.device.type == "cpu" else "") + ", "
            f"{t.batch_size}x{t.grad_accum}x{info.world_size} {'packed ' if trainer.loader.packed else ''}rows of {trainer.store.seq_len} tokens per step, "
            f"steps {trainer.step}->{self.total_steps}" + (" (resumed)" if trainer.ckpt else "")
        )
        if trainer.changed:
            self.print(f"resumed with changed train settings: {', '.join(trainer.changed)}")
        if trainer.notes:
            self.print(f"note: settings taken from the shard store: {', '.join(trainer.notes)}")

    def closing(self, s: dict, start_step: int) -> None:
        """The run's last line, from the summary ``s`` of :func:`xlab.train.train`."""
        loss = s["train_loss"]
        if math.isfinite(loss):
            trained = f"; train loss {loss:.4f}"
        else:
            trained = "; no step to run (the run was already complete)" if s["steps"] == start_step else ""
        val = (
            f", val loss {s['val_loss']:.4f}, bpb {fmt(s['val_bits_per_byte'], '.3f')}"
            if s["val_loss"] is not None
            else ""
        )
        self.print(
            f"[bold]train[/bold]: {'stopped' if s['interrupted'] else 'done'} at step {s['steps']}/{s['total_steps']}"
            f" in {s['seconds']:.1f}s{trained}{val}"
            + (f"; checkpoint {s['last_checkpoint']}" if s["last_checkpoint"] else "")
        )
        if s["interrupted"] and s["last_checkpoint"]:
            # the saved config.yaml is found by --resume itself: the name is all it needs
            self.print(
                f"resume with: xlab train --run-name {self.run_dir.name} --resume (add the same --shards, if any)"
            )

    def val_line(self, step: int, m: dict) -> None:
        """Record and print the validation metrics ``m`` of :func:`xlab.evaluate.metrics` at ``step``."""
        self.val_loss = m["loss"]
        self.record(
            {
                "step": step,
                "split": "val",
                **{k: m[k] for k in ("loss", "accuracy", "perplexity", "bits_per_byte", "tokens")},
            }
        )
        self.print(
            f"step {step:>6} | val loss {m['loss']:.4f} | acc {m['accuracy']:.3f} | "
            f"ppl {m['perplexity']:.1f} | bpb {fmt(m['bits_per_byte'], '.3f')}"
        )
