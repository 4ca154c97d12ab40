"""``xlab data encode`` / ``merge`` / ``validate`` (pipelines/encode.py, pipelines/validate.py).

The stages run against a small character-level stand-in tokenizer with the Tokenizer attributes,
so these tests do not depend on SentencePiece training.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_children_die

from pipelines import encode_parts
from xlab.config import SPLITS, load_config
from xlab.errors import XLabError
from xlab.store import ShardStore

ROOT = Path(__file__).resolve().parent.parent
REJECT = "\ufffe"  # the stand-in tokenizer rejects text holding this noncharacter


class CharTokenizer:
    """Stand-in tokenizer: one id per character (4 + code point), unk beyond the vocabulary."""

    pad_id, sos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, model_bytes: bytes):
        self.vocab_size = int(json.loads(model_bytes)["vocab_size"])
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()

    @classmethod
    def load(cls, path):
        return cls(Path(path).read_bytes())

    def _one(self, text):
        if REJECT in text:
            raise ValueError("text holds an unsupported character")
        return [4 + ord(c) if 4 + ord(c) < self.vocab_size else self.unk_id for c in text]

    def encode(self, texts, num_threads=None):
        return [self._one(t) for t in texts] if isinstance(texts, list) else self._one(texts)

    def decode(self, ids):
        return "".join(chr(i - 4) for i in ids if i >= 4)

    def id_to_piece(self, i):
        return {0: "<pad>", 1: "<s>", 2: "</s>", 3: "<unk>"}.get(i, chr(i - 4) if i >= 4 else "?")

    def is_byte(self, i):
        return False


def load_char_tokenizer(path):
    return CharTokenizer.load(path)


def write_corpus(root: Path, n=60, seed=0, extra=None, vocab_size=300):
    """Splits of ``n`` articles each (plus ``extra`` rows in train) and a stand-in tokenizer file."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta", "ηta", "theta", "\n"]
    d = root / "data" / "splits" / "wiki"
    d.mkdir(parents=True)
    for s in SPLITS:
        texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(n)]
        ids = [f"{s}-{i}" for i in range(n)]
        if s == "train" and extra:
            for i, t in extra:
                ids.insert(i, f"x{i}")
                texts.insert(i, t)
        tbl = pa.table({"id": ids, "url": [f"u/{i}" for i in ids], "title": ids, "text": texts})
        pq.write_table(tbl, d / f"{s}.parquet", row_group_size=17)
    (root / "tokenizers").mkdir()
    (root / "tokenizers" / "wiki.model").write_text(json.dumps({"vocab_size": vocab_size}))


def config(root: Path, **shards):
    o = [
        f"paths.data_dir={root / 'data'}",
        f"paths.tokenizer_dir={root / 'tokenizers'}",
        f"paths.shards_dir={root / 'shards'}",
        "shards.seq_len=16",
        "shards.articles_per_shard=7",
        "shards.num_proc=1",
    ]
    o += [f"shards.{k}={v}" for k, v in shards.items()]
    return load_config([], o, use_defaults_file=False)


def encode(cfg, **kw):
    from pipelines import encode as enc

    return enc.run(cfg, tokenizer_loader=load_char_tokenizer, **kw)


def store_bytes(path: Path) -> dict:
    """Every file's bytes; the manifest's tokenizer path (which names the test's folder) left out."""
    out = {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    m = json.loads(out["manifest.json"])
    assert Path(m["tokenizer"].pop("file")).name == "wiki.model"
    out["manifest.json"] = json.dumps(m, sort_keys=True).encode()
    return out


def articles_from_rows(rows: np.ndarray, tok: CharTokenizer) -> list[list[int]]:
    """Rebuild each article's text tokens from its rows: the targets (row[1:]) of its rows, in order,
    are t1..tn <eos> exactly once (consecutive windows share one token)."""
    out, cur = [], None
    for r in rows.tolist():
        if r[0] == tok.sos_id:
            cur = []
            out.append(cur)
        cur.extend(t for t in r[1:] if t != tok.pad_id)
    for a in out:
        assert a[-1] == tok.eos_id
        a.pop()
    return out


def test_encode_rows_round_trip_and_manifest(tmp_path):
    extra = [(3, ""), (5, "   "), (8, "ok" + REJECT + "x"), (9, "long " * 400_000)]  # 2 MB on one line
    write_corpus(tmp_path, extra=extra)
    cfg = config(tmp_path)
    m = encode(cfg)
    store = ShardStore(tmp_path / "shards" / "wiki")
    store.check(CharTokenizer.load(tmp_path / "tokenizers" / "wiki.model"))
    tok = CharTokenizer.load(tmp_path / "tokenizers" / "wiki.model")
    table = pq.read_table(tmp_path / "data/splits/wiki/train.parquet").to_pydict()
    kept = [t for t in table["text"] if t.strip() and REJECT not in t]
    rows = store.read_rows("train", np.arange(store.rows("train")))
    assert articles_from_rows(rows, tok) == [tok.encode(t) for t in kept]
    info = m["splits"]["train"]
    assert info["articles"] == len(kept) and info["empty_articles"] == 2 and info["rejected_articles"] == 1
    assert info["rejected"][0]["id"] == "x8" and "unsupported" in info["rejected"][0]["error"]
    assert info["text_bytes"] == sum(len(t.encode()) for t in kept)
    assert info["text_chars"] == sum(len(t) for t in kept)
    assert info["target_tokens"] == sum(len(t) + 1 for t in kept)
    assert info["real_tokens"] == int((rows != tok.pad_id).sum())
    assert len(info["shards"]) == -(-(60 + 4) // 7)
    assert m["dtype"] == "uint16" and m["row_len"] == 17 and m["tokenizer"]["sha256"] == tok.sha256
    assert (store.path / "tokenizer.model").read_bytes() == (tmp_path / "tokenizers/wiki.model").read_bytes()
    assert not (store.path / ".work").exists()


def test_encode_skip_force_and_num_proc_identity(tmp_path, capsys):
    write_corpus(tmp_path)
    cfg = config(tmp_path)
    encode(cfg)
    one = store_bytes(tmp_path / "shards" / "wiki")
    mtime = (tmp_path / "shards/wiki/manifest.json").stat().st_mtime_ns
    encode(cfg)
    assert "up to date" in capsys.readouterr().out
    assert (tmp_path / "shards/wiki/manifest.json").stat().st_mtime_ns == mtime
    encode(config(tmp_path, num_proc=2), force=True)  # two worker processes
    assert store_bytes(tmp_path / "shards" / "wiki") == one
    # a changed parameter re-encodes from scratch
    m = encode(config(tmp_path, seq_len=9))
    assert m["seq_len"] == 9 and ShardStore(tmp_path / "shards/wiki").seq_len == 9


def test_parts_merge_equals_single_machine(tmp_path):
    write_corpus(tmp_path / "a")
    write_corpus(tmp_path / "b")
    encode(config(tmp_path / "a"))
    cfg = config(tmp_path / "b")

    for i in (2, 0):
        r = encode(cfg, num_shards=3, shard_index=i)
        assert r["parts_missing"] == ([0, 1] if i == 2 else [1])
        assert not (tmp_path / "b/shards/wiki/manifest.json").exists()
    with pytest.raises(XLabError, match="not encoded yet"):
        encode_parts.merge(cfg)
    with pytest.raises(XLabError, match="not complete yet.*xlab data merge"):  # what a reader is told
        ShardStore(tmp_path / "b/shards/wiki")
    encode(cfg, num_shards=3, shard_index=1)
    encode_parts.merge(cfg)
    assert store_bytes(tmp_path / "b/shards/wiki") == store_bytes(tmp_path / "a/shards/wiki")
    with pytest.raises(XLabError, match="shard-index"):
        encode(cfg, num_shards=2, shard_index=2)


def test_part_run_leaves_a_complete_store_alone(tmp_path, capsys):
    write_corpus(tmp_path)
    cfg = config(tmp_path)
    m = encode(cfg)
    before = store_bytes(tmp_path / "shards/wiki")
    capsys.readouterr()
    for i in (0, 1):
        assert encode(cfg, num_shards=2, shard_index=i) == m
        assert "already complete" in capsys.readouterr().out
    assert store_bytes(tmp_path / "shards/wiki") == before
    ShardStore(tmp_path / "shards/wiki").check()

    assert encode_parts.merge(cfg) == m  # nothing to merge: the store is complete
    said = capsys.readouterr().out
    assert "xlab data encode --force" in said and "use --force" not in said  # merge has no --force
    # other inputs: the outdated store is redone as a part folder (no manifest until merge)
    r = encode(config(tmp_path, seq_len=9), num_shards=2, shard_index=0)
    assert r["parts_missing"] == [1] and not (tmp_path / "shards/wiki/manifest.json").exists()


def test_missing_inputs_name_the_command(tmp_path):
    with pytest.raises(XLabError, match="xlab data split"):
        encode(config(tmp_path))
    write_corpus(tmp_path)
    (tmp_path / "tokenizers/wiki.model").unlink()
    with pytest.raises(XLabError, match="xlab tokenizer train"):
        encode(config(tmp_path))


def test_large_vocab_store_is_uint32(tmp_path):
    write_corpus(tmp_path, n=5, vocab_size=70_000)
    t = pq.read_table(tmp_path / "data/splits/wiki/val.parquet").to_pydict()
    t["text"][0] = chr(69_999 - 4) + "a"  # encodes to id 69,999
    pq.write_table(pa.table(t), tmp_path / "data/splits/wiki/val.parquet")
    encode(config(tmp_path))
    store = ShardStore(tmp_path / "shards/wiki")
    assert store.dtype == np.uint32 and store.read_rows("val", np.array([0]))[0, 1] == 69_999


KILL_SCRIPT = """
import sys, time
sys.path[:0] = [{root!r}, {tests!r}]
import numpy as np
import test_encode as te
from xlab.store import pack_articles as real_pack
import xlab.store

def slow_pack(*a, **k):  # slows every unit so that the parent can kill mid-run
    time.sleep(0.05)
    return real_pack(*a, **k)

xlab.store.pack_articles = slow_pack
te.encode(te.config(__import__('pathlib').Path({dir!r})))
"""


def test_sigkill_then_rerun_is_byte_identical(tmp_path):
    write_corpus(tmp_path / "clean", n=120)
    write_corpus(tmp_path / "killed", n=120)
    encode(config(tmp_path / "clean"))
    out = tmp_path / "killed" / "shards" / "wiki"
    script = KILL_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), dir=str(tmp_path / "killed"))
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not (out / ".work" / "train" / "000003.json").exists():
        assert p.poll() is None, p.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "manifest.json").exists()  # an interrupted store never claims to be complete
    with pytest.raises(XLabError):
        ShardStore(out)
    encode(config(tmp_path / "killed"))
    assert store_bytes(out) == store_bytes(tmp_path / "clean" / "shards" / "wiki")


class SlowCharTokenizer(CharTokenizer):
    def encode(self, texts, num_threads=None):
        time.sleep(0.2)
        return super().encode(texts, num_threads)


def load_slow_char_tokenizer(path):
    return SlowCharTokenizer.load(path)


POOL_SCRIPT = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import test_encode as te
from pipelines import encode as enc
enc.run(te.config(__import__('pathlib').Path({dir!r}), num_proc=2), tokenizer_loader=te.load_slow_char_tokenizer)
"""


def test_sigkill_of_encode_leaves_no_worker_processes(tmp_path):
    psutil = pytest.importorskip("psutil")
    write_corpus(tmp_path, n=120)
    script = POOL_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), dir=str(tmp_path))
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out = tmp_path / "shards" / "wiki"
    deadline = time.time() + 60
    while not (out / ".work" / "train" / "000001.json").exists():  # the pool is at work
        assert p.poll() is None, p.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.02)
    children = psutil.Process(p.pid).children(recursive=True)
    assert len(children) >= 2  # the two workers (and the resource tracker)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()

    assert_children_die(children, "the killed encode")


def test_validate_passes_then_lists_every_problem(tmp_path, capsys):
    from pipelines import validate

    write_corpus(tmp_path)
    cfg = config(tmp_path)
    encode(cfg)
    assert validate.run(cfg) == 0
    out = tmp_path / "shards" / "wiki"
    # corrupt: an id past the vocabulary, padding in the middle of a row, a pad-only row
    p = out / "train" / "000001.npy"
    rows = np.load(p)
    rows[0, 3] = 999
    rows[1, 2] = 0
    rows[2, 1:] = 0
    np.save(p, rows)
    (out / "val" / "000000.npy").unlink()
    assert validate.run(cfg) == 1
    text = capsys.readouterr().out
    assert "train/000001.npy" in text and "sha256" in text
    assert "row 0" in text and "999" in text
    assert "row 1" in text and "padding" in text
    assert "row 2" in text
    assert "val/000000.npy" in text and "missing" in text


def test_validate_cli_exit_codes(tmp_path, cli):
    write_corpus(tmp_path, n=10)
    cfg = config(tmp_path)
    encode(cfg)
    store = tmp_path / "shards" / "wiki"
    args = ["data", "validate", "--shards", store, "-o", f"paths.tokenizer_dir={tmp_path / 'tokenizers'}"]
    assert cli(args, cwd=tmp_path).returncode == 0
    p = store / "val" / "000000.npy"
    rows = np.load(p)
    rows[0, 1] = 60_000  # beyond the 300-id vocabulary
    np.save(p, rows)
    r = cli(args, cwd=tmp_path, check=False)
    assert r.returncode == 1 and "val/000000.npy" in r.stdout and "60000" in r.stdout


def test_validate_lists_damaged_npy_files(tmp_path, cli):
    write_corpus(tmp_path, n=10)
    cfg = config(tmp_path)
    encode(cfg)
    store = tmp_path / "shards" / "wiki"
    good = (store / "train" / "000000.npy").read_bytes()
    (store / "val" / "000000.npy").write_bytes(good[:1000])  # truncated
    p = store / "test" / "000000.npy"
    data = p.read_bytes()
    p.write_bytes(data[:10] + b"x" + data[11:])  # a damaged header
    args = ["data", "validate", "--shards", store, "-o", f"paths.tokenizer_dir={tmp_path / 'tokenizers'}"]
    r = cli(args, cwd=tmp_path, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "val/000000.npy: not a readable .npy file" in r.stdout and "truncated" in r.stdout
    assert "test/000000.npy: not a readable .npy file" in r.stdout and "header" in r.stdout


@pytest.mark.parametrize("damage", ["empty", "random", "truncated", "int_text"])
def test_damaged_split_file_is_one_clear_error(tmp_path, damage):
    write_corpus(tmp_path, n=10)
    cfg = config(tmp_path)
    encode(cfg)
    before = store_bytes(tmp_path / "shards/wiki")
    p = tmp_path / "data/splits/wiki/val.parquet"
    data = p.read_bytes()
    if damage == "int_text":
        pq.write_table(pa.table({"id": ["a"], "url": ["u"], "title": ["t"], "text": [7]}), p)
    else:
        p.write_bytes(
            {"empty": b"", "random": np.random.default_rng(0).bytes(5000), "truncated": data[: len(data) // 2]}[damage]
        )
    with pytest.raises(XLabError, match=r"val\.parquet.*xlab data split --force"):
        encode(cfg)
    assert store_bytes(tmp_path / "shards/wiki") == before  # the earlier store is untouched


@pytest.mark.parametrize("manifest", ["[]", '{"splits": [1]}', '{"splits": {"train": {"shards": [3]}}}'])
def test_store_manifest_of_the_wrong_shape(tmp_path, manifest):
    from pipelines import stats, validate

    write_corpus(tmp_path, n=10)
    cfg = config(tmp_path)
    m = encode(cfg)
    (tmp_path / "shards/wiki/manifest.json").write_text(manifest)
    for fn in (validate.run, stats.run, encode_parts.merge):
        with pytest.raises(XLabError, match="manifest"):
            fn(cfg)
    assert encode(cfg)["splits"] == m["splits"]  # a broken manifest is redone, not a crash


@pytest.mark.parametrize("key", ["shards.num_proc", "data.num_proc", "tokenizer.num_threads", "data.max_articles"])
@pytest.mark.parametrize("value", [0, -1])
def test_counts_below_one_are_refused(tmp_path, key, value):
    with pytest.raises(XLabError, match=f"{key} must be at least 1"):
        load_config([], [f"{key}={value}"], use_defaults_file=False)
    assert load_config([], [f"{key}=null"], use_defaults_file=False) is not None


def test_cli_num_proc_zero_is_refused(tmp_path, cli):
    r = cli(["data", "encode", "--num-proc", "0"], cwd=tmp_path, check=False)
    assert (
        r.returncode == 2
        and r.stderr.strip() == "error: shards.num_proc must be at least 1 (or null for the default), got 0"
    )


def test_a_failed_force_reencode_leaves_the_old_store_intact(tmp_path, monkeypatch):
    """--force (and a re-encode after changed inputs) builds beside the store and swaps at the end,
    so a failure half way (a full disk, Ctrl-C) leaves the earlier store usable and unchanged."""
    from pipelines import encode as enc

    write_corpus(tmp_path)
    cfg = config(tmp_path)
    encode(cfg)
    before = store_bytes(tmp_path / "shards" / "wiki")
    real = enc._execute

    def full_disk(*a, **k):
        real(*a, **k)  # every unit written ...
        raise OSError(28, "No space left on device")  # ... and then the disk is full

    monkeypatch.setattr(enc, "_execute", full_disk)
    for kw in ({"force": True}, {"cfg": config(tmp_path, seq_len=9)}):
        with pytest.raises(OSError):
            encode(kw.pop("cfg", cfg), **kw)
        assert store_bytes(tmp_path / "shards" / "wiki") == before
        ShardStore(tmp_path / "shards" / "wiki").check()
    monkeypatch.setattr(enc, "_execute", real)
    assert (tmp_path / "shards" / ".wiki.rebuild").is_dir()  # the failed rebuild, beside the store
    encode(cfg)  # the store is up to date: the stale rebuild is cleared, not kept holding disk
    assert not (tmp_path / "shards" / ".wiki.rebuild").exists()
    encode(cfg, force=True)  # a rebuild that completes is swapped in
    assert store_bytes(tmp_path / "shards" / "wiki") == before
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["wiki"]  # no rebuild or old copy left


def test_a_second_encode_of_a_store_is_refused_but_parts_run_together(tmp_path):
    from xlab.fsio import exclusive_lock, lock_path

    write_corpus(tmp_path)
    cfg = config(tmp_path)
    store = tmp_path / "shards" / "wiki"
    with exclusive_lock(lock_path(store), "test"):  # another whole-store encode
        with pytest.raises(XLabError, match=rf"in use by pid {os.getpid()}"):
            encode(cfg)
    assert not store.exists()
    with exclusive_lock(lock_path(store), "part 0", shared=True), exclusive_lock(lock_path(store, "part-0-of-2"), "p0"):
        encode(cfg, num_shards=2, shard_index=1)  # part 1 runs beside a running part 0
        with pytest.raises(XLabError, match="part-0-of-2"):
            encode(cfg, num_shards=2, shard_index=0)  # a second writer of part 0
        with pytest.raises(XLabError, match="in use"):
            encode(cfg)  # a whole-store encode waits for the parts
        with pytest.raises(XLabError, match="in use"):
            encode_parts.merge(cfg)


def test_validate_recomputes_the_manifest_counts_and_the_reader_refuses_a_shard_listed_twice(tmp_path, capsys):
    from pipelines import validate

    write_corpus(tmp_path)
    cfg = config(tmp_path)
    encode(cfg)
    mpath = tmp_path / "shards" / "wiki" / "manifest.json"
    good = json.loads(mpath.read_text())
    for split, key, delta in [("val", "text_bytes", -5), ("val", "text_chars", 3), ("test", "target_tokens", 7),
                              ("train", "articles", -1), ("train", "empty_articles", 3)]:  # fmt: skip
        m = json.loads(json.dumps(good))
        m["splits"][split][key] += delta
        mpath.write_text(json.dumps(m))
        assert validate.run(cfg) == 1  # was "sound": bits per byte would have been off
        assert f"split {split} {key} {good['splits'][split][key] + delta}" in capsys.readouterr().out

    def edited(change):
        m = json.loads(json.dumps(good))
        change(m["splits"]["train"])
        mpath.write_text(json.dumps(m))

    shards = good["splits"]["train"]["shards"]
    for change, words in [
        (lambda t: t["shards"].append(shards[0]), "listed twice, out of order, or outside the store"),
        (lambda t: t.update(shards=[shards[1], shards[0], *shards[2:]]), "out of order"),
        (lambda t: t["shards"][0].update(file="../../elsewhere/train/000000.npy"), "outside the store"),
        (lambda t: t.update(real_tokens=t["real_tokens"] + 1), "real_tokens .* the sum over its shards"),
    ]:
        edited(change)  # the loader would deal rows twice, in another order, or from another store
        with pytest.raises(XLabError, match=words):
            ShardStore(mpath.parent)
    mpath.write_text(json.dumps(good))
    assert validate.run(cfg) == 0


def test_ctrl_c_of_encode_is_handled_by_the_parent_alone(tmp_path):
    """Ctrl-C reaches the whole process group; workers leave it to the parent (no worker traceback)."""
    script = POOL_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), dir=str(tmp_path))
    script = (
        script.replace("enc.run(", "try:\n    enc.run(")
        + "except KeyboardInterrupt:\n    print('interrupted', file=sys.stderr)\n"
    )
    write_corpus(tmp_path, n=120)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)  # fmt: skip
    deadline = time.time() + 60
    while not (tmp_path / "shards" / "wiki" / ".work" / "train" / "000001.json").exists():
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the parent and its workers
    _, err = p.communicate(timeout=60)
    assert err.strip() == "interrupted", err


def test_a_changed_shard_is_not_up_to_date_for_encode_nor_trained_on(tmp_path, capsys):
    """Two overwritten bytes: validate said so, but encode said "up to date" and train trained on it."""
    write_corpus(tmp_path)
    cfg = config(tmp_path)
    encode(cfg)
    good = store_bytes(tmp_path / "shards" / "wiki")
    p = tmp_path / "shards" / "wiki" / "train" / "000002.npy"
    data = bytearray(p.read_bytes())
    data[-4:-2] = b"\x07\x00"
    p.write_bytes(bytes(data))
    with pytest.raises(XLabError, match=r"000002\.npy changed since it was encoded"):
        ShardStore(p.parent.parent).verify()  # what the trainer runs before its first step
    encode(cfg)
    assert "changed since it was encoded" in " ".join(capsys.readouterr().out.split())  # however it wraps
    assert store_bytes(tmp_path / "shards" / "wiki") == good
