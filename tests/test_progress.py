"""The progress display of the long stages (xlab/progress.py): the rate in the stage's unit, the
layout with elapsed time and ETA, the spinner."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from xlab.progress import BYTES, RateColumn, format_rate, spinner, unit_progress

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def terminal(out: io.StringIO) -> Console:
    # no colours: the text is searched; TERM pinned: rich draws nothing on a "dumb" terminal
    return Console(file=out, force_terminal=True, color_system=None, width=400, _environ={"TERM": "xterm"})


def shown(out: io.StringIO) -> str:
    """What the terminal received, without cursor movements."""
    return " ".join(ANSI.sub(" ", out.getvalue()).split())


# ------------------------------------------------------------------------------------- the columns
@pytest.mark.parametrize(
    "speed, unit, expected",
    [
        (1234.4, "articles", "1,234 articles/s"),
        (9999.0, "articles", "9,999 articles/s"),
        (45_600.0, "tokens", "45.6K tokens/s"),
        (123_456.0, "tokens", "123K tokens/s"),
        (1_234_567.0, "tokens", "1.23M tokens/s"),
        (2.54, "shards", "2.5 shards/s"),
        (12_345_678.0, BYTES, "12.3 MB/s"),
        (512.0, BYTES, "512 bytes/s"),
        (0.0, "articles", "0 articles/s"),
        (0.0, BYTES, "0 bytes/s"),
        (None, "articles", "? articles/s"),  # rich has no estimate before its second sample
        (None, BYTES, "? bytes/s"),
    ],
)
def test_rate_is_shown_in_the_stage_unit(speed, unit, expected):
    assert format_rate(speed, unit) == expected


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def rendered(progress) -> str:
    out = io.StringIO()
    Console(file=out, width=200).print(progress.make_tasks_table(progress.tasks))
    return " ".join(out.getvalue().split())


@pytest.mark.parametrize(
    "unit, steps, expected",
    [
        # rich's rate: the units after the first sample over the time between the first and the last
        ("articles", (40, 20), "encode ━+ 60/100 articles 20 articles/s 0:00:02 elapsed, eta 0:00:02"),
        (BYTES, (4e6, 2e6), "encode ━+ 6.0/10.0 MB 2.0 MB/s 0:00:02 elapsed, eta 0:00:02"),
    ],
)
def test_the_layout_shows_count_rate_elapsed_and_eta(unit, steps, expected):
    clock = Clock()
    bar = unit_progress(unit, Console(file=io.StringIO()))
    bar.get_time = clock  # before add_task: the task reads its times from it
    task = bar.add_task("encode", total=100 if unit != BYTES else 10e6)
    for n in steps:
        clock.now += 1
        bar.advance(task, n)
    assert re.fullmatch(expected, rendered(bar))


def test_a_finished_task_keeps_its_rate():
    clock = Clock()
    bar = unit_progress("articles", Console(file=io.StringIO()))
    bar.get_time = clock
    task = bar.add_task("split", total=30)
    for _ in range(3):
        clock.now += 1
        bar.advance(task, 10)
    clock.now += 100  # long after the end: no new sample, the rate stays the one at the end
    assert RateColumn("articles").render(bar.tasks[0]).plain == "10 articles/s"
    assert "0:00:03 elapsed, eta 0:00:00" in rendered(bar)


def test_the_spinner_shows_its_text_and_the_elapsed_time():
    out = io.StringIO()
    with spinner("training a tokenizer ...", terminal(out)):
        pass
    assert re.search(r"training a tokenizer \.\.\. \d+:\d\d:\d\d", shown(out))
    out = io.StringIO()
    with spinner("training a tokenizer ...", Console(file=out)):
        pass
    assert out.getvalue() == ""
