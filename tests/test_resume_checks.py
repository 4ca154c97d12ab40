"""What --resume takes from last.pt is checked before the first step: the optimizer state against
its parameters, the saved configuration against the schema, every counter against what a run can
reach; each misfit is one line naming it (exit 2 from the CLI). A run also removes the temporaries
that a killed earlier run of its folder left."""

from __future__ import annotations

import math
import os
import shutil
import tempfile

import pytest
import torch
from train_helpers import make_cfg, make_store

from xlab.checkpoint import load_checkpoint
from xlab.errors import XLabError
from xlab.train import train

STEPS = ("train.max_steps=6", "train.eval_every=3")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store and two finished 6-step runs of it (AdamW and Muon), with best snapshots."""
    root = tmp_path_factory.mktemp("resume")
    store = make_store(root)
    for opt in ("adamw", "muon"):
        train(make_cfg(root / opt, *STEPS, f"train.optimizer={opt}"), shards_dir=store)
    return root, store


def copy_run(trained, tmp_path, opt: str = "adamw"):
    """A copy of the ``opt`` run's folder in ``tmp_path``: ``(runs, last.pt)``."""
    root, _ = trained
    shutil.copytree(root / opt, tmp_path / "runs")
    return tmp_path / "runs", tmp_path / "runs" / "t" / "checkpoints" / "last.pt"


def tamper(last, edit) -> None:
    ck = torch.load(last, weights_only=True)
    edit(ck)
    torch.save(ck, last)


def resume(trained, runs, opt: str = "adamw", steps: int = 8):
    return train(make_cfg(runs, *STEPS, f"train.optimizer={opt}", f"train.max_steps={steps}"),
                 shards_dir=trained[1], resume=True)  # fmt: skip


def first_state(ck, opt: str = "adamw") -> dict:
    """The optimizer state of the first parameter (of Muon's matrices with ``opt`` muon)."""
    state = ck["optimizer"] if opt == "adamw" else ck["optimizer"]["muon"]
    return state["state"][0]


def shrink(key: str, opt: str = "adamw"):
    """An edit that cuts state ``key`` of the first parameter to 3 columns."""
    return lambda ck: first_state(ck, opt).update({key: first_state(ck, opt)[key][..., :3].clone()})


def widen(key: str):
    """An edit that makes state ``key`` of the first parameter float64."""
    return lambda ck: first_state(ck).update({key: first_state(ck)[key].double()})


@pytest.mark.parametrize(
    "opt, edit, message",
    [
        ("adamw", shrink("exp_avg"), r"optimizer state 'exp_avg' of parameter \S+ is \(\d+, 3\) torch.float32, the "),
        ("adamw", widen("exp_avg_sq"), "optimizer state 'exp_avg_sq' of parameter .* is .* torch.float64, the param"),
        ("adamw", lambda ck: first_state(ck).update(step=torch.tensor(-5.0)), "'step' of parameter .* is not a count"),
        ("adamw", lambda ck: first_state(ck).update(exp_avg=1.0), "'exp_avg' of parameter .* is a float, not a tensor"),
        ("adamw", lambda ck: ck["optimizer"]["state"].update({999: {}}), "entry 999 for no parameter"),
        ("muon", shrink("momentum_buffer", "muon"), "optimizer state 'momentum_buffer' of parameter blocks.0"),
    ],
)
def test_optimizer_state_that_does_not_fit_its_parameter_is_refused(trained, tmp_path, opt, edit, message):
    """A moment of another shape was loaded as it was: one step, a non-finite loss, then SIGSEGV."""
    runs, last = copy_run(trained, tmp_path, opt)
    tamper(last, edit)
    with pytest.raises(XLabError, match=f"cannot resume from {last}: .*{message}") as e:
        resume(trained, runs, opt)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda ck: ck.update(step=-5), "its step -5 is not a count of steps"),
        (lambda ck: ck.update(total_steps=0), "its total_steps 0 is not a count"),
        (lambda ck: ck.update(step=7), "its step 7 is beyond its run's total_steps 6"),
        (lambda ck: ck["loader"].update(epoch=-1), "its loader state .* has no epoch and position"),
        (lambda ck: ck["loader"].update(position=-3), "its loader state .* has no epoch and position"),
        (lambda ck: ck["loader"].update(position=10**6), r"position 1000000 outside \[0, "),
        (lambda ck: ck.update(elapsed_s=math.nan), "its elapsed_s nan is not a number of seconds"),
        (
            lambda ck: ck.update(best=[{"loss": 9.0, "step": 3, "file": "../../x.pt"}]),
            "best list entry .* is not a snap",
        ),
        (lambda ck: ck.update(best=[{"loss": 1.0, "step": 9, "file": "best-step0000009.pt"}]), "best list entry"),
        (lambda ck: ck.update(best="best-step0000003.pt"), "its best list 'best-step0000003.pt' is not a list"),
    ],
)
def test_impossible_counters_are_refused(trained, tmp_path, edit, message):
    """A checkpoint with step -5 was resumed and trained 165 steps; a best entry named outside the
    checkpoint folder would have been deleted when it fell out of the list."""
    runs, last = copy_run(trained, tmp_path)
    tamper(last, edit)
    with pytest.raises(XLabError, match=f"cannot resume from {last}: .*{message}"):
        resume(trained, runs)
    assert load_checkpoint(last)  # left as it was


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda ck: ck["config"]["model"].update(norm="bogus"), "Invalid value 'bogus'"),
        (lambda ck: ck["config"]["model"].update(d_model="abc"), "d_model"),
        (lambda ck: ck["model_config"].update(norm="rmsnorm"), "model_config and config disagree on model.norm"),
        (lambda ck: (ck["config"]["model"].update(norm="bogus"), ck["model_config"].update(norm="bogus")), "bogus"),
        (lambda ck: ck["model_config"].update(n_heads=5), "model_config and config disagree on model.n_heads"),
    ],
)
def test_a_checkpoint_configuration_this_xlab_cannot_build_is_one_line(trained, tmp_path, edit, message):
    """model.norm: bogus in the checkpoint was reported as a changed setting (or, in model_config,
    not noticed at all); generate says what it is: a configuration that cannot be used."""
    runs, last = copy_run(trained, tmp_path)
    tamper(last, edit)
    with pytest.raises(XLabError, match=f"{last} holds an unusable configuration: .*{message}"):
        resume(trained, runs)


def test_tampered_checkpoints_are_one_line_and_exit_2_from_the_command_line(trained, tmp_path, cli):
    runs, last = copy_run(trained, tmp_path)
    good = last.read_bytes()
    edits = [shrink("exp_avg"), lambda ck: ck.update(step=-5), lambda ck: ck["config"]["model"].update(norm="bogus")]
    for edit in edits:
        last.write_bytes(good)
        tamper(last, edit)
        p = cli(["train", "--shards", trained[1], "--run-name", "t", "--resume", "-o", f"paths.runs_dir={runs}",
                 "--max-steps", "8"], tmp_path, check=False)  # fmt: skip
        errors = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: "), p.stderr[-2000:]


def test_a_run_removes_the_temporaries_a_killed_run_of_its_folder_left(trained, tmp_path):
    """SIGKILL during a checkpoint write left runs/r/checkpoints/.last.pt.XXXXXXXX.tmp for good."""
    runs, last = copy_run(trained, tmp_path)
    ckpts = last.parent
    left = [
        tempfile.mkstemp(prefix=".last.pt.", suffix=".tmp", dir=ckpts)[1],  # as fsio.atomic_path names them
        tempfile.mkstemp(prefix=".config.yaml.", suffix=".tmp", dir=ckpts.parent)[1],
        str(ckpts / ".best-step0000006.pt.link"),
    ]
    (ckpts / ".best-step0000006.pt.link").write_bytes(b"")
    mine = [ckpts / "notes.tmp", ckpts / ".notes.tmp", ckpts.parent / "keep.txt"]  # not an XLab temporary
    for p in mine:
        p.write_text("x")
    assert resume(trained, runs)["steps"] == 8
    assert not [p for p in left if os.path.exists(p)]
    assert all(p.exists() for p in mine)
    with pytest.raises(XLabError, match="already has checkpoints"):  # a refused fresh run cleans too
        tempfile.mkstemp(prefix=".last.pt.", suffix=".tmp", dir=ckpts)
        train(make_cfg(runs, *STEPS), shards_dir=trained[1])
    assert not list(ckpts.glob(".last.pt.*.tmp"))
