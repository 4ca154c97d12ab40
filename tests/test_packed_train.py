"""Training on a packed store: the trainer hands the model each row's documents, and a packed run
trains, evaluates on the (padded) val split and resumes exactly."""

from __future__ import annotations

import torch
from train_helpers import make_cfg, make_store, read_metrics

import xlab.train.trainer as trainer_mod
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
