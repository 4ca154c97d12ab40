"""Shared by the trainer's tests: a tiny real shard store (real tokenizer, real packing) and a config."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from xlab.config import load_config
from xlab.shards import FORMAT, FORMAT_VERSION, pack_articles, token_dtype, write_shard
from xlab.tokenizer import Tokenizer


def make_texts(n: int, seed: int) -> list[str]:
    """``n`` made-up articles of Zipf-distributed words, 5 to 60 words each."""
    rng = random.Random(seed)
    syl = ["ka", "lo", "ri", "the", "an", "mus", "ter", "ion", "pa", "ve", "st", "or"]
    words = sorted({"".join(rng.choices(syl, k=rng.randint(1, 3))) for _ in range(120)})
    weights = [1.0 / (r + 1) for r in range(len(words))]
    return [" ".join(rng.choices(words, weights, k=rng.randint(5, 60))) + "." for _ in range(n)]


def make_store(root: Path, *, seq_len: int = 16, n_train: int = 120, n_val: int = 20, vocab: int = 300) -> Path:
    """Write a shard store under ``root/store`` (train and val splits) and return its path."""
    root = Path(root)
    texts = {"train": make_texts(n_train, 1), "val": make_texts(n_val, 2)}
    tok = Tokenizer.train(texts["train"], vocab, root / "tok.model", seed=1, num_threads=1)
    store = root / "store"
    splits = {}
    for split, arts in texts.items():
        ids = tok.encode(arts)
        rows = pack_articles(ids, seq_len, sos_id=tok.sos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                             vocab_size=tok.vocab_size)
        sha = write_shard(store / split / "000000.npy", rows)
        real = int((rows[:, :-1] != tok.pad_id).sum())
        splits[split] = {
            "rows": len(rows), "articles": len(arts), "real_tokens": real,
            "target_tokens": sum(len(a) + 1 for a in ids),
            "text_bytes": sum(len(a.encode()) for a in arts), "text_chars": sum(len(a) for a in arts),
            "shards": [{"file": f"{split}/000000.npy", "rows": len(rows), "real_tokens": real, "sha256": sha}],
        }
    shutil.copyfile(root / "tok.model", store / "tokenizer.model")
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "xlab_version": "test", "seq_len": seq_len,
        "row_len": seq_len + 1, "dtype": str(token_dtype(tok.vocab_size)),
        "tokenizer": {"file": str(root / "tok.model"), "copy": "tokenizer.model", "sha256": tok.sha256,
                      "vocab_size": tok.vocab_size, "pad_id": tok.pad_id, "sos_id": tok.sos_id,
                      "eos_id": tok.eos_id, "unk_id": tok.unk_id},
        "splits": splits, "params": {}, "inputs": {},
    }
    (store / "manifest.json").write_text(json.dumps(manifest))
    return store


def make_cfg(runs_dir: Path, *overrides: str):
    """A tiny-model configuration (d_model 32, 2 layers) writing runs under ``runs_dir``."""
    base = [
        f"paths.runs_dir={runs_dir}", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
        "model.d_ff=64", "train.run_name=t", "train.batch_size=4", "train.max_steps=6", "train.lr=3e-3",
        "train.warmup_steps=2", "train.log_every=1", "train.eval_every=3", "train.eval_batches=2",
        "train.checkpoint_every=100", "train.device=cpu", "train.deterministic=true",
    ]
    return load_config([], base + list(overrides), use_defaults_file=False)


def read_metrics(run_dir: Path, split: str = "train") -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def one_thread():
    """Generator for an autouse fixture: one torch thread (tiny models; no spinning on busy cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
