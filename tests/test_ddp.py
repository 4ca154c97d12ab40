"""DDP on CPU (gloo): 2 processes with batch B follow the loss curve of 1 process with batch 2B, and
a 2-process run stopped and resumed equals an uninterrupted one."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from train_helpers import make_cfg, make_store, read_metrics, torchrun_env, torchrun_train

from xlab.checkpoint import load_checkpoint
from xlab.train import train

pytestmark = pytest.mark.slow  # two torchrun launches of 2 processes each
TESTS = Path(__file__).resolve().parent
STEPS = 5
COMMON = (f"train.max_steps={STEPS}", "train.grad_accum=2", "train.eval_every=100", "train.eval_batches=null")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("ddp"))


def torchrun(tmp_path: Path, store: Path, runs: Path, *overrides: str, stop_after=None, resume=False) -> str:
    """Run ``xlab.train.train`` in 2 gloo processes; return their stdout."""
    return torchrun_train(tmp_path, store, runs, *overrides, stop_after=stop_after, resume=resume)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_processes_match_one_process_with_twice_the_batch(store, tmp_path, optimizer):
    opt = f"train.optimizer={optimizer}"
    out = torchrun(tmp_path, store, tmp_path / "ddp", "train.batch_size=2", opt, *COMMON)
    one = train(make_cfg(tmp_path / "one", "train.batch_size=4", opt, *COMMON), shards_dir=store)

    a = read_metrics(tmp_path / "ddp" / "t")
    b = read_metrics(tmp_path / "one" / "t")
    assert [r["step"] for r in a] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-4)
    assert [r["accuracy"] for r in a] == pytest.approx([r["accuracy"] for r in b], rel=1e-4)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-4)
    va, vb = read_metrics(tmp_path / "ddp" / "t", "val"), read_metrics(tmp_path / "one" / "t", "val")
    assert va[-1]["tokens"] == vb[-1]["tokens"] and va[-1]["loss"] == pytest.approx(one["val_loss"], rel=1e-4)
    # Only rank 0 wrote: one checkpoint folder, and its loader state counts per-rank batches.
    ck = load_checkpoint(tmp_path / "ddp" / "t" / "checkpoints" / "last.pt")
    assert ck["loader"]["position"] == STEPS * 2 and ck["step"] == STEPS
    assert "2 process(es)" in out


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_process_resume_is_exact(store, tmp_path, optimizer):
    # Dropout on: each rank's random stream must be saved and restored, not only rank 0's.
    o = (
        f"train.optimizer={optimizer}",
        "train.batch_size=2",
        "model.dropout=0.2",
        "train.max_steps=6",
        "train.eval_every=100",
        "train.checkpoint_every=100",
    )
    torchrun(tmp_path, store, tmp_path / "full", *o)
    torchrun(tmp_path, store, tmp_path / "cut", *o, stop_after=3)
    torchrun(tmp_path, store, tmp_path / "cut", *o, resume=True)
    a = read_metrics(tmp_path / "full" / "t")
    b = read_metrics(tmp_path / "cut" / "t")
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    wa = load_checkpoint(tmp_path / "full" / "t" / "checkpoints" / "last.pt")
    wb = load_checkpoint(tmp_path / "cut" / "t" / "checkpoints" / "last.pt")
    assert len(wb["rank_rng"]) == 2 and not torch.equal(wb["rank_rng"][0]["torch"], wb["rank_rng"][1]["torch"])
    for k in wa["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k


def test_sigterm_to_torchrun_saves_every_rank_at_one_step(store, tmp_path):
    """Schedulers send SIGTERM before the kill: torchrun forwards it, every rank stops after the same
    step (the stop flag is all-reduced) and rank 0 saves last.pt with both ranks' random states."""
    import signal
    import time

    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import torch
        torch.set_num_threads(1)
        from train_helpers import make_cfg
        from xlab.train import train
        train(make_cfg({str(tmp_path)!r}, "train.batch_size=2", "train.max_steps=100000", "train.eval_every=100000",
                       "train.checkpoint_every=100000"), shards_dir={str(store)!r})
    """)
    )
    env = torchrun_env()  # this checkout first on the ranks' path
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "t" / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    ck = load_checkpoint(tmp_path / "t" / "checkpoints" / "last.pt")
    assert ck["step"] >= 3 and ck["loader"]["position"] == ck["step"]  # saved after a whole step
    assert len(ck["rank_rng"]) == 2
