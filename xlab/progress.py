"""The progress display of XLab's long stages: one layout, its rate in the stage's own unit.

``unit_progress(unit, console)`` is a :class:`rich.progress.Progress` showing description, bar,
completed/total, the rate (``1,234 articles/s``, ``12.3 MB/s``, ``45.6K tokens/s``), the elapsed
time and the ETA; ``spinner(text, console)`` is the display of work that cannot report how far it
is (SentencePiece training). Both are transient (the bar is gone when the stage prints its summary)
and disabled on a console that cannot redraw a line (a file, a pipe, a dumb terminal), where rich
would draw nothing but still end with a blank line: logs and captured output get no trace of them.
This module sits on the ground floor (it imports only rich) so that the data stages and ``xlab
evaluate`` share it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

from rich import filesize
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

BYTES = "bytes"  # the unit whose counts and rates are shown as kB, MB, GB (decimal, as rich does)


def format_rate(speed: Optional[float], unit: str) -> str:
    """``speed`` (units per second) as the rate column shows it.

    Bytes in decimal multiples (``12.3 MB/s``); other units with thousands separators below 10,000
    (``1,234 articles/s``, ``2.5 shards/s``) and with K/M/G and three significant digits above
    (``45.6K tokens/s``: an estimate's further digits are noise). None (rich has no estimate yet:
    fewer than two samples) shows ``? unit/s``.
    """
    if speed is None:
        return f"? {unit}/s"
    if unit == BYTES:
        return f"{filesize.decimal(int(speed))}/s"
    if speed == 0:
        return f"0 {unit}/s"
    if speed < 10:
        return f"{speed:.1f} {unit}/s"
    if speed < 10_000:
        return f"{speed:,.0f} {unit}/s"
    scale, suffix = filesize.pick_unit_and_suffix(int(speed), ["", "K", "M", "G", "T"], 1000)
    value = speed / scale
    decimals = 2 if value < 10 else 1 if value < 100 else 0  # three significant digits
    return f"{value:,.{decimals}f}{suffix} {unit}/s"


class RateColumn(ProgressColumn):
    """The task's rate in ``unit`` per second (see :func:`format_rate`)."""

    def __init__(self, unit: str):
        self.unit = unit
        super().__init__()

    def render(self, task: Task) -> Text:
        # A finished task keeps the rate it had when it reached its total (rich stops sampling then).
        return Text(format_rate(task.finished_speed or task.speed, self.unit), style="progress.data.speed")


def unit_progress(unit: str, console: Console) -> Progress:
    """A transient progress display counting ``unit`` (:data:`BYTES`, or a plural noun such as
    ``articles``); add its tasks with a ``total`` for the bar and the ETA.

    The time columns read as the training's live line does: ``0:01:02 elapsed, eta 0:03:04``.
    """
    counted = [DownloadColumn()] if unit == BYTES else [MofNCompleteColumn(), TextColumn(unit)]
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        *counted,
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("elapsed, eta"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_interactive,
    )


@contextmanager
def spinner(text: str, console: Console) -> Iterator[Progress]:
    """``with spinner("training ...", console):`` a spinner, ``text`` and the elapsed time while the
    block runs, for work that reports no progress of its own (``text`` may hold rich markup)."""
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_interactive,
    ) as progress:
        progress.add_task(text, total=None)
        yield progress
