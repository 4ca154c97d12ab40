"""``xlab evaluate``: the command's checks, the metrics table and the ``--json`` file; the work is
:func:`xlab.evaluate.evaluate_checkpoint`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from xlab.errors import XLabError
from xlab.evaluate import evaluate_checkpoint
from xlab.fsio import atomic_write_json

console = Console(highlight=False)


def run(
    checkpoint: str | os.PathLike,
    split: str = "val",
    shards_dir: Optional[str | os.PathLike] = None,
    device: str = "auto",
    max_batches: Optional[int] = None,
    json_out: Optional[str | os.PathLike] = None,
) -> dict:
    """``xlab evaluate``: print the metrics of :func:`~xlab.evaluate.evaluate_checkpoint` as a table
    and, with ``json_out``, write them to that JSON file atomically.

    Raises:
        XLabError: as :func:`~xlab.evaluate.evaluate_checkpoint`; ``json_out`` naming a folder or a
            file in a folder that does not exist (checked before any work).
    """
    if json_out is not None:
        json_out = Path(json_out)
        if json_out.is_dir():
            raise XLabError(f"--json {json_out} is a folder; give a file path such as {json_out / 'metrics.json'}")
        if not json_out.parent.is_dir():
            raise XLabError(f"--json {json_out}: folder {json_out.parent} does not exist")
    m = evaluate_checkpoint(
        checkpoint, split=split, shards_dir=shards_dir, device=device, max_batches=max_batches, console=console
    )
    table = Table(title=f"{split} split" + ("" if m["complete"] else f", first {m['batches']} batches"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in ("loss", "accuracy", "perplexity", "bits_per_byte", "tokens"):
        v = m[k]
        table.add_row(k, "n/a" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.4f}"))
    console.print(f"[bold]evaluate[/bold] {checkpoint} (step {m['step']}) on {m['shards']}", soft_wrap=True)
    console.print(table)
    if json_out is not None:
        atomic_write_json(Path(json_out), m)
    return m
