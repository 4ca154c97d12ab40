"""Training under a launcher: the launcher's variables are checked before any work (one line naming
the variable, exit 2), and the ranks of a torchrun killed with SIGKILL die with it, so the same
command with --resume continues the run."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from conftest import assert_children_die
from train_helpers import make_store, read_metrics, torchrun_command, torchrun_env, torchrun_train

from xlab.checkpoint import load_checkpoint
from xlab.distributed import DistInfo, dist_info
from xlab.errors import XLabError

TORCHRUN = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_launcher_variables_are_read_and_checked():
    assert dist_info({}) == DistInfo(0, 0, 1)
    assert dist_info({"LOCAL_RANK": "1"}) == DistInfo(0, 1, 1)  # one process on another GPU
    assert dist_info({**TORCHRUN, "RANK": "1", "LOCAL_RANK": "1"}) == DistInfo(1, 1, 2)
    bad = [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer"),
        ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not an integer"),
        ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK=1 is not a rank of WORLD_SIZE=1"),
        ({"RANK": "-1"}, "RANK=-1"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
        ({**TORCHRUN, "LOCAL_RANK": "2"}, "LOCAL_RANK=2"),
        ({**TORCHRUN, "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1"}, "LOCAL_RANK=1"),
        ({"WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK is not set"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "MASTER_ADDR is not set"),
        ({**TORCHRUN, "MASTER_PORT": ""}, "MASTER_PORT is not set"),
        ({**TORCHRUN, "MASTER_PORT": "http"}, "MASTER_PORT='http' is not an integer"),
        ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a port"),
    ]
    for env, message in bad:
        with pytest.raises(XLabError, match=message):
            dist_info(env)


@pytest.mark.parametrize(
    "env, name",
    [
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "", "MASTER_PORT": ""}, "MASTER_ADDR"),
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE"),
        ({"LOCAL_RANK": "x"}, "LOCAL_RANK"),
        ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK"),
    ],
)
def test_bad_launcher_variables_are_one_line_and_exit_2(tmp_path, cli, env, name):
    """These ended in tracebacks (exit 1): int() of the variable, the process group's rendezvous, or
    the loader's rank check deep in set-up."""
    p = cli(
        ["train", "--shards", tmp_path / "store", "-o", f"paths.runs_dir={tmp_path}"], tmp_path, check=False, env=env
    )
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and f"launcher variable {name}" in lines[0], p.stderr
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow
def test_ranks_die_with_a_killed_launcher_and_the_same_command_resumes(tmp_path):
    """kill -9 of torchrun (an out-of-memory killer, a node agent) left both ranks training on with
    ppid 1, holding the run's lock, so `--resume` was refused naming the orphan's pid."""
    psutil = pytest.importorskip("psutil")
    store = make_store(tmp_path / "data")
    runs = tmp_path / "runs"
    steps = ("train.max_steps=40", "train.checkpoint_every=2", "train.eval_every=1000", "train.log_every=1")
    # Slow steps, so that the run is still going when its launcher is killed.
    slow = (
        "import time\nfrom xlab.train.trainer import Trainer\n_step = Trainer.train_step\n"
        "Trainer.train_step = lambda self, *a, **k: (time.sleep(0.5), _step(self, *a, **k))[1]\n"
    )
    cmd = torchrun_command(tmp_path, store, runs, *steps, preamble=slow)
    last = runs / "t" / "checkpoints" / "last.pt"
    with open(tmp_path / "launcher.log", "w") as log:
        launcher = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=torchrun_env())
        try:
            deadline = time.time() + 180
            while not last.exists() and launcher.poll() is None and time.time() < deadline:
                time.sleep(0.1)
            assert last.exists(), (tmp_path / "launcher.log").read_text()[-3000:]
            ranks = psutil.Process(launcher.pid).children(recursive=True)
            assert len(ranks) >= 2
            os.kill(launcher.pid, signal.SIGKILL)
            launcher.wait()
        finally:
            if launcher.poll() is None:
                launcher.kill()
    assert_children_die(ranks, "their SIGKILLed torchrun launcher")
    saved = load_checkpoint(last)["step"]
    assert 2 <= saved < 40
    torchrun_train(tmp_path, store, runs, *steps, resume=True)  # the lock died with its holder
    assert load_checkpoint(last)["step"] == 40
    logged = [r["step"] for r in read_metrics(runs / "t")]
    assert logged[-(40 - saved) :] == list(range(saved + 1, 41))
