"""FSDP2 on CPU (gloo): 2 processes with batch B train as 1 process with batch 2B (loss, gradient
norm, weights and optimizer moments), a tied head stays tied, the checkpoint is XLab's whole-tensor
format, and a run stopped and resumed equals an uninterrupted one exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import make_cfg, make_store, read_metrics, torchrun_train

from xlab.checkpoint import build_model, load_checkpoint
from xlab.train import train

pytestmark = pytest.mark.slow  # four torchrun launches of 2 processes each
TESTS = Path(__file__).resolve().parent
STEPS = 3
COMMON = (
    "train.parallel=fsdp",
    "model.tie_embeddings=true",
    f"train.max_steps={STEPS}",
    "train.grad_accum=2",
    "train.eval_every=2",  # a mid-run evaluation: each forward pass is a collective under FSDP
    "train.eval_batches=3",  # 2 batches on rank 0, 1 on rank 1: it hung until every rank got as many
)
# Run in each worker after training: the head is still the embedding's parameter, and both are shards.
CHECK_TIE = """
import xlab.train.trainer as T
from torch.distributed.tensor import DTensor
_run = T.Trainer.run
def run(self, *a, **k):
    out = _run(self, *a, **k)
    m = self.model
    assert m.lm_head.weight is m.tok_emb.weight and isinstance(m.tok_emb.weight, DTensor)
    print("tie kept", flush=True)
    return out
T.Trainer.run = run
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("fsdp"))


def torchrun(tmp_path: Path, store: Path, runs: Path, *overrides: str, stop_after=None, resume=False) -> str:
    """Run ``xlab.train.train`` in 2 gloo processes; return their stdout."""
    return torchrun_train(tmp_path, store, runs, *overrides, stop_after=stop_after, resume=resume, preamble=CHECK_TIE)


def tensors(obj, prefix=""):
    """``{path: tensor}`` of every tensor in a nested state (model or optimizer)."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, sub in obj.items() for k, v in tensors(sub, f"{prefix}/{key}").items()}
    if isinstance(obj, list):
        return {k: v for i, sub in enumerate(obj) for k, v in tensors(sub, f"{prefix}/{i}").items()}
    return {}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_shards_match_one_process_with_twice_the_batch(store, tmp_path, optimizer):
    opt = f"train.optimizer={optimizer}"
    out = torchrun(tmp_path, store, tmp_path / "fsdp", "train.batch_size=2", opt, *COMMON)
    # In one process train.parallel=fsdp means no wrapper: this is the reference.
    train(make_cfg(tmp_path / "one", "train.batch_size=4", opt, *COMMON), shards_dir=store)
    assert out.count("tie kept") == 2 and "2 process(es) (FSDP) on cpu" in out

    a, b = read_metrics(tmp_path / "fsdp" / "t"), read_metrics(tmp_path / "one" / "t")
    assert [r["step"] for r in a] == list(range(1, STEPS + 1))
    # A gradient summed instead of averaged over the 2 ranks shows as twice the norm.
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-5)
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)

    ca = load_checkpoint(tmp_path / "fsdp" / "t" / "checkpoints" / "last.pt")
    cb = load_checkpoint(tmp_path / "one" / "t" / "checkpoints" / "last.pt")
    # XLab's own layout: whole tensors, the same keys and shapes as a one-process checkpoint.
    ta, tb = (
        tensors({"model": ca["model"], "optimizer": ca["optimizer"]}),
        tensors({"model": cb["model"], "optimizer": cb["optimizer"]}),
    )
    assert ta.keys() == tb.keys()
    # fp32 rounding (the two ranks' gradients are summed in another order); Muon orthogonalises in
    # bf16, where such a last-bit difference can flip a rounding: one bf16 ulp times the learning rate.
    atol = 1e-6 if optimizer == "adamw" else 2e-5
    for k in tb:
        assert ta[k].shape == tb[k].shape, k
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=atol, msg=k)
    assert torch.equal(ca["model"]["lm_head.weight"], ca["model"]["tok_emb.weight"])
    # The checkpoint loads in one process, as evaluate/generate/export read it.
    model = build_model(ca["model_config"])
    model.load_state_dict(ca["model"])
    assert model.lm_head.weight is model.tok_emb.weight


def test_fsdp_resume_is_exact(store, tmp_path):
    # Muon + AdamW: both optimizers' states (momentum buffers, moments, step counts) go through
    # gather and re-shard.
    o = ("train.batch_size=2", "train.optimizer=muon", "train.checkpoint_every=100", *COMMON)
    torchrun(tmp_path, store, tmp_path / "full", *o)
    torchrun(tmp_path, store, tmp_path / "cut", *o, stop_after=2)
    assert load_checkpoint(tmp_path / "cut" / "t" / "checkpoints" / "last.pt")["step"] == 2
    torchrun(tmp_path, store, tmp_path / "cut", *o, resume=True)
    a, b = read_metrics(tmp_path / "full" / "t"), read_metrics(tmp_path / "cut" / "t")
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    wa = load_checkpoint(tmp_path / "full" / "t" / "checkpoints" / "last.pt")
    wb = load_checkpoint(tmp_path / "cut" / "t" / "checkpoints" / "last.pt")
    ta, tb = tensors({"m": wa["model"], "o": wa["optimizer"]}), tensors({"m": wb["model"], "o": wb["optimizer"]})
    assert ta.keys() == tb.keys() and any("exp_avg_sq" in k for k in ta) and any("momentum_buffer" in k for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
