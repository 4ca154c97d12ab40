"""Readers and writers of a shard store (xlab/store/lock.py) and the holders a refusal names
(xlab/fsio.py exclusive_lock)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_encode import config, encode, store_bytes, write_corpus

from pipelines import encode_parts
from xlab.errors import XLabError
from xlab.fsio import exclusive_lock, lock_path
from xlab.store import ShardStore
from xlab.store.lock import changing, reading

ROOT = Path(__file__).resolve().parent.parent


class Holder:
    """A separate process that holds ``code``'s context (a lock) until :meth:`stop`."""

    def __init__(self, code: str):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        script = f"import sys\n{code}\n    print('ready', flush=True)\n    sys.stdin.read()\n"
        self.p = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env=env)  # fmt: skip
        assert self.p.stdout.readline().strip() == "ready"

    def stop(self):
        self.p.stdin.close()
        assert self.p.wait(timeout=60) == 0


def test_a_reader_holding_the_store_refuses_a_rebuild_in_one_line(tmp_path):
    write_corpus(tmp_path, n=10)
    cfg = config(tmp_path)
    encode(cfg)
    store = tmp_path / "shards" / "wiki"
    before = store_bytes(store)
    reader = Holder(f"from xlab.store.lock import reading\nwith reading({str(store)!r}, 'train'):")
    try:
        for rebuild in (lambda: encode(cfg, force=True), lambda: encode(config(tmp_path, seq_len=8))):
            with pytest.raises(XLabError) as e:
                rebuild()
            msg = str(e.value)
            assert "\n" not in msg and f"pid {reader.p.pid}" in msg and "train reads it" in msg, msg
            assert store_bytes(store) == before  # intact, and no rebuild begun beside it
            assert not (tmp_path / "shards" / ".wiki.rebuild").exists()
        encode(cfg)  # an up-to-date store is not changed: "up to date", not a refusal
    finally:
        reader.stop()
    encode(cfg, force=True)  # the reader is gone: the rebuild proceeds
    assert store_bytes(store) == before


def test_readers_share_the_store_and_are_refused_while_it_changes(tmp_path):
    store = tmp_path / "shards" / "wiki"
    with reading(store, "train"):  # no store yet: nothing to hold, and no .locks folder made
        pass
    assert list(tmp_path.iterdir()) == []
    store.mkdir(parents=True)
    with reading(store, "train"), reading(store, "evaluate"):  # any number of readers at once
        pass
    writer = Holder(f"from xlab.store.lock import changing\nwith changing({str(store)!r}, 'encode rebuilds it'):")
    try:
        with pytest.raises(XLabError, match=rf"shard store .* in use by pid {writer.p.pid} .*encode rebuilds it"):
            with reading(store, "train"):
                pass
    finally:
        writer.stop()
    with changing(store, "encode part 0 of 2 writes it"), changing(store, "encode part 1 of 2 writes it"):
        pass  # the parts of one store change it together


def test_stats_and_validate_hold_the_store_while_they_read(tmp_path, monkeypatch):
    from pipelines import stats, validate

    write_corpus(tmp_path, n=10)
    cfg = config(tmp_path)
    encode(cfg)
    store = tmp_path / "shards" / "wiki"
    seen = []
    real_init = ShardStore.__init__

    def init(self, *a, **k):  # as the command opens the store: a writer must be refused
        with pytest.raises(XLabError, match="reads it"):
            with changing(store, "encode rebuilds it"):
                pass
        seen.append(True)
        return real_init(self, *a, **k)

    monkeypatch.setattr(ShardStore, "__init__", init)
    with pytest.raises(
        XLabError, match="tokenizer"
    ):  # stats, after it opened the store, needs a real SentencePiece model
        stats.run(cfg)
    assert seen
    validate.run(cfg)
    assert len(seen) >= 2
    with changing(store, "encode rebuilds it"):  # and let go when done
        pass


def test_a_refusal_names_the_live_holders_not_an_earlier_finished_one(tmp_path):
    write_corpus(tmp_path, n=10)
    cfg = config(tmp_path)
    store = tmp_path / "shards" / "wiki"
    lock = lock_path(store)
    # an earlier whole-store encode, finished: its line stays in the lock file
    done = subprocess.run([sys.executable, "-c", f"from xlab.fsio import exclusive_lock\n"
                           f"with exclusive_lock({str(lock)!r}, 'x', doing='encode'): pass"],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)  # fmt: skip
    assert done.returncode == 0 and "pid" in lock.read_text()
    dead = lock.read_text().split()[1]
    part = Holder(f"from xlab.fsio import exclusive_lock\nwith exclusive_lock({str(lock)!r}, 'x', shared=True, "
                  "doing='encode part 0 of 2'):")  # fmt: skip
    try:
        with exclusive_lock(lock, "part 1", shared=True, doing="encode part 1 of 2"):
            for refused in (lambda: encode(cfg), lambda: encode_parts.merge(cfg)):
                with pytest.raises(XLabError) as e:
                    refused()
                msg = str(e.value)
                assert f"pid {part.p.pid} " in msg and "encode part 0 of 2" in msg, msg
                assert f"pid {os.getpid()} " in msg and "encode part 1 of 2" in msg, msg
                assert f"pid {dead} " not in msg, msg
    finally:
        part.stop()


def test_training_holds_its_store_for_its_whole_run(tmp_path, monkeypatch):
    """The trainer opens shards lazily (val shards at the first evaluation): for its whole run no
    rebuild may swap the store under it."""
    from xlab.train import trainer

    write_corpus(tmp_path, n=10)
    cfg = config(tmp_path)
    cfg.train.device = "cpu"
    encode(cfg)

    class Fake:
        def __init__(self, cfg, shards_dir, resume, info, device):
            pass

        def run(self, stop_after):
            with pytest.raises(XLabError, match=r"in use by pid \d+ .*\(train reads it\)"):
                encode(cfg, force=True)
            return {"steps": 0}

    monkeypatch.setattr(trainer, "Trainer", Fake)
    assert trainer.train(cfg) == {"steps": 0}
    encode(cfg, force=True)  # the run is over: the rebuild proceeds


def test_a_vocabulary_change_is_not_called_damage(tmp_path):
    import json

    import numpy as np

    from xlab.store.loader import make_batch

    write_corpus(tmp_path, n=10)
    cfg = config(tmp_path)
    encode(cfg)
    store = ShardStore(tmp_path / "shards" / "wiki")  # vocabulary 300
    idx = np.arange(store.rows("val"))
    # a model of a smaller vocabulary than the store's: another tokenizer, said so
    with pytest.raises(XLabError, match="encoded with a vocabulary of 300, the model has 50") as e:
        make_batch(store, "val", idx, vocab_size=50)
    assert "damaged" not in str(e.value)
    # the store re-encoded with another tokenizer under a process that did not hold it
    (tmp_path / "tokenizers" / "wiki.model").write_text(json.dumps({"vocab_size": 1000}))
    encode(cfg, force=True)
    with pytest.raises(XLabError, match=r"re-encoded with another tokenizer \(vocabulary 1000, was 300\)") as e:
        make_batch(store, "test", np.arange(store.rows("test")), vocab_size=300)  # shards not opened before
    assert "damaged" not in str(e.value)


def test_evaluation_holds_its_store_to_the_last_batch(tmp_path, monkeypatch):
    import xlab.checkpoint
    from xlab import evaluate

    store = tmp_path / "shards" / "wiki"
    store.mkdir(parents=True)
    monkeypatch.setattr(xlab.checkpoint, "load_model_meta", lambda *a: (None, None, None, {}))

    def body(*a):
        with pytest.raises(XLabError, match=r"\(evaluate reads it\)"):
            with changing(store, "encode rebuilds it"):
                pass
        return {"loss": 0.0}

    monkeypatch.setattr(evaluate, "_evaluate_store", body)
    assert evaluate.evaluate_checkpoint("ckpt.pt", shards_dir=store, device="cpu") == {"loss": 0.0}
    with changing(store, "encode rebuilds it"):
        pass
