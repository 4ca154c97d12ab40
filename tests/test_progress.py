"""The progress display of the long stages (xlab/progress.py): the rate in the stage's unit, the
layout with elapsed time and ETA, and each stage drawing it on a terminal and nothing elsewhere."""

from __future__ import annotations

import io
import re
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from xlab.progress import BYTES, RateColumn, format_rate, spinner, unit_progress

FIXTURE = Path(__file__).parent / "data" / "mini-dump.xml"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
ETA = r"\d+:\d\d:\d\d elapsed, eta (\d+:\d\d:\d\d|-:--:--)"


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


# ---------------------------------------------------------------------------------- the stages
@pytest.fixture(params=["terminal", "file"])
def screen(request, monkeypatch):
    """Gives ``attach(module)``: point the stage module's console at a terminal (or a plain file)
    and return what it showed as a callable."""
    is_terminal = request.param == "terminal"

    def attach(module):
        out = io.StringIO()
        monkeypatch.setattr(module, "console", terminal(out) if is_terminal else Console(file=out, width=400))
        return lambda: shown(out)

    attach.is_terminal = is_terminal
    return attach


def expect(text: str, is_terminal: bool, *patterns: str) -> None:
    """On a terminal every pattern is shown; in a file (a log, captured output) none of the bar."""
    for p in patterns:
        if is_terminal:
            assert re.search(p, text), (p, text)
        else:
            assert not re.search(p, text), (p, text)
    if not is_terminal:
        assert "elapsed, eta" not in text and not re.search(r"\w/s\b", text)  # no rate, no ETA


def test_split_shows_articles_per_second(tmp_path, screen):
    from test_split import make_cfg, write_raw

    from pipelines import split

    write_raw(tmp_path, 50)
    out = screen(split)
    split.run(make_cfg(tmp_path))
    expect(out(), screen.is_terminal, r"splitting ━+ 50/50 articles (\?|[\d,.]+K?) articles/s " + ETA)


def test_download_of_a_dump_shows_bytes_per_second(tmp_path, screen):
    from test_download import make_cfg

    from pipelines import download

    size = FIXTURE.stat().st_size
    out = screen(download)
    download.run(make_cfg(tmp_path, "data.source=dump", f"data.dump_path={FIXTURE}", "data.num_proc=1"))
    done = f"{size / 1000:.1f}/{size / 1000:.1f} kB"
    expect(
        out(),
        screen.is_terminal,
        rf"cleaning mini-dump\.xml ━+ {re.escape(done)} (\? bytes|[\d.,]+ (bytes|kB|MB|GB))/s",
    )
    expect(out(), screen.is_terminal, ETA)


def test_download_from_the_hub_shows_articles_per_second(tmp_path, screen, monkeypatch):
    from test_download import make_cfg

    from pipelines import download
    from pipelines.sources import hf

    rows = [{"id": str(i), "url": f"u{i}", "title": f"T{i}", "text": "text" if i != 1 else " "} for i in range(3)]
    monkeypatch.setattr(hf, "hub_unreachable_reason", lambda timeout_s: None)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: rows))
    out = screen(download)
    download.run(make_cfg(tmp_path, "data.source=hf", "data.max_articles=5"))  # streamed: out of max_articles
    expect(out(), screen.is_terminal, r"reading wikimedia/wikipedia ━+ 3/5 articles (\?|[\d,.]+K?) articles/s " + ETA)


def test_encode_counts_articles_and_validate_shards(tmp_path, screen):
    from test_encode import config, encode, write_corpus

    from pipelines import encode as enc
    from pipelines import validate

    write_corpus(tmp_path, n=20)  # 20 articles in each of the 4 splits, 7 to a shard: 3 shards each
    cfg = config(tmp_path)
    out = screen(enc)
    encode(cfg)
    expect(out(), screen.is_terminal, r"encode ━+ 80/80 articles (\?|[\d,.]+K?) articles/s " + ETA)
    out = screen(validate)
    assert validate.run(cfg) == 0
    expect(out(), screen.is_terminal, r"validate ━+ 12/12 shards (\?|[\d,.]+) shards/s " + ETA)


def test_tokenizer_training_shows_a_spinner_with_the_elapsed_time(tmp_path, screen):
    from train_helpers import make_texts

    from pipelines import train_tokenizer
    from xlab.config import load_config

    path = tmp_path / "data" / "splits" / "wiki" / "train.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"id": [str(i) for i in range(200)], "text": make_texts(200, 1)}), path)
    cfg = load_config(
        overrides=[
            f"paths.data_dir={tmp_path}/data",
            f"paths.tokenizer_dir={tmp_path}/tokenizers",
            "tokenizer.vocab_size=300",
            "tokenizer.num_threads=1",
        ],
        use_defaults_file=False,
    )
    out = screen(train_tokenizer)
    train_tokenizer.run(cfg)
    expect(out(), screen.is_terminal, r"training a 300-piece BPE tokenizer on \S+ \.\.\. \d+:\d\d:\d\d")


def test_evaluate_shows_tokens_per_second(tmp_path, screen):
    from train_helpers import make_cfg, make_store

    from xlab.commands import evaluate as evaluate_cmd
    from xlab.store import ShardStore
    from xlab.train import train

    store = make_store(tmp_path)
    train(make_cfg(tmp_path / "runs", "train.max_steps=1", "train.eval_every=100"), shards_dir=store)
    out = screen(evaluate_cmd)
    evaluate_cmd.run(tmp_path / "runs" / "t" / "checkpoints" / "last.pt", split="val", shards_dir=store)
    s = ShardStore(store)
    slots = s.rows("val") * s.seq_len  # every position of every val row, as the training's tok/s
    expect(out(), screen.is_terminal, rf"evaluate val ━+ {slots}/{slots} tokens (\?|[\d,.]+K?) tokens/s " + ETA)
