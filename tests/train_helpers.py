"""Shared by the trainer's tests: a tiny real shard store (real tokenizer, real packing) and a config."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

from xlab.config import load_config
from xlab.store import TokenizerEntry, write_store
from xlab.tokenizer import Tokenizer


def make_texts(n: int, seed: int) -> list[str]:
    """``n`` made-up articles of Zipf-distributed words, 5 to 60 words each."""
    rng = random.Random(seed)
    syl = ["ka", "lo", "ri", "the", "an", "mus", "ter", "ion", "pa", "ve", "st", "or"]
    words = sorted({"".join(rng.choices(syl, k=rng.randint(1, 3))) for _ in range(120)})
    weights = [1.0 / (r + 1) for r in range(len(words))]
    return [" ".join(rng.choices(words, weights, k=rng.randint(5, 60))) + "." for _ in range(n)]


def make_store(
    root: Path, *, seq_len: int = 16, n_train: int = 120, n_val: int = 20, vocab: int = 300, layout: str = "padded"
) -> Path:
    """Write a shard store under ``root/store`` (train and val splits) and return its path.

    It is written by :func:`xlab.store.write_store`, the same manifest builder as ``xlab data encode``,
    so it passes ``xlab data validate``."""
    root = Path(root)
    texts = {"train": make_texts(n_train, 1), "val": make_texts(n_val, 2)}
    tok = Tokenizer.train(texts["train"], vocab, root / "tok.model", seed=1, num_threads=1)
    store = root / "store"
    write_store(
        store,
        {s: tok.encode(arts) for s, arts in texts.items()},
        seq_len=seq_len,
        tokenizer=TokenizerEntry.of(tok, root / "tok.model"),
        tokenizer_bytes=(root / "tok.model").read_bytes(),
        texts=texts,
        layout=layout,
    )
    return store


def make_cfg(runs_dir: Path, *overrides: str):
    """A tiny-model configuration (d_model 32, 2 layers) writing runs under ``runs_dir``."""
    base = [
        f"paths.runs_dir={runs_dir}",
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.d_ff=64",
        "train.run_name=t",
        "train.batch_size=4",
        "train.max_steps=6",
        "train.lr=3e-3",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.eval_every=3",
        "train.eval_batches=2",
        "train.checkpoint_every=100",
        "train.device=cpu",
        "train.deterministic=true",
    ]
    return load_config([], base + list(overrides), use_defaults_file=False)


def read_metrics(run_dir: Path, split: str = "train") -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def torchrun_command(tmp_path: Path, store: Path, runs: Path, *overrides: str, stop_after=None, resume=False,
                     preamble: str = "") -> list[str]:  # fmt: skip
    """The command line that runs ``xlab.train.train`` with :func:`make_cfg` ``(runs, *overrides)`` in 2
    gloo processes under torchrun (``preamble``: code each worker runs first); its script is written
    to ``tmp_path/worker.py``."""
    script = Path(tmp_path) / "worker.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        import torch
        torch.set_num_threads(1)
        from train_helpers import make_cfg
        from xlab.train import train
        """)
        + preamble
        + textwrap.dedent(f"""
        train(make_cfg({str(runs)!r}, *{overrides!r}), shards_dir={str(store)!r}, resume={resume!r},
              stop_after={stop_after!r})
        """)
    )
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]


def torchrun_env() -> dict[str, str]:
    """The environment of a torchrun launch: one thread per rank, and this checkout's ``xlab`` first on
    the ranks' path (the worker script runs from the test's folder, not the checkout's root)."""
    root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def torchrun_train(tmp_path: Path, store: Path, runs: Path, *overrides: str, stop_after=None, resume=False,
                   preamble: str = "") -> str:  # fmt: skip
    """Run ``xlab.train.train`` with :func:`make_cfg` ``(runs, *overrides)`` in 2 gloo processes
    under torchrun (``preamble``: code each worker runs first); return their stdout.

    Raises:
        AssertionError: the launch failed (with the tail of its output), or took over 240 s.
    """
    cmd = torchrun_command(tmp_path, store, runs, *overrides, stop_after=stop_after, resume=resume, preamble=preamble)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=torchrun_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout
