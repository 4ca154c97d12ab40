"""Training on a packed store: the trainer hands the model each row's documents, and a packed run
trains, evaluates on the (padded) val split and resumes exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_helpers import make_cfg, make_store, read_metrics

import xlab.train.trainer as trainer_mod
from xlab.errors import XLabError
from xlab.store import ShardStore, document_ids
from xlab.train import train


def test_the_trainer_passes_the_rows_documents_to_the_model(tmp_path, monkeypatch):
    store = make_store(tmp_path, layout="packed")
    sos = ShardStore(store).sos_id
    seen = []
    real = trainer_mod.xloss.model_loss

    def spy(model, inputs, targets, *a, doc_ids=None, **k):
        if torch.is_grad_enabled():  # training steps, not the evaluation of the (padded) val split
            seen.append((inputs.clone(), doc_ids))
        return real(model, inputs, targets, *a, doc_ids=doc_ids, **k)

    monkeypatch.setattr(trainer_mod.xloss, "model_loss", spy)
    train(make_cfg(tmp_path / "runs", "train.max_steps=2", "train.eval_every=100"), shards_dir=store)
    assert len(seen) == 2
    for inputs, doc_ids in seen:
        assert doc_ids is not None and torch.equal(doc_ids, document_ids(inputs, sos))
        assert int(doc_ids.max()) >= 1  # the rows really hold several articles


def test_a_padded_store_trains_without_document_masks(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    seen = []
    real = trainer_mod.xloss.model_loss

    def spy(model, inputs, targets, *a, doc_ids=None, **k):
        if torch.is_grad_enabled():
            seen.append("no doc_ids" if "doc_ids" not in k and doc_ids is None else doc_ids)
        return real(model, inputs, targets, *a, doc_ids=doc_ids, **k)

    monkeypatch.setattr(trainer_mod.xloss, "model_loss", spy)
    train(make_cfg(tmp_path / "runs", "train.max_steps=1", "train.eval_every=100"), shards_dir=store)
    assert seen == ["no doc_ids"]


def test_packed_training_learns_and_resumes_exactly(tmp_path):
    store = make_store(tmp_path, layout="packed", n_train=60)
    extra = ("train.max_steps=8", "train.eval_every=4", "train.checkpoint_every=3")
    full = train(make_cfg(tmp_path / "one", *extra), shards_dir=store)
    cfg = make_cfg(tmp_path / "two", *extra)
    train(cfg, shards_dir=store, stop_after=5)
    rest = train(cfg, shards_dir=store, resume=True)
    a, b = read_metrics(tmp_path / "one" / "t"), read_metrics(tmp_path / "two" / "t")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert a[-1]["loss"] < a[0]["loss"]
    assert full["val_loss"] == rest["val_loss"] and full["val_loss"] < a[0]["loss"]


def _files(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("other", [{"layout": "packed"}, {"seq_len": 24}])
def test_resume_on_a_store_with_other_rows_is_refused_and_touches_nothing(tmp_path, other):
    first = make_store(tmp_path / "a")
    second = make_store(tmp_path / "b", **other)  # the same texts and tokenizer, other rows
    cfg = make_cfg(tmp_path / "runs", "train.max_steps=3", "train.eval_every=100")
    train(cfg, shards_dir=first)
    before = _files(tmp_path / "runs" / "t")
    want = "layout padded there, packed here" if "layout" in other else "seq len 16 there, 24 here"
    with pytest.raises(XLabError, match=f"trained on another store \\({want}.*\\); resume with --shards {first} "):
        train(make_cfg(tmp_path / "runs", "train.max_steps=6"), shards_dir=second, resume=True)
    assert _files(tmp_path / "runs" / "t") == before


def test_flex_training_on_cpu_is_refused_before_the_run_folder_exists(tmp_path):
    store = make_store(tmp_path)
    with pytest.raises(XLabError, match="flex trains only on CUDA"):
        train(make_cfg(tmp_path / "runs", "model.attention=flex"), shards_dir=store)
    assert not (tmp_path / "runs" / "t").exists()


def test_evaluating_a_packed_split_masks_its_documents(tmp_path):
    from xlab.checkpoint import load_model
    from xlab.evaluate import evaluate_checkpoint
    from xlab.loss import model_loss
    from xlab.store.loader import make_batch

    store_path = make_store(tmp_path, layout="packed", n_train=40)
    train(make_cfg(tmp_path / "runs", "train.max_steps=2", "train.eval_every=100"), shards_dir=store_path)
    ckpt = tmp_path / "runs" / "t" / "checkpoints" / "last.pt"
    got = evaluate_checkpoint(ckpt, split="train", shards_dir=store_path)
    model, _, _ = load_model(ckpt)
    store = ShardStore(store_path)
    x, y = make_batch(store, "train", np.arange(store.rows("train")))
    with torch.no_grad():
        masked, _, n = model_loss(model, x, y, doc_ids=document_ids(x, store.sos_id))
        plain, _, _ = model_loss(model, x, y)
    assert got["loss"] == pytest.approx(masked.item() / int(n), rel=1e-5)
    assert abs(plain.item() - masked.item()) / int(n) > 1e-4  # the mask matters on these rows


def test_a_flash_attn_checkpoint_is_served_by_sdpa_where_flash_attn_cannot_run(tmp_path, capsys):
    from xlab.checkpoint import load_checkpoint, load_model

    store = make_store(tmp_path)
    train(make_cfg(tmp_path / "runs", "train.max_steps=1", "train.eval_every=100"), shards_dir=store)
    src = tmp_path / "runs" / "t" / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(src)
    ckpt["config"]["model"]["attention"] = "flash_attn"  # what a CUDA run with flash-attn saves
    ckpt["model_config"]["attention"] = "flash_attn"
    torch.save(ckpt, tmp_path / "flash.pt")
    model, cfg, _ = load_model(tmp_path / "flash.pt")
    assert cfg.model.attention == "sdpa" and "flash_attn, which cannot run here" in capsys.readouterr().err
    want, _, _ = load_model(src)
    x = torch.randint(3, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(x), want(x))


def test_every_rank_gets_as_many_evaluation_batches_and_the_extra_one_counts_nothing(tmp_path):
    """FSDP's forward is a collective: ranks with unequal shares of the val batches hung."""
    from xlab.evaluate import split_batches
    from xlab.store import IGNORE_INDEX

    store = ShardStore(make_store(tmp_path))
    n = -(-store.rows("val") // 4)
    assert n % 2 == 1  # an odd number of batches of 4 rows: two ranks' shares differ by one
    shares = [list(split_batches(store, "val", 4, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == (n + 1) // 2
    x, y = shares[1][-1]
    assert x.shape == (1, store.seq_len) and (y == IGNORE_INDEX).all()
    real = sum(int((y != IGNORE_INDEX).sum()) for share in shares for _, y in share)
    assert real == store.info.splits["val"].target_tokens
