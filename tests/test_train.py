"""The trainer: schedule, parameter groups, exact gradient accumulation, exact resume, refusal to
overwrite a run, NaN handling and Ctrl-C. The loss itself is tests/test_loss.py."""

from __future__ import annotations

import math
import os
import re
import signal

import pytest
import torch
from train_helpers import make_cfg, make_store, read_metrics

import xlab.loss
from xlab.checkpoint import load_checkpoint
from xlab.config import ModelConfig
from xlab.errors import XLabError
from xlab.train import lr_at, param_groups, train
from xlab.train.schedule import momentum_at


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("data"))


def test_lr_schedule():
    kw = dict(lr=1.0, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)  # held at the floor
    assert lr_at(50, **{**kw, "schedule": "constant"}) == 1.0
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_warmup_stable_decay_schedule():
    kw = dict(lr=1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert all(lr_at(s, **kw) == 1.0 for s in range(10, 80))  # stable until the last 20 steps
    assert lr_at(80, **kw) == pytest.approx(1.0 - 0.9 / 20)  # the first step of the linear decay
    assert lr_at(89, **kw) == pytest.approx(0.55)  # half way down
    assert lr_at(99, **kw) == pytest.approx(0.1) and lr_at(150, **kw) == pytest.approx(0.1)  # the floor
    assert lr_at(99, **{**kw, "min_lr_ratio": 0.0}) == 0.0  # decays to zero, as nanochat's does


def test_muon_momentum_warmup():
    kw = dict(momentum=0.95, start=0.85, warmup_steps=300)
    assert momentum_at(0, **kw) == 0.85 and momentum_at(150, **kw) == pytest.approx(0.90)
    assert momentum_at(300, **kw) == 0.95 and momentum_at(10_000, **kw) == 0.95
    assert momentum_at(0, **{**kw, "warmup_steps": 0}) == 0.95


def test_the_newer_recipe_options_train_and_resume_exactly(store, tmp_path):
    """wsd, Muon momentum warm-up, embedding and head learning rates and AdamW eps: the schedules
    are functions of the step, so 6 steps equal 3 + resume + 3, and each option reaches the optimizer."""
    opts = ("train.optimizer=muon", "train.lr_schedule=wsd", "train.decay_fraction=0.5", "train.min_lr_ratio=0",
            "train.muon_momentum_warmup_steps=4", "train.embedding_lr=0.05", "train.head_lr=0.001",
            "train.adam_eps=1e-10", "train.eval_every=100")  # fmt: skip
    train(make_cfg(tmp_path / "a", *opts), shards_dir=store)
    train(make_cfg(tmp_path / "b", *opts), shards_dir=store, stop_after=3)
    train(make_cfg(tmp_path / "b", *opts), shards_dir=store, resume=True)
    la, lb = (read_metrics(tmp_path / r / "t") for r in "ab")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb] and len(la) == 6
    assert [r["lr"] for r in la] == pytest.approx([3e-3 * f for f in (1 / 2, 1, 1, 2 / 3, 1 / 3, 0)])
    ck = load_checkpoint(tmp_path / "b" / "t" / "checkpoints" / "last.pt")
    wa = load_checkpoint(tmp_path / "a" / "t" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(wa[k], ck["model"][k]) for k in wa)
    groups = ck["optimizer"]["adamw"]["param_groups"]
    # AdamW keeps norms and biases (1.0), the embedding and the head; Muon every block matrix
    assert sorted(g["lr_scale"] for g in groups) == pytest.approx(sorted([1.0, 0.05 / 3e-3, 0.001 / 3e-3]))
    assert all(g["eps"] == 1e-10 for g in groups) and ck["optimizer"]["muon"]["param_groups"][0]["momentum"] == 0.95


def test_weight_decay_only_on_matrices():
    from xlab.model import Transformer

    cfg = make_cfg("/unused", "model.position=learned")
    model = Transformer(ModelConfig.of(cfg.model, vocab_size=300, max_len=cfg.shards.seq_len))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    d = {names[id(p)] for p in decay["params"]}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert d and all(p.ndim == 2 for p in decay["params"])
    assert "lm_head.weight" in d
    assert any("bias" in n for n in nd) and any("norm" in n or "ln" in n for n in nd)
    emb = {names[id(m.weight)] for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    assert len(emb) == 2 and emb <= nd  # token and learned position tables
    assert len(d) + len(nd) == len(list(model.parameters()))


def test_accumulating_four_micro_batches_equals_one_four_times_larger(store, tmp_path):
    # The loader deals the same rows in the same order whatever the batch size (one epoch), so
    # batch 8 x accumulation 1 and batch 2 x accumulation 4 see identical rows at every step.
    whole_val = "train.eval_batches=null"  # evaluation batches follow batch_size; compare on all of val
    big = train(make_cfg(tmp_path / "a", "train.batch_size=8", "train.grad_accum=1", whole_val), shards_dir=store)
    acc = train(make_cfg(tmp_path / "b", "train.batch_size=2", "train.grad_accum=4", whole_val), shards_dir=store)
    la = [r["loss"] for r in read_metrics(tmp_path / "a" / "t")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "b" / "t")]
    assert len(la) == len(lb) == 6
    assert la == pytest.approx(lb, rel=1e-5)
    assert big["val_loss"] == pytest.approx(acc["val_loss"], rel=1e-5)
    wa = load_checkpoint(tmp_path / "a" / "t" / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(tmp_path / "b" / "t" / "checkpoints" / "last.pt")["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def test_padding_micro_batch_contributes_nothing(store, tmp_path):
    from xlab.distributed import DistInfo
    from xlab.train import Trainer

    cfg = make_cfg(tmp_path)
    one = Trainer(cfg, store, False, DistInfo(), torch.device("cpu"))
    two = Trainer(make_cfg(tmp_path, "train.run_name=u"), store, False, DistInfo(), torch.device("cpu"))
    x, y = next(iter(one.loader))
    pad = (x.clone(), torch.full_like(y, -100))
    r1 = one.train_step([(x, y)])
    r2 = two.train_step([pad, (x, y), pad])
    assert r1["count"] == r2["count"] > 0
    assert r2["loss_sum"] == pytest.approx(r1["loss_sum"], rel=1e-6)
    for p1, p2 in zip(one.model.parameters(), two.model.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-7)
        assert torch.isfinite(p2).all()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_exact(tmp_path, optimizer):
    # 32 rows, batch 4: 8 batches per epoch. Stop at step 8 (the end of epoch 0, between two
    # checkpoint steps) and resume into epoch 1; dropout makes the RNG state matter too.
    store = make_store(tmp_path, n_train=5)
    n, stop = 12, 8
    extra = (
        f"train.max_steps={n}",
        "train.eval_every=5",
        "train.checkpoint_every=3",
        "model.dropout=0.1",
        f"train.optimizer={optimizer}",
    )
    full = train(make_cfg(tmp_path / "one", *extra), shards_dir=store)
    cfg = make_cfg(tmp_path / "two", *extra)
    half = train(cfg, shards_dir=store, stop_after=stop)
    assert half["interrupted"] and half["steps"] == stop
    assert load_checkpoint(tmp_path / "two" / "t" / "checkpoints" / "last.pt")["loader"]["epoch"] == 1
    rest = train(cfg, shards_dir=store, resume=True)
    assert rest["steps"] == n and not rest["interrupted"]
    a = read_metrics(tmp_path / "one" / "t")
    b = read_metrics(tmp_path / "two" / "t")
    assert [r["step"] for r in b] == list(range(1, n + 1))  # one record per step, none repeated
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert read_metrics(tmp_path / "one" / "t", "val") == read_metrics(tmp_path / "two" / "t", "val")
    assert full["val_loss"] == rest["val_loss"]
    wa = load_checkpoint(tmp_path / "one" / "t" / "checkpoints" / "last.pt")
    wb = load_checkpoint(tmp_path / "two" / "t" / "checkpoints" / "last.pt")
    for k in wa["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k
    assert wa["loader"] == wb["loader"] == {"epoch": 1, "position": n - 8, "seed": 42}
    assert wa["step"] == wb["step"] == n
    oa, ob = wa["optimizer"], wb["optimizer"]
    if optimizer == "muon":
        ma, mb = oa["muon"]["state"], ob["muon"]["state"]
        assert ma and all(torch.equal(ma[i]["momentum_buffer"], mb[i]["momentum_buffer"]) for i in ma)
        oa, ob = oa["adamw"], ob["adamw"]
    sa, sb = oa["state"], ob["state"]
    assert sa and all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_run_folder_is_never_overwritten(store, tmp_path):
    cfg = make_cfg(tmp_path, "train.max_steps=2")
    with pytest.raises(XLabError, match="--resume"):
        train(cfg, shards_dir=store, resume=True)  # nothing to resume yet
    train(cfg, shards_dir=store)
    last = tmp_path / "t" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    with pytest.raises(XLabError, match="--resume.*--run-name"):
        train(cfg, shards_dir=store)
    assert last.read_bytes() == before


def test_checkpoint_contents_and_best_kept(store, tmp_path):
    cfg = make_cfg(tmp_path, "train.max_steps=6", "train.eval_every=1", "train.keep_best=2")
    s = train(cfg, shards_dir=store)
    ck = tmp_path / "t" / "checkpoints"
    bests = sorted(p.name for p in ck.glob("best-*.pt"))
    assert len(bests) == 2
    c = load_checkpoint(ck / "last.pt")
    vals = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "t", "val")}
    assert sorted(b["file"] for b in c["best"]) == bests
    assert sorted(b["loss"] for b in c["best"]) == sorted(vals.values())[:2]
    assert c["step"] == 6 and c["model_config"]["vocab_size"] == 300 and c["model_config"]["max_len"] == 16
    assert "vocab_size" not in c["config"]["model"]  # the user's section holds what the user chooses
    assert c["tokenizer"].dtype == torch.uint8 and c["shards"] == str(store)
    assert c["loader"] == {"epoch": 0, "position": 6, "seed": 42}
    assert (tmp_path / "t" / "config.yaml").is_file() and any((tmp_path / "t" / "tb").iterdir())
    rec = read_metrics(tmp_path / "t")[-1]
    assert set(rec) >= {"loss", "accuracy", "lr", "grad_norm", "tokens_per_s", "gflops", "mfu"}
    # A CPU has no published peak: achieved GFLOP/s, and no MFU (a start-up measurement gave > 100 %).
    from xlab.model import Transformer

    fpt = Transformer(c["model_config"]).flops_per_token(16)
    assert rec["mfu"] is None and rec["gflops"] == pytest.approx(fpt * rec["tokens_per_s"] / 1e9)
    v = read_metrics(tmp_path / "t", "val")[-1]
    assert v["perplexity"] == pytest.approx(math.exp(v["loss"]))
    info = __import__("xlab.store", fromlist=["ShardStore"]).ShardStore(store).split_info("val")
    assert s["val_bits_per_byte"] == pytest.approx(
        v["loss"] * info["target_tokens"] / (info["text_bytes"] * math.log(2))
    )


def test_nan_loss_stops_and_keeps_last_good_checkpoint(store, tmp_path, monkeypatch):
    real = xlab.loss.model_loss
    calls = {"n": 0}

    def poisoned(model, x, y, chunk, *a):
        loss, c, n = real(model, x, y, chunk, *a)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 5:
                loss = loss * float("nan")
        return loss, c, n

    monkeypatch.setattr(xlab.loss, "model_loss", poisoned)
    cfg = make_cfg(tmp_path, "train.checkpoint_every=2", "train.eval_every=100")
    with pytest.raises(XLabError, match="non-finite loss at step 5"):
        train(cfg, shards_dir=store)
    c = load_checkpoint(tmp_path / "t" / "checkpoints" / "last.pt")
    assert c["step"] == 4
    assert all(torch.isfinite(v).all() for v in c["model"].values())


def test_a_second_writer_of_a_run_is_refused_naming_the_holder(store, tmp_path):
    from xlab.fsio import exclusive_lock, lock_path

    cfg = make_cfg(tmp_path)
    with exclusive_lock(lock_path(tmp_path / "t"), "test"):  # another `xlab train` of run t
        with pytest.raises(XLabError, match=rf"run .* is in use by pid {os.getpid()} on "):
            train(cfg, shards_dir=store)
    assert not (tmp_path / "t").exists()  # refused before anything was written
    assert train(cfg, shards_dir=store)["steps"] == 6  # the lock dies with its holder


def test_ctrl_c_saves_then_raises(store, tmp_path, monkeypatch):
    real = xlab.loss.model_loss
    calls = {"n": 0}

    def interrupting(model, x, y, chunk, *a):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the step in progress completes
        return real(model, x, y, chunk, *a)

    monkeypatch.setattr(xlab.loss, "model_loss", interrupting)
    # The handler in force before the run (the default, or SIG_IGN in a shell's background job).
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(tmp_path, "train.eval_every=100"), shards_dir=store)
    assert signal.getsignal(signal.SIGINT) is before  # the trainer restores it
    c = load_checkpoint(tmp_path / "t" / "checkpoints" / "last.pt")
    assert c["step"] == 3  # the flag is seen at the start of the next step, which is completed
    monkeypatch.setattr(xlab.loss, "model_loss", real)
    s = train(make_cfg(tmp_path, "train.eval_every=100"), shards_dir=store, resume=True)
    assert s["steps"] == 6


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_cli_ctrl_c_or_sigterm_saves_and_exits(store, tmp_path, sig, code):
    """SIGTERM (what schedulers send before a kill) saves last.pt as Ctrl-C does; exit 128 + signal."""
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "xlab",
        "train",
        "--shards",
        str(store),
        "--max-steps",
        "100000",
        "-o",
        f"paths.runs_dir={tmp_path}",
        "-o",
        "model.d_model=32",
        "-o",
        "model.n_layers=2",
        "-o",
        "model.n_heads=2",
        "-o",
        "model.d_ff=64",
        "-o",
        "train.batch_size=4",
        "-o",
        "train.log_every=1",
        "-o",
        "train.eval_every=100000",
        "-o",
        "train.device=cpu",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        for line in proc.stdout:
            if line.startswith("step"):
                proc.send_signal(sig)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-2000:]
    assert "stopped at step" in out
    c = load_checkpoint(tmp_path / "demo" / "checkpoints" / "last.pt")
    assert c["step"] >= 1 and c["loader"]["position"] == c["step"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_token_id_outside_the_vocabulary_is_a_one_line_error(store, tmp_path, split):
    import shutil

    import numpy as np

    from xlab.store import ShardStore

    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    s = ShardStore(store)
    rows = s.read_rows(split, np.arange(s.rows(split))).copy()
    rows[:, 2] = s.vocab_size + 5  # fits the uint16 dtype, so the cheap store check passes
    np.save(bad / split / "000000.npy", rows)
    with pytest.raises(XLabError, match="xlab data validate"):
        train(make_cfg(tmp_path / "runs", "train.max_steps=3", "train.eval_every=1"), shards_dir=bad)


def test_resume_logs_the_same_train_loss_between_log_steps(tmp_path):
    # log_every 3 and a stop at step 4: the log line of step 6 sums steps 4 (before the stop) to 6.
    store = make_store(tmp_path, n_train=5)
    extra = ("train.max_steps=9", "train.log_every=3", "train.eval_every=100", "train.checkpoint_every=100")
    train(make_cfg(tmp_path / "one", *extra), shards_dir=store)
    cfg = make_cfg(tmp_path / "two", *extra)
    train(cfg, shards_dir=store, stop_after=4)
    train(cfg, shards_dir=store, resume=True)
    a, b = read_metrics(tmp_path / "one" / "t"), read_metrics(tmp_path / "two" / "t")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 6, 9]
    assert [(r["loss"], r["accuracy"]) for r in a] == [(r["loss"], r["accuracy"]) for r in b]


def test_resume_refuses_a_changed_model(store, tmp_path):
    cfg = make_cfg(tmp_path / "runs", "train.max_steps=2", "train.eval_every=100")
    train(cfg, shards_dir=store)
    with pytest.raises(XLabError, match=r"model settings cannot change on --resume: d_model 32 \(checkpoint\) vs 64"):
        train(make_cfg(tmp_path / "runs", "train.max_steps=3", "model.d_model=64"), shards_dir=store, resume=True)
    rest = train(make_cfg(tmp_path / "runs", "train.max_steps=3"), shards_dir=store, resume=True)
    assert rest["steps"] == 3


def test_resume_refuses_another_optimizer(store, tmp_path):
    cfg = make_cfg(tmp_path / "runs", "train.max_steps=2", "train.eval_every=100")
    train(cfg, shards_dir=store)
    with pytest.raises(XLabError, match=r"train.optimizer cannot change on --resume \(adamw in the checkpoint, muon"):
        train(make_cfg(tmp_path / "runs", "train.max_steps=3", "train.optimizer=muon"), shards_dir=store, resume=True)


def test_resume_of_a_checkpoint_older_than_a_model_option_takes_its_default(store, tmp_path):
    # A 0.4 checkpoint's model section has no qk_norm, zero_init_proj or logit_softcap: they were off.
    cfg = make_cfg(tmp_path / "runs", "train.max_steps=2", "train.eval_every=100")
    train(cfg, shards_dir=store)
    last = tmp_path / "runs" / "t" / "checkpoints" / "last.pt"
    ck = load_checkpoint(last)
    for key in ("qk_norm", "zero_init_proj", "logit_softcap"):
        del ck["config"]["model"][key]
    torch.save(ck, last)
    rest = train(make_cfg(tmp_path / "runs", "train.max_steps=3"), shards_dir=store, resume=True)
    assert rest["steps"] == 3
    with pytest.raises(XLabError, match="qk_norm False \\(checkpoint\\) vs True"):
        train(make_cfg(tmp_path / "runs", "train.max_steps=4", "model.qk_norm=true"), shards_dir=store, resume=True)


def test_a_checkpoint_from_before_model_config_loads_and_resumes(store, tmp_path):
    """Before 0.7 a checkpoint had no model_config: its config's model section held the store's
    vocab_size and max_len. Such a file still loads (generate, evaluate, export) and resumes."""
    from xlab.checkpoint import load_model

    train(make_cfg(tmp_path / "runs", "train.max_steps=2", "train.eval_every=100"), shards_dir=store)
    last = tmp_path / "runs" / "t" / "checkpoints" / "last.pt"
    ck = load_checkpoint(last)
    mc = ck.pop("model_config")
    ck["config"]["model"] |= {"vocab_size": mc["vocab_size"], "max_len": mc["max_len"]}
    torch.save(ck, last)
    model, cfg, _ = load_model(last)
    assert (model.cfg.vocab_size, model.cfg.max_len) == (300, 16) and "vocab_size" not in cfg.model
    assert train(make_cfg(tmp_path / "runs", "train.max_steps=3"), shards_dir=store, resume=True)["steps"] == 3
    assert load_checkpoint(last)["model_config"] == mc


def test_store_settings_in_the_model_section_are_refused(tmp_path):
    with pytest.raises(XLabError, match=r"model.vocab_size \(-o\) is not a setting: the shard store decides"):
        make_cfg(tmp_path, "model.vocab_size=64")


def test_threads_setting_applies_during_training_only(store, tmp_path, capsys, monkeypatch):
    before = torch.get_num_threads()
    seen = []
    real = xlab.loss.model_loss

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(xlab.loss, "model_loss", spy)
    train(make_cfg(tmp_path / "runs", "train.max_steps=1", "train.threads=2"), shards_dir=store)
    assert seen and set(seen) == {2}
    assert torch.get_num_threads() == before
    out = capsys.readouterr().out
    assert "(2 threads)" in out and "non-embedding" in out


def test_resume_from_a_damaged_checkpoint_is_a_one_line_error(store, tmp_path):
    cfg = make_cfg(tmp_path / "runs", "train.max_steps=2", "train.eval_every=100")
    train(cfg, shards_dir=store)
    last = tmp_path / "runs" / "t" / "checkpoints" / "last.pt"
    good = last.read_bytes()
    ck = torch.load(last, weights_only=True)
    for key in ("optimizer", "loader", "rng"):
        torch.save({k: v for k, v in ck.items() if k != key}, last)
        with pytest.raises(XLabError, match="cannot resume from .*KeyError"):
            train(make_cfg(tmp_path / "runs", "train.max_steps=3"), shards_dir=store, resume=True)
    last.write_bytes(b"hello\n")
    with pytest.raises(XLabError, match="cannot read checkpoint"):
        train(make_cfg(tmp_path / "runs", "train.max_steps=3"), shards_dir=store, resume=True)
    last.write_bytes(good)
    assert train(make_cfg(tmp_path / "runs", "train.max_steps=3"), shards_dir=store, resume=True)["steps"] == 3


def test_settings_the_store_decides_are_taken_from_it_and_said(store, tmp_path, capsys):
    """-o shards.seq_len=64 on a 16-token store used to write seq_len 64 into the saved config."""
    from omegaconf import OmegaConf

    train(make_cfg(tmp_path, "shards.seq_len=64", "train.max_steps=1"), shards_dir=store)
    out = capsys.readouterr().out
    assert "seq_len 64 -> 16 (the shard store's)" in out and "vocab_size 8192 -> 300" in out
    saved = OmegaConf.load(tmp_path / "t" / "config.yaml")
    assert saved.shards.seq_len == 16 and saved.tokenizer.vocab_size == 300


def test_a_store_older_than_its_tokenizer_is_refused(store, tmp_path):
    """After `xlab tokenizer train --force`, the store encoded with the old tokenizer is out of date."""
    tok_dir = tmp_path / "tokenizers"
    tok_dir.mkdir()
    (tok_dir / "store.model").write_bytes(b"a tokenizer trained again since")
    cfg = make_cfg(tmp_path, f"paths.shards_dir={store.parent}", "data.name=store", f"paths.tokenizer_dir={tok_dir}")
    with pytest.raises(XLabError, match="encoded with another tokenizer than .*run `xlab data encode`"):
        train(cfg)


def tensorboard_scalars(tb_dir, tag: str) -> tuple[list, list]:
    """``(steps, values)`` of ``tag`` as TensorBoard shows them (its restart purges applied), and
    the steps of ``tag`` in the raw event files, all files together."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    shown = [(e.step, e.value) for e in acc.Scalars(tag)]
    raw = [
        ev.step
        for f in sorted(tb_dir.glob("events.out.tfevents.*"))
        for ev in EventFileLoader(str(f)).Load()
        if any(v.tag == tag for v in ev.summary.value)
    ]
    return shown, raw


def test_resume_keeps_every_point_and_continues_the_clock(tmp_path):
    store = make_store(tmp_path, n_train=5)
    cfg = make_cfg(tmp_path / "runs", "train.max_steps=8", "train.eval_every=3")
    run = tmp_path / "runs" / "t"
    train(cfg, shards_dir=store, stop_after=4)
    before = read_metrics(run)
    elapsed = load_checkpoint(run / "checkpoints" / "last.pt")["elapsed_s"]
    assert elapsed >= before[-1]["time"] > 0
    train(cfg, shards_dir=store, resume=True)
    recs = read_metrics(run)
    assert [r["step"] for r in recs] == list(range(1, 9))  # every step once
    assert recs[:4] == before  # the points logged before the stop, unchanged
    times = [r["time"] for r in recs]
    assert times == sorted(times) and times[4] >= elapsed  # the clock continues across the resume
    shown, raw = tensorboard_scalars(run / "tb", "train/loss")
    assert [s for s, _ in shown] == raw == list(range(1, 9))
    assert [v for _, v in shown] == pytest.approx([r["loss"] for r in recs], rel=1e-6)
    shown, raw = tensorboard_scalars(run / "tb", "train/time")
    assert [v for _, v in shown] == pytest.approx(times, rel=1e-6)
    shown, raw = tensorboard_scalars(run / "tb", "val/loss")
    assert [s for s, _ in shown] == raw == [3, 6, 8]


def test_a_checkpoint_without_elapsed_seconds_resumes_with_the_clock_at_zero(tmp_path):
    from xlab.checkpoint import save_checkpoint

    store = make_store(tmp_path, n_train=5)
    cfg = make_cfg(tmp_path / "runs", "train.max_steps=4", "train.eval_every=100")
    run = tmp_path / "runs" / "t"
    train(cfg, shards_dir=store, stop_after=2)
    last = run / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    del state["elapsed_s"]  # as XLab wrote checkpoints before it recorded the run's wall time
    save_checkpoint(last, state)
    train(cfg, shards_dir=store, resume=True)
    recs = read_metrics(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert 0 < recs[2]["time"] <= recs[3]["time"]


def test_live_info_text():
    from xlab.train.logger import live_info

    assert live_info(5.12345, 1234.4, None) == "loss 5.1235 | 1,234 tok/s | val n/a"
    assert live_info(0.5, 2e6, 4.25) == "loss 0.5000 | 2,000,000 tok/s | val 4.2500"


def test_the_live_line_shows_steps_throughput_eta_and_the_latest_val_loss(tmp_path):
    import io

    from rich.console import Console

    from xlab.train.logger import RunLogger

    cfg = make_cfg(tmp_path)
    m = {"loss": 4.25, "accuracy": 0.1, "perplexity": 70.1, "bits_per_byte": 1.5, "tokens": 100}

    def line(log) -> str:
        out = io.StringIO()
        Console(file=out, width=200).print(log.progress.make_tasks_table(log.progress.tasks))
        return " ".join(out.getvalue().split())

    with RunLogger(tmp_path / "t", cfg, main=True, total_steps=10) as log:
        log.start_progress(0)
        log.advance(5.0, 1500.0)
        assert "1/10 loss 5.0000 | 1,500 tok/s | val n/a" in line(log)
        log.val_line(1, m)
        log.advance(4.5, 1600.0)
        shown = line(log)
        assert re.search(r"2/10 loss 4\.5000 \| 1,600 tok/s \| val 4\.2500 \| \d+:\d\d:\d\d elapsed, eta", shown)
    # a resumed run shows the latest val loss before the stop until it evaluates again
    with RunLogger(tmp_path / "t", cfg, main=True, total_steps=10, resumed_at=2) as log:
        log.start_progress(2)
        log.advance(4.0, 1700.0)
        assert "3/10 loss 4.0000 | 1,700 tok/s | val 4.2500" in line(log)


def test_cli_threads_flag_sets_the_train_setting_and_is_range_checked(store, tmp_path, cli):
    p = cli(["train", "--shards", store, "--threads", "0", "-o", f"paths.runs_dir={tmp_path}"], tmp_path, check=False)
    assert p.returncode == 2 and "train.threads" in p.stderr and "Traceback" not in p.stderr
    p = cli(
        ["train", "--shards", store, "--threads", "1", "--max-steps", "1", "-o", f"paths.runs_dir={tmp_path}",
         "-o", "model.d_model=32", "-o", "model.n_layers=1", "-o", "model.n_heads=2", "-o", "model.d_ff=64",
         "-o", "train.batch_size=4", "-o", "train.eval_every=100"],
        tmp_path,
    )  # fmt: skip
    assert "(1 thread)" in p.stdout and "threads: 1" in (tmp_path / "demo" / "config.yaml").read_text()


def test_resume_finds_the_runs_own_configuration(store, tmp_path, cli):
    """`xlab train --run-name R --resume` without -c continues with runs/R/config.yaml (it was
    refused: the defaults' model differs from the run's); -o and flags still override it."""
    conf = tmp_path / "tiny.yaml"
    conf.write_text(
        f"paths: {{runs_dir: {tmp_path / 'runs'}}}\nmodel: {{d_model: 32, n_layers: 1, n_heads: 2, d_ff: 64}}\n"
        "train: {batch_size: 4, eval_every: 100, log_every: 1, max_steps: 1, device: cpu}\n"
    )
    cli(["train", "--shards", store, "-c", conf, "--run-name", "r"], tmp_path)
    runs = f"paths.runs_dir={tmp_path / 'runs'}"
    p = cli(["train", "--shards", store, "--run-name", "r", "--resume", "-o", runs, "--max-steps", "2"], tmp_path)
    assert f"settings of {tmp_path / 'runs' / 'r' / 'config.yaml'}" in p.stdout and "steps 1->2 (resumed)" in p.stdout
    ck = load_checkpoint(tmp_path / "runs" / "r" / "checkpoints" / "last.pt")
    assert ck["step"] == 2 and ck["model_config"]["d_model"] == 32 and ck["config"]["train"]["batch_size"] == 4


def test_resume_trains_with_changed_optimizer_settings(store, tmp_path):
    # The checkpoint's param groups hold the old momentum and weight decay; the new ones must win.
    base = ("train.optimizer=muon", "train.eval_every=100")
    train(make_cfg(tmp_path / "runs", "train.max_steps=2", *base), shards_dir=store)
    changed = ("train.muon_momentum=0.5", "train.weight_decay=0.3", "train.muon_lr=0.06")
    train(make_cfg(tmp_path / "runs", "train.max_steps=3", *base, *changed), shards_dir=store, resume=True)
    groups = load_checkpoint(tmp_path / "runs" / "t" / "checkpoints" / "last.pt")["optimizer"]
    muon, adamw = groups["muon"]["param_groups"][0], groups["adamw"]["param_groups"][0]
    assert muon["momentum"] == 0.5 and muon["lr_scale"] == pytest.approx(0.06 / 3e-3)
    assert muon["weight_decay"] == pytest.approx(0.3 * 3e-3 / 0.06)
    assert adamw["weight_decay"] == 0.3


def test_a_signal_during_set_up_leaves_process_settings_untouched(store, tmp_path, monkeypatch):
    # A SIGTERM that lands while torch imports a module mid set-up must surface as Terminated; the
    # clean-up must not call into torch settings it never changed (that call re-imported the
    # half-loaded module and crashed with an AttributeError).
    from xlab.errors import Terminated
    from xlab.train import trainer as trainer_mod

    def set_up(*a, **k):
        raise Terminated

    def untouchable(*a, **k):
        raise AssertionError("use_deterministic_algorithms called although unchanged")

    monkeypatch.setattr(trainer_mod.Trainer, "__init__", set_up)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", untouchable)
    with pytest.raises(Terminated):
        train(make_cfg(tmp_path / "runs", "train.deterministic=false"), shards_dir=store)


def test_the_pipeline_says_which_settings_make_a_run_another_one(store, tmp_path):
    """`xlab pipeline` over a run trained further with -o train.max_steps refused it without saying
    why; it names the settings that differ and the way out."""
    from xlab.commands.pipeline import _train

    as_store = ("shards.seq_len=16", "tokenizer.vocab_size=300")  # what the pipeline's config says of its store
    train(make_cfg(tmp_path / "runs", "train.max_steps=2", "train.eval_every=100", *as_store), shards_dir=store)
    with pytest.raises(XLabError, match=r"other settings \(train.max_steps 2 there, 3 here\).*--force"):
        _train(make_cfg(tmp_path / "runs", "train.max_steps=3", *as_store), force=False)
    # settings that change neither data nor weights do not make another run (threads, evaluation)
    assert _train(make_cfg(tmp_path / "runs", "train.max_steps=2", "train.threads=1", *as_store), force=False) is None
