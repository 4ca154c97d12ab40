"""``xlab stats`` and the unigram baseline, on a store encoded with a real (tiny) tokenizer."""

import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xlab.config import SPLITS, load_config
from xlab.store import ShardStore

WORDS = ["the", "river", "city", "was", "founded", "in", "north", "königsberg", "東京", "über", "1871", "\n"]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A store encoded end to end with a trained SentencePiece tokenizer of 320 ids."""
    from pipelines import encode
    from xlab.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("stats")
    rng = np.random.default_rng(0)
    d = root / "data" / "splits" / "wiki"
    d.mkdir(parents=True)
    texts = {}
    for s in SPLITS:
        n = 80 if s == "train" else 30
        # never whitespace-only: encode skips those as empty articles
        texts[s] = [" ".join(["river"] + list(rng.choice(WORDS, size=int(rng.integers(0, 60))))) for _ in range(n)]
        texts[s][0] += " ᚠᚢᚦᚨᚱᚲ 𝔘𝔫𝔦𝔠"  # characters each seen once: too rare for a piece, left to bytes
        ids = [f"{s}{i}" for i in range(n)]
        pq.write_table(pa.table({"id": ids, "url": ids, "title": ids, "text": texts[s]}), d / f"{s}.parquet")
    tok = Tokenizer.train(texts["train"], 320, root / "tokenizers" / "wiki.model", num_threads=1)
    cfg = load_config(
        [],
        [
            f"paths.data_dir={root / 'data'}",
            f"paths.tokenizer_dir={root / 'tokenizers'}",
            f"paths.shards_dir={root / 'shards'}",
            "shards.seq_len=12",
            "shards.articles_per_shard=16",
            "shards.num_proc=1",
        ],
        use_defaults_file=False,
    )
    encode.run(cfg)
    return cfg, tok, texts, ShardStore(root / "shards" / "wiki")


def test_real_tokenizer_round_trip(encoded):
    cfg, tok, texts, store = encoded
    from pipelines import validate

    assert validate.run(cfg) == 0
    rows = store.read_rows("val", np.arange(store.rows("val")))
    arts, cur = [], None
    for r in rows.tolist():
        if r[0] == tok.sos_id:
            cur = []
            arts.append(cur)
        cur.extend(t for t in r[1:] if t not in (tok.pad_id, tok.eos_id))
    assert tok.decode(arts) == texts["val"]


def test_split_stats_and_lengths(encoded):
    from pipelines import stats

    cfg, tok, texts, store = encoded
    d = stats.split_stats(store, "train")
    n = [len(x) for x in tok.encode(texts["train"])]
    assert d["articles"] == 80 and stats.article_lengths(store, "train").tolist() == n
    assert d["length_mean"] == pytest.approx(np.mean(n)) and d["length_median"] == np.median(n)
    assert d["length_p99"] == pytest.approx(np.percentile(n, 99))
    assert d["bytes_per_token"] == pytest.approx(sum(len(t.encode()) for t in texts["train"]) / sum(n))
    assert d["chars_per_token"] == pytest.approx(sum(len(t) for t in texts["train"]) / sum(n))
    slots = store.rows("train") * 12
    assert d["padding_fraction"] == pytest.approx((slots - sum(n) - 80) / slots)


def test_unigram_baseline_matches_direct_count(encoded):
    from pipelines import stats

    _, tok, texts, store = encoded
    fit = Counter(t for ids in tok.encode(texts["train"]) for t in ids + [tok.eos_id])
    ev = [t for ids in tok.encode(texts["val"]) for t in ids + [tok.eos_id]]
    total = sum(fit.values())
    want = -sum(math.log((fit[t] + 1) / (total + tok.vocab_size)) for t in ev) / len(ev)
    assert stats.unigram_baseline(store) == pytest.approx(want, rel=1e-9)


def test_vocab_stats_and_run_with_plot(encoded, tmp_path, capsys):
    from pipelines import stats

    cfg, tok, texts, store = encoded
    v = stats.vocab_stats(tok, store)
    assert v["byte_pieces"] == 256 and v["special"] == 4
    assert v["byte_pieces"] + v["single_chars"] + v["learned_pieces"] + 4 == tok.vocab_size
    # every training row is in the sample here, so the fraction is exact
    ids = [t for x in tok.encode(texts["train"]) for t in x]
    assert v["sample_rows"] == store.rows("train")
    assert v["byte_fallback_fraction"] == pytest.approx(sum(tok.is_byte(t) for t in ids) / len(ids))
    assert v["byte_fallback_fraction"] > 0  # the CJK word falls back to bytes at this vocabulary size
    out = stats.run(cfg, plot=tmp_path / "len.png")
    assert (tmp_path / "len.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out["unigram_val_nats"] == pytest.approx(stats.unigram_baseline(store))
    printed = " ".join(capsys.readouterr().out.split())
    assert "unigram baseline" in printed and "predict" in printed and "byte fallback" in printed
    assert list(out["splits"]) == ["train", "val", "test", "predict"]


def test_damaged_shard_is_one_clear_error(encoded, tmp_path):
    import shutil

    from pipelines import stats
    from xlab.errors import XLabError

    cfg, _, _, store = encoded
    copy = tmp_path / "wiki"
    shutil.copytree(store.path, copy)
    p = copy / "val" / "000000.npy"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(XLabError, match=r"val/000000\.npy.*xlab data validate"):
        stats.run(cfg, shards_dir=copy)


def test_damaged_tokenizer_is_one_clear_error(encoded, tmp_path):
    import shutil

    from pipelines import stats
    from xlab.errors import XLabError

    cfg, _, _, store = encoded
    copy = tmp_path / "wiki"
    shutil.copytree(store.path, copy)
    (copy / "tokenizer.model").write_bytes(b"")
    with pytest.raises(XLabError, match="not a usable XLab tokenizer.*xlab tokenizer train --force"):
        stats.run(cfg, shards_dir=copy)


def test_plot_path_must_be_a_png_file(encoded, tmp_path):
    from pipelines import stats
    from xlab.errors import XLabError

    cfg = encoded[0]
    for bad in (tmp_path / "x.txt", tmp_path, tmp_path / "noext"):
        with pytest.raises(XLabError, match=r"--plot needs the path of a \.png file"):
            stats.run(cfg, plot=bad)
    assert sorted(p.name for p in tmp_path.parent.iterdir() if p.name.startswith(tmp_path.name)) == [tmp_path.name]
    assert not list(tmp_path.iterdir())  # nothing written


def test_length_plot_shares_one_x_range_marks_seq_len_and_counts_in_integers(encoded):
    from pipelines import stats

    store = encoded[3]
    per = {s: stats.split_stats(store, s) for s in store.splits}
    fig = stats.length_figure(per, store.seq_len)
    axes = fig.axes
    assert len(axes) == 4
    assert len({ax.get_xlim() for ax in axes}) == 1 and len({ax.get_xscale() for ax in axes}) == 1
    lo, hi = axes[0].get_xlim()
    longest = max(int(d["lengths"].max()) for d in per.values())
    assert lo <= 1 and hi > max(longest, store.seq_len)
    # the same bins in every panel (only then does one x-range compare the splits)
    edges = [[p.get_x() for p in ax.patches] for ax in axes]
    assert edges[0] and all(e == edges[0] for e in edges)
    for ax, d in zip(axes, per.values()):
        marks = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == [store.seq_len] * 2]
        assert len(marks) == 1 and marks[0].get_label() == "seq_len 12"
        assert sum(p.get_height() for p in ax.patches) == d["articles"]
    # a few articles per bin: matplotlib's own ticks would be 0, 0.25, 0.5, ...
    few = {
        "train": {"lengths": np.array([3, 5, 5, 30]), "length_median": 5.0},
        "val": {"lengths": np.array([7]), "length_median": 7.0},
    }
    fig = stats.length_figure(few, 40)
    for ax in fig.axes:
        ticks = ax.get_yticks()
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
        assert ax.get_xlim()[1] > 40  # the seq_len mark is inside the range, past the longest article


def test_plot_into_a_missing_folder_is_refused_without_creating_it(encoded, tmp_path):
    from pipelines import stats
    from xlab.errors import XLabError

    cfg = encoded[0]
    with pytest.raises(XLabError, match=r"folder .*nope.* does not exist"):
        stats.run(cfg, plot=tmp_path / "nope" / "len.png")
    assert list(tmp_path.iterdir()) == []
