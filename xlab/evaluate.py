"""Evaluation: loss, accuracy, perplexity and bits per byte of a model over a split of a shard store.

Bits per byte makes models with different tokenizers comparable: the total loss of the split in
nats, converted to bits, divided by the UTF-8 bytes of the split's text,
``bpb = loss_nats_per_target * target_tokens / (text_bytes * ln 2)``, with ``target_tokens`` and
``text_bytes`` from the store's manifest. For a partial evaluation (``max_batches``) the mean loss of
the evaluated targets stands for the whole split, i.e. it is scaled by the split's tokens per byte.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from typing import Any, Optional

from xlab.device import autocast_factory, resolve_device
from xlab.errors import XLabError


def split_batches(
    store: Any,
    split: str,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    max_batches: Optional[int] = None,
    device: Any = "cpu",
    vocab_size: Optional[int] = None,
) -> Iterator[tuple[Any, Any]]:
    """Every row of ``split`` in store order, as ``(inputs, targets)`` int64 tensors ``(b, seq_len)``.

    Unlike the training loader the last, incomplete batch is kept, so a whole-split evaluation sees
    every target. Batch ``k`` (of ``ceil(rows / batch_size)``, or the first ``max_batches``) goes to
    rank ``k % world_size``. Targets at pad positions are :data:`~xlab.store.format.IGNORE_INDEX`.
    Every rank gets the same number of batches: a rank whose share is one short ends with a batch of
    one padding row whose targets are all ignored (it adds nothing to the sums), because under FSDP
    each forward pass is a collective (an all-gather per block) that every rank must join.

    Raises:
        XLabError: a row holds a token id ``>= vocab_size`` (default the store's), which the model's
            embedding cannot look up: the store is damaged (``xlab data validate`` finds where).
    """
    import numpy as np

    from xlab.store.loader import make_batch

    n = store.rows(split)
    n_batches = math.ceil(n / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    per_rank = math.ceil(n_batches / world_size)
    for k in range(rank, per_rank * world_size, world_size):
        if k >= n_batches:  # this rank's share is one short: a batch that counts for nothing
            import torch

            from xlab.store.format import IGNORE_INDEX

            inputs = torch.full((1, store.seq_len), store.pad_id, dtype=torch.int64)
            yield inputs.to(device), torch.full_like(inputs, IGNORE_INDEX).to(device)
            continue
        idx = np.arange(k * batch_size, min(n, (k + 1) * batch_size), dtype=np.int64)
        inputs, targets = make_batch(store, split, idx, vocab_size)
        yield inputs.to(device), targets.to(device)


def evaluate(
    model: Any,
    batches: Iterable[tuple[Any, Any]],
    *,
    chunk_tokens: int = 8192,
    autocast: Any = None,
    sos_id: Optional[int] = None,
) -> dict:
    """Summed loss statistics of ``model`` over ``batches``, in evaluation mode and without gradients.

    Args:
        model: a :class:`~xlab.model.Transformer` (or anything with ``hidden`` and ``head``).
        batches: ``(inputs, targets)`` int64 tensors ``(B, T)`` on the model's device; targets equal to
            :data:`~xlab.store.format.IGNORE_INDEX` count for nothing.
        chunk_tokens: positions whose logits are computed at once.
        autocast: a context manager factory for mixed precision (None: full precision).
        sos_id: the batches are packed rows (a ``packed`` split): each row's documents are found from
            its ``<sos>`` tokens and masked apart, as in training (:func:`xlab.store.document_ids`).

    Returns:
        ``{"loss_sum": float (nats), "correct": int, "count": int}`` summed in fp64 over the batches of
        this process (the trainer all-reduces them across processes). The model's train/eval mode is
        restored afterwards.
    """
    import torch

    from xlab.loss import model_loss
    from xlab.store.loader import document_ids

    was_training = model.training
    model.eval()
    loss_sum = 0.0
    correct = 0
    count = 0
    try:
        with torch.no_grad():
            for inputs, targets in batches:
                with autocast() if autocast else nullcontext():
                    if sos_id is None:
                        ls, c, n = model_loss(model, inputs, targets, chunk_tokens)
                    else:
                        doc_ids = document_ids(inputs, sos_id)
                        ls, c, n = model_loss(model, inputs, targets, chunk_tokens, doc_ids=doc_ids)
                loss_sum += float(ls.double())
                correct += int(c)
                count += int(n)
    finally:
        model.train(was_training)
    return {"loss_sum": loss_sum, "correct": correct, "count": count}


def metrics(loss_sum: float, correct: int, count: int, split_info: Optional[dict] = None) -> dict:
    """Loss (nats per target), accuracy, perplexity and bits per byte from summed statistics.

    Args:
        loss_sum, correct, count: as returned by :func:`evaluate` (summed over processes).
        split_info: the store's manifest entry of the split (``target_tokens``, ``text_bytes``); without
            it, or with zero bytes, ``bits_per_byte`` is None.

    Returns:
        ``{"loss", "accuracy", "perplexity", "bits_per_byte", "tokens"}``; with no target at all the
        loss, accuracy and perplexity are NaN.
    """
    if count <= 0:
        nan = float("nan")
        return {"loss": nan, "accuracy": nan, "perplexity": nan, "bits_per_byte": None, "tokens": 0}
    loss = loss_sum / count
    bpb = None
    if split_info and split_info.get("text_bytes") and split_info.get("target_tokens"):
        bpb = loss * float(split_info["target_tokens"]) / (float(split_info["text_bytes"]) * math.log(2))
    return {
        "loss": loss,
        "accuracy": correct / count,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "bits_per_byte": bpb,
        "tokens": count,
    }


def _counted(batches: Iterable[tuple[Any, Any]], bar: Any, task: Any) -> Iterator[tuple[Any, Any]]:
    """``batches``, advancing ``bar`` by a batch's token slots when the next batch is asked for,
    i.e. once the model is done with it."""
    for inputs, targets in batches:
        yield inputs, targets
        bar.advance(task, inputs.numel())


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    split: str = "val",
    shards_dir: Optional[str | os.PathLike] = None,
    device: str = "auto",
    max_batches: Optional[int] = None,
    console: Any = None,
) -> dict:
    """Metrics of a checkpoint or export over a whole split of a shard store (or its first batches).

    Args:
        checkpoint: a training checkpoint ``.pt`` or an export folder.
        split: the store split to evaluate, e.g. ``val`` or ``test``.
        shards_dir: the shard store; default the one the model was trained on.
        device: auto | cpu | cuda | cuda:N.
        max_batches: evaluate only the first N batches (of ``train.batch_size`` rows).
        console: a rich Console to show the pass's progress on (token slots per second and the
            ETA, as the training's tok/s counts them); None shows nothing.

    Returns:
        ``{"loss", "accuracy", "perplexity", "bits_per_byte", "tokens", "split", "checkpoint", "step",
        "batches", "complete", "shards"}`` (loss in nats per target token).

    Raises:
        XLabError: unreadable checkpoint, missing store or split, an empty split, ``max_batches < 1``, a
            damaged store, or a store encoded with another tokenizer than the model's.
    """
    from xlab.checkpoint import load_model_meta, trained_store
    from xlab.store.lock import reading

    if max_batches is not None and max_batches < 1:
        raise XLabError(f"--max-batches must be >= 1, got {max_batches}")
    dev = resolve_device(device)
    model, cfg, tok, meta = load_model_meta(checkpoint, dev)
    if shards_dir is None:
        shards_dir = trained_store(meta, cfg)
    with reading(shards_dir, "evaluate"):  # held to the last batch: the store is never rebuilt under it
        return _evaluate_store(checkpoint, split, shards_dir, dev, max_batches, console, model, cfg, tok, meta)


def _evaluate_store(checkpoint, split, shards_dir, dev, max_batches, console, model, cfg, tok, meta) -> dict:
    """:func:`evaluate_checkpoint` once the model is loaded and the store held."""
    from xlab.progress import unit_progress
    from xlab.store import ShardStore

    store = ShardStore(shards_dir)
    if meta.get("tokenizer_sha256") and store.tokenizer_sha256 != meta["tokenizer_sha256"]:
        raise XLabError(
            f"shard store {store.path} was encoded with another tokenizer than the model's; "
            "pass the --shards the model was trained on"
        )
    info = store.split_info(split)  # an unknown split: XLabError listing the store's splits
    # The checks the trainer runs (shard files present with the manifest's shape and dtype, the tokenizer
    # matching), so that a damaged store is refused here as it is there.
    store.check(tok)
    if int(model.cfg.vocab_size) < store.vocab_size:
        raise XLabError(
            f"shard store {store.path} has a vocabulary of {store.vocab_size}, the model only "
            f"{model.cfg.vocab_size}; pass the --shards the model was trained on"
        )
    n_rows = store.rows(split)
    if n_rows == 0:
        raise XLabError(
            f"split {split} of {store.path} has no rows, nothing to evaluate; choose another "
            f"--split (the store has {', '.join(s for s in store.splits if store.rows(s) > 0)}) "
            "or encode more data"
        )
    batch_size = int(cfg.train.batch_size)
    total_batches = math.ceil(n_rows / batch_size)  # the last batch may be partial: every row counts
    n_batches = total_batches if max_batches is None else min(total_batches, max_batches)
    batches = split_batches(
        store, split, batch_size, max_batches=max_batches, device=dev, vocab_size=int(model.cfg.vocab_size)
    )
    with unit_progress("tokens", console) if console is not None else nullcontext() as bar:
        if bar is not None:
            slots = min(n_rows, n_batches * batch_size) * store.seq_len
            batches = _counted(batches, bar, bar.add_task(f"evaluate {split}", total=slots))
        sums = evaluate(
            model,
            batches,
            chunk_tokens=int(cfg.train.loss_chunk_tokens),
            autocast=autocast_factory(cfg.train.precision, dev),
            sos_id=store.sos_id if store.layout(split) == "packed" else None,
        )
    if sums["count"] == 0:
        raise XLabError(f"split {split} of {store.path} has no target tokens (only padding); nothing to evaluate")
    m = metrics(sums["loss_sum"], sums["correct"], sums["count"], info)
    m.update(
        {
            "split": split,
            "checkpoint": str(checkpoint),
            "step": meta.get("step"),
            "batches": n_batches,
            "complete": n_batches == total_batches,
            "shards": str(store.path),
        }
    )
    return m
