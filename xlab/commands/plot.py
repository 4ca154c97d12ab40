"""``xlab plot``: the training curves of one or several run folders as one PNG (:mod:`xlab.plot`).

Imported by the command line at start-up, so matplotlib is imported only once the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (runs/<run_name>), one or several.")],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write (replaced if it exists).")],
) -> None:
    """Draw train/val loss and val bits per byte of RUNS against steps, tokens and wall time."""
    from rich.console import Console

    from xlab.plot import plot_runs

    path = plot_runs(runs, out)
    Console(highlight=False).print(f"[bold]plot[/bold]: curves of {len(runs)} run(s) written to {path}")
