"""``xlab data encode`` with ``shards.layout=packed``: a sound store, deterministic for any number of
processes and parts, with the same targets as the padded layout."""

from __future__ import annotations

import numpy as np
from test_encode import CharTokenizer, config, encode, store_bytes, write_corpus

from xlab.store import ShardStore, row_counts


def test_packed_encode_is_sound_deterministic_and_keeps_the_targets(tmp_path, capsys):
    from pipelines import validate

    write_corpus(tmp_path / "a")
    write_corpus(tmp_path / "b")
    padded = encode(config(tmp_path / "a"))
    cfg = config(tmp_path / "b", layout="packed")
    packed = encode(cfg)
    assert validate.run(cfg) == 0
    store = ShardStore(tmp_path / "b/shards/wiki-packed")
    assert [store.layout(s) for s in store.splits] == ["packed", "padded", "padded", "padded"]
    for s in store.splits:
        for key in ("articles", "target_tokens", "text_bytes", "text_chars", "empty_articles"):
            assert packed["splits"][s][key] == padded["splits"][s][key], (s, key)
    assert packed["splits"]["train"]["rows"] < padded["splits"]["train"]["rows"]
    # val/test/predict are the padded layout's exact bytes: evaluation is the same for both stores
    a, b = store_bytes(tmp_path / "a/shards/wiki"), store_bytes(tmp_path / "b/shards/wiki-packed")
    assert all(a[f] == b[f] for f in a if f.split("/")[0] in ("val", "test", "predict"))
    # within a shard, padding only ends the last row
    for p in store.shard_paths("train"):
        rows = np.load(p)
        assert not (rows[:-1] == store.pad_id).any()
        assert row_counts(rows, layout="packed", pad_id=store.pad_id, sos_id=store.sos_id, first=True)[0] > 0
    one = store_bytes(store.path)
    encode(config(tmp_path / "b", layout="packed", num_proc=2), force=True)
    assert store_bytes(store.path) == one
    write_corpus(tmp_path / "c")
    for i in (1, 0, 2):  # parts in any order (the last one writes the manifest): the same bytes
        encode(config(tmp_path / "c", layout="packed"), num_shards=3, shard_index=i)
    assert store_bytes(tmp_path / "c/shards/wiki-packed") == one


def test_each_layout_is_its_own_store_beside_the_other(tmp_path, capsys):
    write_corpus(tmp_path)
    encode(config(tmp_path))
    m = encode(config(tmp_path, layout="packed"))
    assert m["splits"]["train"]["layout"] == "packed" and m["params"]["layout"] == "packed"
    padded = ShardStore(tmp_path / "shards/wiki")  # still there, untouched
    assert padded.layout("train") == "padded" and "layout" not in padded.manifest["params"]
    capsys.readouterr()
    encode(config(tmp_path))
    encode(config(tmp_path, layout="packed"))
    assert capsys.readouterr().out.count("up to date") == 2


def test_a_packed_row_holds_whole_articles_back_to_back(tmp_path):
    write_corpus(tmp_path, n=20)
    encode(config(tmp_path, layout="packed"))
    store = ShardStore(tmp_path / "shards/wiki-packed")
    tok = CharTokenizer.load(tmp_path / "tokenizers/wiki.model")
    import pyarrow.parquet as pq

    texts = pq.read_table(tmp_path / "data/splits/wiki/train.parquet").column("text").to_pylist()
    want = np.concatenate([[tok.sos_id, *tok.encode(t), tok.eos_id] for t in texts if t.strip()])
    got = []
    for p in store.shard_paths("train"):
        rows = np.load(p)
        s = np.concatenate([rows[0], rows[1:, 1:].ravel()])
        got.append(s[s != tok.pad_id])
    assert np.array_equal(np.concatenate(got), want)
