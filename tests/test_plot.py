"""``xlab plot``: the training curves of run folders, one picture for an ablation."""

from __future__ import annotations

import pytest
from train_helpers import make_cfg, make_store, read_metrics

from xlab.errors import XLabError

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs, ``a`` and ``b`` (another learning rate), 6 steps, val at steps 3 and 6."""
    from xlab.train import train

    root = tmp_path_factory.mktemp("plot")
    store = make_store(root)
    for name, lr in (("a", "3e-3"), ("b", "1e-3")):
        train(make_cfg(root / "runs", f"train.run_name={name}", f"train.lr={lr}"), shards_dir=store)
    return root / "runs"


def test_the_figure_holds_both_runs_against_steps_tokens_and_time(runs):
    import matplotlib.pyplot as plt

    from xlab.plot import curves_figure, read_run

    fig = curves_figure([read_run(runs / "a"), read_run(runs / "b")])
    axes = fig.axes
    assert len(axes) == 6
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert legend == ["a train", "a val", "b train", "b val"]
    assert [t.get_text() for t in axes[3].get_legend().get_texts()] == ["a", "b"]
    tokens_per_step = 4 * 1 * 16  # batch_size x grad_accum x seq_len of the helper's run
    for name in ("a", "b"):
        train_recs, val_recs = read_metrics(runs / name), read_metrics(runs / name, "val")
        steps = [r["step"] for r in train_recs]
        assert steps == [1, 2, 3, 4, 5, 6] and [r["step"] for r in val_recs] == [3, 6]
        want_x = {0: steps, 1: [s * tokens_per_step for s in steps], 2: [r["time"] for r in train_recs]}
        for j, xs in want_x.items():
            (line,) = [ln for ln in axes[j].get_lines() if ln.get_label() == f"{name} train"]
            assert list(line.get_xdata()) == pytest.approx(xs)
            assert list(line.get_ydata()) == pytest.approx([r["loss"] for r in train_recs])
        (val,) = [ln for ln in axes[1].get_lines() if ln.get_label() == f"{name} val"]
        assert list(val.get_xdata()) == [3 * tokens_per_step, 6 * tokens_per_step]
        assert list(val.get_ydata()) == pytest.approx([r["loss"] for r in val_recs])
        (bpb,) = [ln for ln in axes[3].get_lines() if ln.get_label() == name]
        assert list(bpb.get_ydata()) == pytest.approx([r["bits_per_byte"] for r in val_recs])
        # a val point's wall time is that of the train record of its step
        (val_t,) = [ln for ln in axes[2].get_lines() if ln.get_label() == f"{name} val"]
        assert list(val_t.get_xdata()) == pytest.approx([train_recs[2]["time"], train_recs[5]["time"]])
    a_loss = [ln for ln in axes[0].get_lines() if ln.get_label() == "a train"][0].get_ydata()
    b_loss = [ln for ln in axes[0].get_lines() if ln.get_label() == "b train"][0].get_ydata()
    assert list(a_loss) != list(b_loss)  # two runs, two curves
    assert axes[5].get_xlabel() == "wall time (seconds)" and axes[4].get_xlabel() == "tokens (per process)"
    plt.close(fig)


def test_cli_writes_the_png(runs, cli, tmp_path):
    out = tmp_path / "x.png"
    r = cli(["plot", runs / "a", runs / "b", "--out", out], cwd=tmp_path)
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000
    assert "curves of 2 run(s) written to" in r.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temporary file left beside it


def test_cli_errors_are_one_line_exit_2(runs, cli, tmp_path):
    for args, word in (
        ([tmp_path, "--out", tmp_path / "x.png"], "is not a run folder (no metrics.jsonl)"),
        ([runs / "a", "--out", tmp_path / "nope" / "x.png"], "does not exist"),
        ([runs / "a", "--out", tmp_path / "x.jpg"], "needs the path of a .png file"),
    ):
        p = cli(["plot", *args], cwd=tmp_path, check=False)
        err = p.stderr.strip()
        assert p.returncode == 2 and err.startswith("error:") and len(err.splitlines()) == 1, p.stderr
        assert word in err
    assert list(tmp_path.iterdir()) == []  # nothing written, no folder created


def test_runs_that_cannot_be_drawn_are_refused(runs, tmp_path):
    import shutil

    from xlab.plot import plot_runs

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text('{"step": 3, "split": "val", "loss": 5.0}\n{"step": 4, "spl')
    with pytest.raises(XLabError, match="holds no train record yet"):
        plot_runs([empty], tmp_path / "x.png")
    bare = tmp_path / "bare"
    shutil.copytree(runs / "a", bare)
    (bare / "config.yaml").unlink()
    with pytest.raises(XLabError, match="has no config.yaml"):
        plot_runs([bare], tmp_path / "x.png")
    (bare / "config.yaml").write_text("train: [1, 2\n")
    with pytest.raises(XLabError, match="not the config.yaml of an XLab run"):
        plot_runs([bare], tmp_path / "x.png")
    with pytest.raises(XLabError, match="needs the path of a .png file"):
        plot_runs([runs / "a"], tmp_path)  # a folder
    with pytest.raises(XLabError, match="is given more than once"):
        plot_runs([runs / "a", runs / "b", runs / "a" / ".." / "a"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_the_token_axis_labels_are_short(runs):
    from xlab.plot import curves_figure, read_run

    fig = curves_figure([read_run(runs / "a")])
    fig.canvas.draw()
    labels = [t.get_text() for t in fig.axes[4].get_xticklabels()]  # bottom row, tokens
    assert labels and all(len(t) <= 6 for t in labels), labels


def test_two_runs_of_the_same_name_are_told_apart_by_their_paths(runs, tmp_path, monkeypatch):
    import shutil

    from xlab import plot

    other = tmp_path / "elsewhere" / "a"
    shutil.copytree(runs / "a", other)
    seen = {}
    real = plot.curves_figure

    def spy(curves):
        seen["names"] = [c.name for c in curves]
        return real(curves)

    monkeypatch.setattr(plot, "curves_figure", spy)
    plot.plot_runs([runs / "a", other], tmp_path / "x.png")
    assert seen["names"] == [str(runs / "a"), str(other)]
    plot.plot_runs([other], tmp_path / "x.png")
    assert seen["names"] == ["a"]  # alone, a run goes by its folder's name


def test_pipeline_draws_the_runs_curves_beside_its_checkpoints(tmp_path, monkeypatch):
    from pipelines import download, encode, split, stats, train_tokenizer
    from xlab.commands import pipeline

    make_store(tmp_path)  # tmp_path/store: the shard store of data.name "store"
    for stage in (download, split, train_tokenizer, encode, stats):
        monkeypatch.setattr(stage, "run", lambda *a, **k: None)  # the data stages: done already
    cfg = make_cfg(
        tmp_path / "runs",
        f"paths.shards_dir={tmp_path}",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.tokenizer_dir={tmp_path / 'tokenizers'}",
        "data.name=store",
        "generate.max_new_tokens=2",
    )
    out = pipeline.run(cfg)
    png = tmp_path / "runs" / "t" / "curves.png"
    assert out["curves"] == str(png) and png.read_bytes()[:8] == PNG
    assert list(out["times_s"]) == ["download", "split", "tokenizer", "encode", "stats", "train", "curves",
                                    "evaluate", "generate"]  # fmt: skip
    assert (tmp_path / "runs" / "t" / "checkpoints" / "last.pt").is_file()
