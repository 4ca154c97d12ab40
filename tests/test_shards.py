"""The shard format, the store reader and the loader (xlab/store/)."""

import json

import numpy as np
import psutil
import pytest
import torch

from xlab.errors import XLabError
from xlab.store import (
    IGNORE_INDEX,
    ShardEntry,
    ShardLoader,
    ShardStore,
    SplitEntry,
    StoreManifest,
    TokenizerEntry,
    pack_articles,
    read_npy_header,
    token_dtype,
    write_store,
)

PAD, SOS, EOS, UNK = 0, 1, 2, 3


def special_ids(vocab_size: int) -> TokenizerEntry:
    return TokenizerEntry(vocab_size=vocab_size, pad_id=PAD, sos_id=SOS, eos_id=EOS, unk_id=UNK)


def articles(n, vocab=50, seed=0, max_len=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, vocab, size=int(rng.integers(1, max_len))).tolist() for _ in range(n)]


def test_token_dtype():
    assert token_dtype(300) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(70_000) == np.uint32


def test_pack_windows_match_contract():
    seq_len = 4
    arts = [[10, 11, 12], [13], [20, 21, 22, 23, 24, 25, 26, 27]]
    rows = pack_articles(arts, seq_len, sos_id=SOS, eos_id=EOS, pad_id=PAD, vocab_size=30)
    expected = []
    for a in arts:
        full = [SOS] + a + [EOS]
        n_rows = -(-(len(a) + 1) // seq_len)
        for k in range(n_rows):
            w = full[k * seq_len : k * seq_len + seq_len + 1]
            expected.append(w + [PAD] * (seq_len + 1 - len(w)))
    assert rows.tolist() == expected
    assert rows.dtype == np.uint16
    # every target (t1..tn, eos) exactly once, no row of only pad targets
    targets = rows[:, 1:]
    assert int((targets != PAD).sum()) == sum(len(a) + 1 for a in arts)
    assert (targets != PAD).any(axis=1).all()


def reference_rows(arts, seq_len):
    out = []
    for a in arts:
        full = [SOS] + list(a) + [EOS]
        k = 0
        while k * seq_len < len(full) - 1:  # a window exists while it holds at least one target
            w = full[k * seq_len : k * seq_len + seq_len + 1]
            out.append(w + [PAD] * (seq_len + 1 - len(w)))
            k += 1
    return out


@pytest.mark.parametrize("seq_len", [2, 3, 7, 16])
def test_pack_random_against_reference(seq_len):
    arts = articles(200, vocab=60, seed=seq_len, max_len=50)
    rows = pack_articles(arts, seq_len, sos_id=SOS, eos_id=EOS, pad_id=PAD, vocab_size=60)
    assert rows.tolist() == reference_rows(arts, seq_len)
    assert len(rows) == sum(-(-(len(a) + 1) // seq_len) for a in arts)


def test_pack_exact_multiple_has_no_pad_only_row():
    # n + 1 == seq_len: one full row ending in eos, no extra row
    rows = pack_articles([[5, 6, 7]], 4, sos_id=SOS, eos_id=EOS, pad_id=PAD, vocab_size=10)
    assert rows.tolist() == [[SOS, 5, 6, 7, EOS]]


def test_large_vocab_never_wraps(tmp_path):
    rows = pack_articles([[69_999, 65_536, 5]], 4, sos_id=SOS, eos_id=EOS, pad_id=PAD, vocab_size=70_000)
    assert rows.dtype == np.uint32 and rows[0, 1] == 69_999 and rows[0, 2] == 65_536
    write_store(tmp_path / "s", {"train": [[69_999, 65_536, 5]]}, seq_len=4, tokenizer=special_ids(70_000))
    store = ShardStore(tmp_path / "s")
    assert store.dtype == np.uint32
    assert store.read_rows("train", np.array([0]))[0, 1] == 69_999
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pack_articles([[70_000]], 4, sos_id=SOS, eos_id=EOS, pad_id=PAD, vocab_size=70_000)


def make_store(tmp_path, n_train=300, seq_len=8, per_shard=37, vocab=50):
    arts = {"train": articles(n_train, vocab, seed=1), "val": articles(40, vocab, seed=2)}
    write_store(tmp_path / "store", arts, seq_len=seq_len, tokenizer=special_ids(vocab), articles_per_shard=per_shard)
    return ShardStore(tmp_path / "store"), arts


def test_store_reads_rows_in_requested_order(tmp_path):
    store, arts = make_store(tmp_path)
    full = np.concatenate([np.load(p) for p in store.shard_paths("train")])
    assert len(store.shard_paths("train")) > 3 and store.rows("train") == len(full)
    idx = np.random.default_rng(0).integers(0, len(full), size=500)  # repeats and shard crossings
    assert np.array_equal(store.read_rows("train", idx), full[idx])
    assert np.array_equal(store.read_rows("train", np.arange(len(full))), full)
    with pytest.raises(IndexError):
        store.read_rows("train", np.array([len(full)]))
    store.check()
    assert store.split_info("train")["target_tokens"] == sum(len(a) + 1 for a in arts["train"])


def test_store_errors(tmp_path):
    with pytest.raises(XLabError, match="xlab data encode"):
        ShardStore(tmp_path / "nope")
    store, _ = make_store(tmp_path)
    with pytest.raises(XLabError, match="not in shard store"):
        store.rows("predict")

    class Tok:
        sha256 = "other"
        vocab_size = 50

    with pytest.raises(XLabError, match="sha256"):
        store.check(Tok())
    # a shard whose shape no longer matches the manifest
    p = store.shard_paths("val")[0]
    np.save(p, np.load(p)[:-1])
    with pytest.raises(XLabError, match="manifest says"):
        ShardStore(store.path).check()
    p.unlink()
    with pytest.raises(XLabError, match="missing shard"):
        ShardStore(store.path).check()
    (store.path / "manifest.json").write_text("{not json")
    with pytest.raises(XLabError, match="unreadable"):
        ShardStore(store.path)


def test_loader_batches_targets_and_epochs(tmp_path):
    store, _ = make_store(tmp_path)
    n = store.rows("train")
    loader = ShardLoader(store, "train", 16, seed=3)
    assert len(loader) == n // 16
    seen = []
    for x, y in loader:
        assert x.dtype == torch.int64 and y.dtype == torch.int64 and x.shape == (16, 8) and y.shape == (16, 8)
        # targets are inputs shifted by one; pad targets are ignored
        assert torch.equal(x[:, 1:], torch.where(y[:, :-1] == IGNORE_INDEX, PAD, y[:, :-1]))
        assert not (y == PAD).any() and (y == IGNORE_INDEX).any()
        seen.append(x)
    assert len(seen) == len(loader) and loader.epoch == 1 and loader.position == 0
    # rows of one epoch are distinct rows of the store: the permutation covers without repeats
    idx = loader.rank_order(0)
    assert len(np.unique(idx)) == len(idx) == len(loader) * 16
    second = [x for x, _ in loader]
    assert loader.epoch == 2 and not all(torch.equal(a, b) for a, b in zip(seen, second))
    # same seed, same order; shuffle=False is store order
    again = ShardLoader(store, "train", 16, seed=3)
    assert all(torch.equal(a, b) for a, (b, _) in zip(seen, again))
    plain = ShardLoader(store, "train", 16, shuffle=False)
    x0, _ = next(iter(plain))
    assert torch.equal(x0, torch.from_numpy(store.read_rows("train", np.arange(16))[:, :-1].astype(np.int64)))


def test_loader_resume_mid_epoch_is_exact(tmp_path):
    store, _ = make_store(tmp_path)
    ref = ShardLoader(store, "train", 8, seed=7)
    ref_batches = [b for _ in range(2) for b in ref]  # two epochs
    cut = len(ref) + 3  # mid second epoch
    a = ShardLoader(store, "train", 8, seed=7)
    it = iter(a)
    got = []
    for _ in range(cut):
        try:
            got.append(next(it))
        except StopIteration:
            it = iter(a)
            got.append(next(it))
    state = a.state_dict()
    assert state == {"epoch": 1, "position": 3, "seed": 7}
    b = ShardLoader(store, "train", 8, seed=0)
    b.load_state_dict(json.loads(json.dumps(state)))
    rest = list(b)
    for (x1, y1), (x2, y2) in zip(got + rest, ref_batches):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert len(got) + len(rest) == len(ref_batches)


def test_loader_state_after_last_batch_starts_next_epoch(tmp_path):
    store, _ = make_store(tmp_path)
    a = ShardLoader(store, "train", 16, seed=1)
    batches = list(a)
    assert a.state_dict()["epoch"] == 1
    b = ShardLoader(store, "train", 16, seed=1)
    b.load_state_dict({"epoch": 0, "position": len(b), "seed": 1})  # saved right after the last batch
    nxt = next(iter(b))
    assert b.epoch == 1 and b.position == 1
    c = ShardLoader(store, "train", 16, seed=1)
    c.load_state_dict({"epoch": 1, "position": 0, "seed": 1})
    assert torch.equal(nxt[0], next(iter(c))[0])
    assert not torch.equal(nxt[0], batches[0][0])


def test_loader_ranks_disjoint_equal_length(tmp_path):
    store, _ = make_store(tmp_path)
    ws = 3
    loaders = [ShardLoader(store, "train", 5, seed=2, rank=r, world_size=ws) for r in range(ws)]
    assert len({len(ld) for ld in loaders}) == 1
    orders = [ld.rank_order(0) for ld in loaders]
    allrows = np.concatenate(orders)
    assert len(np.unique(allrows)) == len(allrows) == len(loaders[0]) * 5 * ws
    counts = [sum(1 for _ in ld) for ld in loaders]
    assert counts == [len(loaders[0])] * ws
    with pytest.raises(XLabError, match="fewer than one batch"):
        ShardLoader(store, "val", 10_000)


def test_loader_resident_memory_bounded(tmp_path):
    # 64 MB of shards read twice over must not grow RSS by more than 16 MB (the 256 MB / 64 MB bound,
    # scaled down to keep the test fast): rows are read with pread, so the page cache is not ours.
    seq_len = 512
    rows = 64 * 1024 * 1024 // (2 * (seq_len + 1))
    path = tmp_path / "big"
    (path / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = rng.integers(4, 8000, size=(rows, seq_len + 1), dtype=np.uint16)
    data[:, 0] = SOS
    np.save(path / "train" / "000000.npy", data)
    del data
    from xlab.fsio import sha256_file

    train = SplitEntry()
    train.add_shard(
        ShardEntry("train/000000.npy", rows, 0, sha256_file(path / "train/000000.npy")), articles=0, target_tokens=0
    )
    StoreManifest(seq_len=seq_len, dtype="uint16", tokenizer=special_ids(8192), splits={"train": train}).write(path)
    store = ShardStore(path)
    loader = ShardLoader(store, "train", 64, seed=0)
    next(iter(ShardLoader(store, "train", 64, seed=1)))  # warm up imports and allocator
    proc = psutil.Process()
    before = proc.memory_info().rss
    tokens = 0
    for _ in range(2):
        for x, _y in loader:
            tokens += x.numel()
    grown = proc.memory_info().rss - before
    assert tokens >= 2 * (rows // 64) * 64 * seq_len
    assert grown < 16 * 1024 * 1024, f"RSS grew by {grown / 2**20:.1f} MB"


def test_read_npy_header(tmp_path):
    a = np.zeros((3, 5), dtype=np.uint32)
    np.save(tmp_path / "a.npy", a)
    shape, dtype, fortran, offset = read_npy_header(tmp_path / "a.npy")
    assert shape == (3, 5) and dtype == np.uint32 and not fortran
    assert (tmp_path / "a.npy").stat().st_size == offset + a.nbytes


def test_background_prefetch_matches_plain_and_stops(tmp_path):
    import threading

    store, _ = make_store(tmp_path)
    plain = [b for b in ShardLoader(store, "train", 8, seed=5)]
    bg = ShardLoader(store, "train", 8, seed=5, background=True, prefetch=2)
    it = iter(bg)
    first = [next(it) for _ in range(3)]
    assert bg.state_dict() == {"epoch": 0, "position": 3, "seed": 5}  # yielded, not prefetched, batches
    it.close()  # an abandoned iteration stops its prefetch thread
    assert not any(t.name == "xlab-shard-prefetch" for t in threading.enumerate())
    rest = list(bg)
    assert bg.epoch == 1 and len(first) + len(rest) == len(plain)
    for (x1, y1), (x2, y2) in zip(first + rest, plain):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def _damage(p, how):
    data = p.read_bytes()
    if how == "truncated":
        p.write_bytes(data[:1000] if len(data) > 1000 else data[:-3])
    elif how == "trailing":
        p.write_bytes(data + b"\0\0")
    else:  # one byte of the header changed
        p.write_bytes(data[:10] + how + data[11:])


@pytest.mark.parametrize("how", ["truncated", "trailing", b"(", b"x", b"\xff", b"["])
def test_damaged_npy_is_a_clear_error(tmp_path, how):
    store, _ = make_store(tmp_path)
    p = store.shard_paths("val")[0]
    _damage(p, how)
    with pytest.raises(ValueError):
        read_npy_header(p)
    with pytest.raises(XLabError, match=r"val/000000\.npy.*xlab data validate.*xlab data encode --force"):
        ShardStore(store.path).check()


@pytest.mark.parametrize(
    "manifest", ["[]", "[1]", '"x"', "3", "null", '{"format": "xlab-shards", "format_version": 1, "splits": []}']
)
def test_manifest_of_the_wrong_shape_is_a_clear_error(tmp_path, manifest):
    store, _ = make_store(tmp_path)
    (store.path / "manifest.json").write_text(manifest)
    with pytest.raises(XLabError, match="xlab data encode --force"):
        ShardStore(store.path)
