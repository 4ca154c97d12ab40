"""The training loop: one process, or DistributedDataParallel or FSDP2 (``train.parallel``) under
``torchrun``.

What a step does (``train.grad_accum`` micro-batches per optimizer step, per process):

1. Count the non-pad targets of all the step's micro-batches and sum the count over processes.
2. For each micro-batch, the summed token loss (nats) divided by that global count is
   back-propagated (times the number of processes, because DDP averages gradients). The step's
   gradient is therefore that of the mean loss over every non-pad target of the step, whatever the
   accumulation or the number of processes, and a micro-batch of padding contributes exactly 0.
   Gradient all-reduce runs only on the last micro-batch (``no_sync`` on the others). FSDP2
   (:mod:`xlab.train.parallel`) averages over ranks the same way and reduce-scatters only on the
   last micro-batch too (``set_requires_gradient_sync``).
3. Clip the gradient norm, set the learning rate from the schedule (a function of the step only),
   take an AdamW step (weight decay on matrices only, not on biases, norms or embeddings).

Logits are never materialised for a whole batch: the loss is fused with the output head
(:mod:`xlab.loss`). Loss and accuracy sums are kept in fp64.

Run folder ``runs/<run_name>/``: ``config.yaml`` (the configuration in force), ``metrics.jsonl``,
TensorBoard event files in ``tb/``, and ``checkpoints/last.pt`` plus ``best-*.pt`` (the best
``keep_best`` by validation loss). Only rank 0 writes. A checkpoint is written atomically every
``checkpoint_every`` steps, at the end, and on Ctrl-C (after the step in progress; a second Ctrl-C
stops at once without saving). ``resume=True`` continues from ``last.pt`` exactly: the same losses
and, with ``train.deterministic``, bit-identical weights to an uninterrupted run. Under DDP the
checkpoint also holds every rank's torch random state (dropout), restored when resuming with the
same number of processes.
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig

from xlab import distributed as xdist
from xlab import loss as xloss
from xlab.attention import refuse_flex_training
from xlab.checkpoint import build_model, rng_state, tokenizer_bytes_tensor
from xlab.config import ModelConfig, Parallel, from_dict, stage_paths, to_dict
from xlab.device import autocast_factory, resolve_device
from xlab.distributed import DistInfo, all_reduce_sum
from xlab.errors import XLabError, first_line
from xlab.evaluate import evaluate, metrics, split_batches
from xlab.fsio import exclusive_lock, lock_path
from xlab.store import IGNORE_INDEX, ShardLoader, ShardStore, document_ids
from xlab.store.lock import reading
from xlab.train.keeper import CheckpointKeeper
from xlab.train.logger import LogWindow, RunLogger
from xlab.train.mfu import mfu, peak_flops
from xlab.train.optim import build_optimizer, load_optimizer_state
from xlab.train.parallel import (
    fsdp_wrap,
    full_model_state,
    full_norm,
    full_optimizer_state,
    load_full_model_state,
    shard_optimizer_state,
)
from xlab.train.resume import check_store, reconcile, start_checkpoint, store_record, take_store_settings
from xlab.train.schedule import lr_at, momentum_at
from xlab.train.signals import Interrupt


class LossModule(nn.Module):
    """The summed chunked loss of ``model`` as one module's forward, so DDP and torch.compile wrap it
    whole: DDP's gradient hooks are armed by its ``forward``, and the loss calls ``model.hidden`` and
    the fused head directly. ``forward(inputs, targets)`` returns :func:`xlab.loss.model_loss`.

    ``sos_id``: the rows are packed (``shards.layout=packed``); each input row's documents are found
    from its ``<sos>`` tokens (:func:`xlab.store.document_ids`, on the device) and masked apart."""

    def __init__(self, model: nn.Module, chunk_tokens: int, sos_id: Optional[int] = None):
        super().__init__()
        self.model, self.chunk_tokens, self.sos_id = model, chunk_tokens, sos_id

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor):
        if self.sos_id is None:
            return xloss.model_loss(self.model, inputs, targets, self.chunk_tokens)
        doc_ids = document_ids(inputs, self.sos_id)
        return xloss.model_loss(self.model, inputs, targets, self.chunk_tokens, doc_ids=doc_ids)


def train(
    cfg: DictConfig,
    shards_dir: Optional[str | os.PathLike] = None,
    resume: bool = False,
    *,
    stop_after: Optional[int] = None,
) -> dict:
    """Train ``cfg.model`` on the shard store; the function behind ``xlab train``.

    Args:
        cfg: the XLab configuration (``train`` and ``model`` sections are used; the model's
            ``vocab_size`` and ``max_len`` are the store's: :meth:`~xlab.config.ModelConfig.of`).
        shards_dir: the shard store folder; default ``shards/<data.name>``.
        resume: continue from ``runs/<run_name>/checkpoints/last.pt``. The model section then comes
            from the checkpoint; the train section from ``cfg`` (e.g. to extend ``max_steps``).
        stop_after: stop as Ctrl-C would (save ``last.pt``, return with ``interrupted: True``) once
            this many optimizer steps are done in total; for time-boxed jobs and tests.

    Returns:
        Summary: ``steps``, ``total_steps``, ``train_loss`` (mean over the last logging window),
        ``val_loss``, ``val_accuracy``, ``val_perplexity``, ``val_bits_per_byte``, ``tokens``,
        ``seconds``, ``tokens_per_s``, ``mfu``, ``interrupted``, ``run_dir``, ``last_checkpoint``.

    Raises:
        XLabError: missing or mismatched store; a fresh run over a run folder that has checkpoints
            (pass ``--resume`` or another ``--run-name``); ``--resume`` without ``last.pt``; a NaN or
            infinite loss (the last good checkpoint stays as it was).
        KeyboardInterrupt: after Ctrl-C, once ``last.pt`` is saved (the CLI exits with code 130).
        Terminated: after SIGTERM, once ``last.pt`` is saved (the CLI exits with code 143).
    """
    info = xdist.dist_info()
    xdist.die_with_launcher()  # a SIGKILLed torchrun takes its ranks along: no orphan keeps the run's lock
    device = resolve_device(cfg.train.device, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and the default CUDA stream follow the current device
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    threads_before = torch.get_num_threads()
    if cfg.train.threads is not None:
        # On a small machine shared with other work, fewer threads than cores can train faster.
        torch.set_num_threads(int(cfg.train.threads))
    xdist.init(info, device)
    run_dir = stage_paths(cfg).run
    # One writer per run folder: rank 0 holds the lock (the other ranks write nothing).
    lock = exclusive_lock(lock_path(run_dir), f"run {run_dir}") if info.is_main else nullcontext()
    try:
        # Every rank holds the store for reading while it trains: no rebuild swaps it under the run.
        with lock, reading(shards_dir if shards_dir is not None else stage_paths(cfg).shards, "train"):
            summary = Trainer(cfg, shards_dir, resume, info, device).run(stop_after)
        # Rank 0 finishes last (it saves); a rank that tears its gloo group down while a peer is
        # still busy can abort at exit, so all leave together.
        xdist.barrier()
        return summary
    finally:
        xdist.destroy()
        # Process-wide: leave it as found, but only touch it if it changed: a signal that lands while
        # torch is still importing a module leaves that import half done, and this call would import it
        # again and crash instead of letting the signal's exit through.
        if torch.are_deterministic_algorithms_enabled() != deterministic_before:
            torch.use_deterministic_algorithms(deterministic_before)
        if torch.get_num_threads() != threads_before:
            torch.set_num_threads(threads_before)


class Trainer:
    """One training run: the store, model, optimizer, loader and checkpoint keeper, set up from
    ``cfg`` (fresh, or from ``last.pt`` with ``resume``); :meth:`run` is the loop. :func:`train` is the
    entry point that also sets up and tears down the process group.

    Raises:
        XLabError: as :func:`train`, at construction.
    """

    def __init__(
        self,
        cfg: DictConfig,
        shards_dir: Optional[str | os.PathLike],
        resume: bool,
        info: DistInfo,
        device: torch.device,
    ) -> None:
        self.info, self.device = info, device
        paths = stage_paths(cfg)
        self.store = ShardStore(shards_dir if shards_dir is not None else paths.shards)
        # The store judges itself; by default it must also match the pipeline's tokenizer file, which
        # `xlab tokenizer train --force` may have replaced since the store was encoded.
        self.store.check(tokenizer_file=paths.tokenizer if shards_dir is None else None)
        self.tok_bytes = self.store.tokenizer_bytes()
        self.tok_sha = self.store.tokenizer_sha256
        if info.is_main:  # one sequential read of the store: a changed byte or count is caught before training
            self.store.verify()

        self.run_dir = paths.run
        self.keeper = CheckpointKeeper(self.run_dir / "checkpoints", cfg.train.keep_best, info, device)
        self.ckpt = start_checkpoint(self.keeper.dir, resume, self.tok_sha, self.store.path)
        check_store(self.ckpt, self.store, self.keeper.dir / "last.pt")
        self.changed = reconcile(cfg, self.ckpt, self.run_dir)
        self.cfg = from_dict(to_dict(cfg))  # the caller's configuration stays as it was
        self.notes = take_store_settings(
            self.cfg, seq_len=self.store.seq_len, vocab_size=self.store.vocab_size, layout=self.store.layout("train")
        )
        # The one place the model's configuration is made: the user's model section and the store.
        self.model_config = ModelConfig.of(self.cfg.model, vocab_size=self.store.vocab_size, max_len=self.store.seq_len)
        if self.cfg.model.attention == "flex":  # refused before the run folder exists
            refuse_flex_training(device)
        t = self.cfg.train
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        # The same seed on every rank gives the same initial weights (DDP also broadcasts rank 0's).
        torch.manual_seed(t.seed)
        self.model = build_model(self.model_config).to(device)
        self.autocast = autocast_factory(t.precision, device)
        # FSDP replaces the parameters by their shards: the optimizer is built over those.
        self.fsdp = info.distributed and Parallel.parse(t.parallel, "train.parallel") == Parallel.fsdp
        if self.fsdp:
            fsdp_wrap(self.model, device, bf16=self.autocast is not None)
        self.optimizer = build_optimizer(self.model, t, device)
        self.loader = ShardLoader(
            self.store,
            "train",
            t.batch_size,
            seed=t.seed,
            shuffle=True,
            rank=info.rank,
            world_size=info.world_size,
            device=device,
        )
        steps_per_epoch = len(self.loader) // t.grad_accum
        self.total_steps = int(t.max_steps) if t.max_steps is not None else int(t.epochs) * steps_per_epoch
        if self.total_steps <= 0:
            raise XLabError(
                f"no optimizer step to take: {len(self.loader)} batches per epoch for grad_accum "
                f"{t.grad_accum}; lower train.batch_size or train.grad_accum, or encode more data"
            )
        self.step = 0
        self.window = LogWindow()
        # Wall seconds of the sessions before this one (a resume continues the run's clock).
        self.elapsed_before = 0.0
        self._session_start: Optional[float] = None
        # Dropout differs per rank (different data, different masks), from a seed that resume restores.
        torch.manual_seed(t.seed + 1000003 * info.rank)
        random.seed(t.seed + info.rank)
        np.random.seed((t.seed + info.rank) % 2**32)
        if self.ckpt is not None:
            self._restore(self.ckpt)

        sos_id = self.store.sos_id if self.loader.packed else None
        loss_module: nn.Module = LossModule(self.model, int(t.loss_chunk_tokens), sos_id)
        self.ddp = None
        if info.distributed and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(loss_module, device_ids=[device.index] if device.type == "cuda" else None)
            loss_module = self.ddp
        self.loss_module = torch.compile(loss_module) if t.compile else loss_module
        self.flops_per_token = float(self.model.flops_per_token(self.store.seq_len))
        self.has_val = "val" in self.store.splits and self.store.rows("val") > 0

    # ----------------------------------------------------------------------------- state
    def state(self, rank_rng: Optional[list] = None) -> dict:
        """The training checkpoint's contents: the keys :mod:`xlab.checkpoint` documents, plus
        ``elapsed_s`` (the run's wall seconds so far, so a resumed run's ``time`` continues).
        Under FSDP a collective (every rank calls it; the whole state is on rank 0)."""
        if self.fsdp:
            model, optimizer = full_model_state(self.model), full_optimizer_state(self.optimizer)
        else:
            model, optimizer = self.model.state_dict(), self.optimizer.state_dict()
        return {
            "model": model,
            "optimizer": optimizer,
            "step": self.step,
            "total_steps": self.total_steps,
            "loader": self.loader.state_dict(),
            "rng": rng_state(),
            "config": to_dict(self.cfg),
            "model_config": self.model_config.to_dict(),
            "tokenizer": tokenizer_bytes_tensor(self.tok_bytes),
            "tokenizer_sha256": self.tok_sha,
            "shards": str(self.store.path),
            "store": store_record(self.store),
            "best": list(self.keeper.best),
            "rank_rng": rank_rng or [],
            "log_window": self.window.state_dict(),
            "elapsed_s": self.elapsed_s(),
        }

    def elapsed_s(self) -> float:
        """Wall seconds since the run's start: earlier sessions (before a resume) plus this one."""
        now = time.perf_counter() - self._session_start if self._session_start is not None else 0.0
        return self.elapsed_before + now

    def _restore(self, ckpt: dict) -> None:
        try:
            if self.fsdp:
                load_full_model_state(self.model, ckpt["model"])
            else:
                self.model.load_state_dict(ckpt["model"])
            opt = shard_optimizer_state(self.optimizer, ckpt["optimizer"]) if self.fsdp else ckpt["optimizer"]
            load_optimizer_state(self.optimizer, opt, {id(p): n for n, p in self.model.named_parameters()})
            self.step = int(ckpt["step"])
            self.loader.load_state_dict(ckpt["loader"])
            self.keeper.restore_best(ckpt.get("best", []))
            self.window.load_state_dict(ckpt.get("log_window"))
            self.elapsed_before = float(ckpt.get("elapsed_s", 0.0))  # absent before XLab recorded it
            self.keeper.restore_rng(ckpt)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
            raise XLabError(
                f"cannot resume from {self.keeper.dir / 'last.pt'}: its training state is incomplete "
                f"or damaged ({type(e).__name__}: {first_line(e, 200)})"
            ) from None

    # -------------------------------------------------------------------------- one step
    def micro_batches(self):
        """Micro-batches forever, epoch after epoch; the loader's state always points at the next one."""
        while True:
            yield from self.loader

    def train_step(self, micro: list, stop_flag: bool = False) -> dict:
        """One optimizer step over ``micro`` (this process's ``grad_accum`` micro-batches, each
        ``(inputs, targets)`` int64 ``(batch_size, seq_len)``).

        Returns ``{"loss_sum", "correct", "count", "grad_norm", "lr", "stop"}``, sums over all processes.

        Raises:
            XLabError: a non-finite loss or gradient norm (before the weights are touched).
        """
        t = self.cfg.train
        dev = self.device
        # Built on the device without a host sync, so CUDA keeps running ahead of Python.
        count = torch.stack([(y != IGNORE_INDEX).sum() for _, y in micro]).sum().double()
        head = torch.stack([count, torch.tensor(float(stop_flag), dtype=torch.float64, device=dev)])
        all_reduce_sum(head)
        scale = (self.info.world_size / head[0].clamp(min=1.0)).float()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.float64, device=dev)
        for i, (x, y) in enumerate(micro):
            sync = self.ddp is None or i == len(micro) - 1
            if self.fsdp:
                self.model.set_requires_gradient_sync(i == len(micro) - 1)
            with nullcontext() if sync else self.ddp.no_sync(), self.autocast() if self.autocast else nullcontext():
                ls, c, _ = self.loss_module(x, y)
            (ls * scale).backward()
            loss_sum += ls.detach().double()
            correct += c.double()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = float(t.grad_clip) if t.grad_clip and t.grad_clip > 0 else float("inf")
        grad_norm = full_norm(torch.nn.utils.clip_grad_norm_(params, max_norm))
        stats = torch.stack([loss_sum, correct, grad_norm.double().to(dev)])
        all_reduce_sum(stats[:2])
        loss_sum_v, correct_v, gn = (float(v) for v in stats.tolist())
        global_count, stop = (float(v) for v in head.tolist())
        if not (math.isfinite(loss_sum_v) and math.isfinite(gn)):
            self.optimizer.zero_grad(set_to_none=True)
            what = "loss" if not math.isfinite(loss_sum_v) else "gradient norm"
            raise XLabError(
                f"non-finite {what} at step {self.step + 1}; stopped, the last checkpoint in "
                f"{self.keeper.dir} is untouched (lower train.lr or check the data)"
            )
        lr = lr_at(
            self.step,
            lr=t.lr,
            total_steps=self.total_steps,
            warmup_steps=t.warmup_steps,
            schedule=t.lr_schedule,
            min_lr_ratio=t.min_lr_ratio,
            decay_fraction=t.decay_fraction,
        )
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)  # Muon's group runs at muon_lr / lr times AdamW's
        if t.muon_momentum_warmup_steps and hasattr(self.optimizer, "muon"):
            m = momentum_at(self.step, momentum=t.muon_momentum, start=t.muon_momentum_start,
                            warmup_steps=t.muon_momentum_warmup_steps)  # fmt: skip
            for g in self.optimizer.muon.param_groups:
                g["momentum"] = m
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {
            "loss_sum": loss_sum_v,
            "correct": correct_v,
            "count": global_count,
            "grad_norm": gn,
            "lr": lr,
            "stop": stop > 0,
        }

    def evaluate_val(self) -> Optional[dict]:
        """Validation metrics (:func:`xlab.evaluate.metrics`) over the first ``eval_batches`` batches of
        val, the work shared by all ranks; None when the store has no val rows."""
        if not self.has_val:
            return None
        t = self.cfg.train
        batches = split_batches(
            self.store,
            "val",
            t.batch_size,
            rank=self.info.rank,
            world_size=self.info.world_size,
            max_batches=t.eval_batches,
            device=self.device,
            vocab_size=self.model_config.vocab_size,
        )
        s = evaluate(self.model, batches, chunk_tokens=int(t.loss_chunk_tokens), autocast=self.autocast)
        v = torch.tensor([s["loss_sum"], s["correct"], s["count"]], dtype=torch.float64, device=self.device)
        all_reduce_sum(v)
        loss_sum, correct, count = v.tolist()
        return metrics(loss_sum, int(correct), int(count), self.store.split_info("val"))

    # ------------------------------------------------------------------------------- run
    def run(self, stop_after: Optional[int] = None) -> dict:
        """Train to ``total_steps`` (or ``stop_after``, or Ctrl-C); return the summary of :func:`train`.

        Raises:
            XLabError: a non-finite loss (see :meth:`train_step`).
            KeyboardInterrupt: after Ctrl-C, once ``last.pt`` is saved.
        """
        t, info = self.cfg.train, self.info
        resumed_at = self.step if self.ckpt is not None else None
        log = RunLogger(self.run_dir, self.cfg, main=info.is_main, total_steps=self.total_steps, resumed_at=resumed_at)
        log.header(self)
        peak = peak_flops(self.device)
        tokens_per_step = t.batch_size * t.grad_accum * info.world_size * self.store.seq_len
        last_val, last_train_loss, last_mfu, last_ckpt = None, float("nan"), None, None
        interrupted = signalled = False
        t_start, start_step = time.perf_counter(), self.step
        self._session_start = t_start
        train_seconds = 0.0  # time in training steps only (not evaluation or saving)
        micro_iter = self.micro_batches()
        self.model.train()
        with Interrupt() as intr, log:
            log.start_progress(self.step)
            while self.step < self.total_steps:
                t_step = time.perf_counter()
                r = self.train_step([next(micro_iter) for _ in range(t.grad_accum)], stop_flag=intr.requested)
                dt = time.perf_counter() - t_step
                train_seconds += dt
                self.window.add(r, dt)
                log.advance(r["loss_sum"] / max(r["count"], 1), self.window.tokens_per_s(tokens_per_step))
                at_end = self.step == self.total_steps
                if self.step % t.log_every == 0 or at_end:
                    w, tps = self.window, self.window.tokens_per_s(tokens_per_step)
                    last_mfu, last_train_loss = mfu(self.flops_per_token, tps, peak), w.mean_loss()
                    log.train_line({"step": self.step, "loss": last_train_loss, "accuracy": w.correct / max(w.count, 1),
                                    "lr": r["lr"], "grad_norm": r["grad_norm"], "tokens_per_s": tps,
                                    "gflops": self.flops_per_token * tps / 1e9, "mfu": last_mfu,
                                    "time": round(self.elapsed_s(), 3)})  # fmt: skip
                    self.window = LogWindow()
                stop = r["stop"] or (stop_after is not None and self.step >= stop_after)
                best_name, dropped = None, []
                if (self.step % t.eval_every == 0 or at_end) and not stop:
                    m = self.evaluate_val()
                    if m is not None:
                        last_val = m
                        log.val_line(self.step, m)
                        best_name, dropped = self.keeper.rank(self.step, m["loss"])
                if self.step % t.checkpoint_every == 0 or at_end or stop or best_name:
                    rank_rng = self.keeper.gather_rank_rng()  # collective: every rank takes part
                    state = self.state(rank_rng)  # so is gathering the shards under FSDP
                    if info.is_main:
                        last_ckpt = self.keeper.save(state, best_name, dropped)
                if stop:
                    interrupted, signalled = True, r["stop"]
                    break
        done_tokens = (self.step - start_step) * tokens_per_step
        v = last_val or {}
        summary = {
            "steps": self.step, "total_steps": self.total_steps, "train_loss": last_train_loss,
            "val_loss": v.get("loss"), "val_accuracy": v.get("accuracy"), "val_perplexity": v.get("perplexity"),
            "val_bits_per_byte": v.get("bits_per_byte"), "tokens": done_tokens,
            "seconds": time.perf_counter() - t_start, "mfu": last_mfu,
            "tokens_per_s": done_tokens / train_seconds if train_seconds > 0 else None,
            "interrupted": interrupted, "run_dir": str(self.run_dir),
            "last_checkpoint": str(last_ckpt) if last_ckpt else None,
        }  # fmt: skip
        log.closing(summary, start_step)
        if signalled:
            intr.raise_stop()
        return summary
