"""Batches for training: :class:`ShardLoader` deals a store split's rows to data-parallel ranks in a
seeded per-epoch permutation (OLMo's deterministic, resumable data order) and yields
``(inputs, targets)`` tensors, on CUDA through a pinned-memory prefetch thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np

from xlab.errors import XLabError
from xlab.store.format import to_targets
from xlab.store.reader import ShardStore


def make_batch(store: ShardStore, split: str, indices: np.ndarray, vocab_size: Optional[int] = None):
    """``(inputs, targets)`` int64 CPU tensors ``(len(indices), seq_len)`` of rows ``indices`` of
    ``split``: ``inputs = row[:-1]``, ``targets = row[1:]`` with
    :data:`~xlab.store.format.IGNORE_INDEX` at pad positions.

    Raises:
        XLabError: a row holds an id outside ``[0, vocab_size)`` (default the store's), which an
            embedding cannot look up: the store was encoded with a larger vocabulary than
            ``vocab_size`` (another tokenizer: said so), or it is damaged (``xlab data validate``
            finds where).
    """
    import torch

    rows = store.read_rows(split, indices).astype(np.int64)
    limit = store.vocab_size if vocab_size is None else int(vocab_size)
    if rows.size and (int(rows.max()) >= limit or int(rows.min()) < 0):
        idx = np.asarray(indices).reshape(-1)
        where = f"split {split} of shard store {store.path} holds token ids outside 0..{limit - 1}"
        changed = store.changed_since_opened()
        if changed:  # rebuilt under this process (one that does not hold the store for reading)
            raise XLabError(f"{where}: {changed}; rerun the command on the store as it is now")
        if limit < store.vocab_size and int(rows.max()) < store.vocab_size and int(rows.min()) >= 0:
            # ids the store's own vocabulary holds: another tokenizer than the model's, not damage
            raise XLabError(
                f"{where}: it was encoded with a vocabulary of {store.vocab_size}, the model has "
                f"{limit}; pass the store the model was trained on, or train on this one"
            )
        raise XLabError(
            f"{where} (rows {int(idx.min())}..{int(idx.max())}); the store is damaged: run `xlab data validate`, "
            "then `xlab data encode --force`"
        )
    return torch.from_numpy(rows[:, :-1]), torch.from_numpy(to_targets(rows[:, 1:], store.pad_id, store.sos_id))


def document_ids(inputs, sos_id: int):
    """Document index (B, T) int64 of every input position of packed rows ``inputs`` (B, T): the
    number of ``<sos>`` tokens up to and including it, so a row that begins inside an article (its
    tail, continued from the row before) has document 0 there. Non-decreasing along T, as
    :meth:`xlab.model.Transformer.hidden` needs; computed on the inputs' device (no transfer)."""
    return (inputs == sos_id).cumsum(dim=1)


class ShardLoader:
    """Seeded, shuffled, resumable batches of ``(inputs, targets)`` from one split of a store.

    Each epoch ``e`` orders the split's ``N`` rows by ``numpy.random.default_rng([seed, e])
    .permutation(N)`` (store order when ``shuffle=False``); the first
    ``len(self) * batch_size * world_size`` rows of that order are dealt to the ranks round-robin
    (rank ``r`` takes positions ``r, r + world_size, ...``), so ranks read disjoint rows and all get
    ``len(self)`` batches; the incomplete remainder is dropped. The order depends only on
    ``(seed, epoch)``, so ``(epoch, position)`` fully determines what comes next.

    Args:
        store: a :class:`ShardStore`.
        split: split name, e.g. ``"train"``.
        batch_size: rows per batch per rank.
        seed: permutation seed.
        shuffle: permute rows each epoch; False gives store order.
        rank, world_size: this process's rank and the number of data-parallel ranks.
        device: ``"cpu"`` or a CUDA device; on CUDA batches are read by a background prefetch
            thread into pinned memory and copied with non-blocking transfers.
        prefetch: batches the background thread may read ahead.
        background: use the prefetch thread (default: only on CUDA).

    Iterating yields the remaining batches of the current epoch, each ``(inputs, targets)``, both
    ``torch.int64`` of shape ``(batch_size, seq_len)``: ``inputs = row[:-1]``, ``targets = row[1:]``
    with :data:`~xlab.store.format.IGNORE_INDEX` where the target is the pad id (or ``<sos>``: the
    step into the next article of a packed row). After the last batch the epoch advances and the
    position resets to 0. For a ``packed`` split (``self.packed``) the model also needs
    :func:`document_ids` of the inputs, which the tokens themselves give.

    Raises:
        XLabError: unknown split, or a split too small for one batch per rank.
    """

    def __init__(
        self,
        store: ShardStore,
        split: str,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        device: Any = "cpu",
        prefetch: int = 4,
        background: bool | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.store = store
        self.split = split
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.device = device
        self.prefetch = max(1, int(prefetch))
        self.background = _is_cuda(device) if background is None else bool(background)
        self.num_rows = store.rows(split)
        self.packed = store.layout(split) == "packed"
        self._len = self.num_rows // (self.batch_size * self.world_size)
        if self._len == 0:
            raise XLabError(
                f"split {split!r} of {store.path} has {self.num_rows} rows, fewer than one batch of "
                f"{self.batch_size} x {self.world_size} ranks; lower the batch size or encode more data"
            )
        self.epoch = 0
        self.position = 0
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        return self._len

    def state_dict(self) -> dict:
        """``{"epoch", "position", "seed"}``: enough to continue exactly where this loader is."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, d: dict) -> None:
        """Restore :meth:`state_dict` output; the next batch is the one the saved loader would yield."""
        self.epoch = int(d["epoch"])
        self.position = int(d["position"])
        self.seed = int(d.get("seed", self.seed))
        if not 0 <= self.position <= self._len:
            raise ValueError(f"position {self.position} outside [0, {self._len}]")

    def rank_order(self, epoch: int) -> np.ndarray:
        """This rank's row indices for ``epoch``: ``(len(self) * batch_size,)`` int32 (int64 beyond
        2**31 rows)."""
        if self._order_epoch != epoch:
            used = self._len * self.batch_size * self.world_size
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            else:
                perm = np.arange(self.num_rows, dtype=np.int64)
            order = perm[:used][self.rank :: self.world_size]
            # int32 halves the resident order for stores under 2**31 rows (all practical ones)
            self._order = order.astype(np.int32 if self.num_rows < 2**31 else np.int64)
            self._order_epoch = epoch
        return self._order

    def batch_indices(self, epoch: int, position: int) -> np.ndarray:
        """Row indices of batch ``position`` of ``epoch`` for this rank: ``(batch_size,)`` integers."""
        order = self.rank_order(epoch)
        return order[position * self.batch_size : (position + 1) * self.batch_size]

    def make_batch(self, indices: np.ndarray):
        """``(inputs, targets)`` int64 CPU tensors ``(len(indices), seq_len)`` for these rows; see
        :func:`make_batch`."""
        return make_batch(self.store, self.split, indices)

    def _steps(self) -> Iterator[tuple[int, int]]:
        """(epoch, position) of each remaining batch of the current epoch."""
        if self.position >= self._len:  # a loader saved right after its last batch
            self.epoch, self.position = self.epoch + 1, 0
        for p in range(self.position, self._len):
            yield self.epoch, p

    def _advance(self) -> None:
        self.position += 1
        if self.position >= self._len:
            self.epoch, self.position = self.epoch + 1, 0

    def __iter__(self):
        if self.background:
            return self._iter_background()
        return self._iter_plain()

    def _iter_plain(self):
        cuda = _is_cuda(self.device)
        for e, p in list(self._steps()):
            batch = self.make_batch(self.batch_indices(e, p))
            if cuda:  # without the prefetch thread the copy is synchronous (pageable memory)
                batch = (batch[0].to(self.device), batch[1].to(self.device))
            self._advance()  # before yielding, so state_dict() after a batch points at the next one
            yield batch

    def _iter_background(self):
        cuda = _is_cuda(self.device)
        steps = list(self._steps())
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce():
            try:
                for e, p in steps:
                    if stop.is_set():
                        return
                    x, y = self.make_batch(self.batch_indices(e, p))
                    q.put((x.pin_memory(), y.pin_memory()) if cuda else (x, y))
                q.put(None)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer thread
                q.put(exc)

        t = threading.Thread(target=produce, name="xlab-shard-prefetch", daemon=True)
        t.start()
        try:
            for _ in steps:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                x, y = item
                batch = (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)) if cuda else item
                self._advance()
                yield batch
        finally:
            stop.set()
            while t.is_alive():  # drain so a producer blocked on put() can see `stop`
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            t.join()


def _is_cuda(device: Any) -> bool:
    return str(device).startswith("cuda")
