"""The packed layout of the shard store (xlab/store/format.py): articles back to back in rows, the
same targets as the padded layout, document ids recovered from the tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xlab.store import (
    IGNORE_INDEX,
    ShardLoader,
    ShardStore,
    TokenizerEntry,
    document_ids,
    pack_articles,
    pack_documents,
    row_counts,
    split_layout,
    target_tokens,
    write_store,
)
from xlab.store.loader import make_batch

PAD, SOS, EOS, V = 0, 1, 2, 50
TOK = TokenizerEntry(vocab_size=V, pad_id=PAD, sos_id=SOS, eos_id=EOS, unk_id=3)
IDS = {"sos_id": SOS, "eos_id": EOS, "pad_id": PAD, "vocab_size": V}


def articles(n: int, seed: int = 0, max_len: int = 30) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, V, rng.integers(1, max_len)).tolist() for _ in range(n)]


def stream(rows: np.ndarray) -> np.ndarray:
    """The token stream of consecutive overlapping rows, trailing padding dropped."""
    s = np.concatenate([rows[0], rows[1:, 1:].reshape(-1)])
    return s[: len(s) - int(np.argmax(s[::-1] != PAD))]


@pytest.mark.parametrize("seq_len", [2, 7, 16, 64])
def test_pack_documents_cuts_the_article_stream_into_overlapping_rows(seq_len):
    arts = articles(23, seed=seq_len)
    rows = pack_documents(arts, seq_len, **IDS)
    full = np.concatenate([[SOS, *a, EOS] for a in arts])
    assert rows.dtype == np.uint16 and rows.shape == (-(-(len(full) - 1) // seq_len), seq_len + 1)
    assert np.array_equal(stream(rows), full)
    assert np.array_equal(rows[1:, 0], rows[:-1, -1])  # consecutive rows share one token
    assert not (rows[:-1] == PAD).any()  # padding only in the last row
    assert int(np.count_nonzero(rows == PAD)) < seq_len + 1


@pytest.mark.parametrize("seq_len", [4, 16])
def test_both_layouts_give_the_same_targets(seq_len):
    arts = articles(40, seed=1)
    padded, packed = pack_articles(arts, seq_len, **IDS), pack_documents(arts, seq_len, **IDS)
    counts = {}
    for layout, rows in (("padded", padded), ("packed", packed)):
        t = rows[:, 1:].reshape(-1)
        t = t[(t != PAD) & (t != SOS)]
        counts[layout] = np.bincount(t, minlength=V)
        assert row_counts(rows, layout=layout, pad_id=PAD, sos_id=SOS, first=True) == (len(arts), target_tokens(arts))
    assert np.array_equal(counts["padded"], counts["packed"])
    assert len(packed) < len(padded)


def test_pack_documents_refuses_what_pack_articles_refuses():
    assert pack_documents([], 8, **IDS).shape == (0, 9)
    with pytest.raises(ValueError, match="empty article"):
        pack_documents([[5], []], 8, **IDS)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pack_documents([[5, V]], 8, **IDS)


def test_only_the_train_split_is_packed():
    assert [split_layout(s, "packed") for s in ("train", "val", "test", "predict")] == ["packed"] + ["padded"] * 3
    assert split_layout("train", "padded") == "padded"
    with pytest.raises(ValueError, match="shards.layout"):
        split_layout("train", "dense")


def test_document_ids_count_the_sos_tokens():
    inputs = torch.tensor([[7, 8, EOS, SOS, 9, EOS, SOS, 5], [SOS, 4, 4, 4, 4, 4, 4, 4]])
    assert document_ids(inputs, SOS).tolist() == [[0, 0, 0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 1, 1, 1]]


def test_a_packed_store_verifies_and_loads(tmp_path):
    train, val = articles(60, seed=2), articles(10, seed=3)
    m = write_store(tmp_path, {"train": train, "val": val}, seq_len=16, tokenizer=TOK, layout="packed",
                    articles_per_shard=25)  # fmt: skip
    assert m.splits["train"].layout == "packed" and m.splits["val"].layout == "padded"
    store = ShardStore(tmp_path)
    store.verify()
    assert store.layout("train") == "packed" and store.layout("val") == "padded"
    assert store.info.splits["train"].articles == 60
    assert store.info.splits["train"].target_tokens == target_tokens(train)
    x, y = make_batch(store, "train", np.arange(store.rows("train")))
    # every target is scored once: the <sos> after an <eos> and the tail padding are ignored
    assert int((y != IGNORE_INDEX).sum()) == target_tokens(train)
    assert not (y == SOS).any() and ((x == EOS) & (y != IGNORE_INDEX)).sum() == 0
    loader = ShardLoader(store, "train", 2, seed=0)
    assert loader.packed and not ShardLoader(store, "val", 2).packed


def test_verify_catches_a_wrong_article_count_in_a_packed_split(tmp_path):
    import json

    write_store(tmp_path, {"train": articles(30, seed=4)}, seq_len=8, tokenizer=TOK, layout="packed")
    mpath = tmp_path / "manifest.json"
    m = json.loads(mpath.read_text())
    m["splits"]["train"]["articles"] += 1
    mpath.write_text(json.dumps(m))
    from xlab.errors import XLabError

    with pytest.raises(XLabError, match="articles"):
        ShardStore(tmp_path).verify()


def test_a_manifest_with_an_unknown_layout_is_refused(tmp_path):
    import json

    from xlab.errors import XLabError

    write_store(tmp_path, {"train": articles(5)}, seq_len=8, tokenizer=TOK)
    mpath = tmp_path / "manifest.json"
    m = json.loads(mpath.read_text())
    m["splits"]["train"]["layout"] = "dense"
    mpath.write_text(json.dumps(m))
    with pytest.raises(XLabError, match="layout"):
        ShardStore(tmp_path)


def _stores(tmp_path, arts, seq_len=16, per_shard=25):
    for layout in ("padded", "packed"):
        write_store(tmp_path / layout, {"train": arts}, seq_len=seq_len, tokenizer=TOK, layout=layout,
                    articles_per_shard=per_shard)  # fmt: skip
    return ShardStore(tmp_path / "padded"), ShardStore(tmp_path / "packed")


def test_stats_read_the_same_articles_from_both_layouts_and_predict_the_packed_rows(tmp_path):
    from pipelines.stats import article_lengths, split_stats

    arts = articles(70, seed=5, max_len=40)
    padded, packed = _stores(tmp_path, arts)
    want = np.array([len(a) for a in arts])
    assert np.array_equal(article_lengths(padded, "train"), want)
    assert np.array_equal(article_lengths(packed, "train"), want)
    sp, sk = split_stats(padded, "train"), split_stats(packed, "train")
    assert sp["packed_sequences"] == sk["sequences"] == sk["packed_sequences"] == packed.rows("train")
    assert sp["packing_saves"] == pytest.approx(1 - packed.rows("train") / padded.rows("train"))
    assert sk["padding_fraction"] < sp["padding_fraction"]
    assert sp["target_tokens"] == sk["target_tokens"] == target_tokens(arts)


def test_validate_accepts_a_packed_shard_and_finds_its_damage(tmp_path):
    from collections import Counter

    from xlab.store.integrity import shard_problems

    def check_shard(path, entry, store, counts, layout):  # every problem of the shard, as validate lists them
        assert store.layout("train") == layout and path == store.path / entry.file
        return [p.line for p in shard_problems(store, "train", entry, rows=True, counts=counts)]

    _, store = _stores(tmp_path, articles(40, seed=6), per_shard=100)
    entry = store.info.splits["train"].shards[0]
    path = store.path / entry.file
    counts = Counter()
    assert check_shard(path, entry, store, counts, "packed") == []
    assert counts == {"articles": 40, "target_tokens": store.info.splits["train"].target_tokens}
    rows = np.load(path)
    rows[2, 0] = 7 if rows[2, 0] != 7 else 8  # breaks the overlap with row 1
    r, c = np.argwhere(rows[:, 1:-1] == SOS)[-1]  # a <sos> inside a late row (not its overlap column)
    rows[r, c + 1] = 9  # replaced: its <eos> is now followed by a text token
    rows[4, -3:] = PAD  # padding before the last row
    np.save(path, rows)
    text = "\n".join(check_shard(path, entry, store, None, "packed"))
    assert "sha256" in text
    assert "rows 2, 5: the row does not continue" in text  # row 5: row 4 now ends in padding
    assert r > 5 and f"row {r}: <eos> followed by neither" in text
    assert "row 4" in text and "padding before the shard's last row" in text


def test_the_unigram_baseline_is_the_same_for_both_layouts(tmp_path):
    from pipelines.stats import target_counts, unigram_baseline

    arts = {"train": articles(50, seed=7), "val": articles(12, seed=8)}
    for layout in ("padded", "packed"):
        write_store(tmp_path / layout, arts, seq_len=8, tokenizer=TOK, layout=layout, articles_per_shard=20)
    padded, packed = ShardStore(tmp_path / "padded"), ShardStore(tmp_path / "packed")
    assert np.array_equal(target_counts(padded, "train"), target_counts(packed, "train"))
    assert target_counts(packed, "train")[SOS] == 0
    assert unigram_baseline(padded) == unigram_baseline(packed)
