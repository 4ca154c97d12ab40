"""The training loop: one process, or DistributedDataParallel under ``torchrun``.

What a step does (``train.grad_accum`` micro-batches per optimizer step, per process):

1. Count the non-pad targets of all the step's micro-batches and sum the count over processes.
2. For each micro-batch, the summed token loss (nats) divided by that global count is
   back-propagated (times the number of processes, because DDP averages gradients). The step's
   gradient is therefore that of the mean loss over every non-pad target of the step, whatever the
   accumulation or the number of processes, and a micro-batch of padding contributes exactly 0.
   Gradient all-reduce runs only on the last micro-batch (``no_sync`` on the others).
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

import json
import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

from xlab.errors import XLabError

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------- schedule
def lr_at(step: int, *, lr: float, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
          min_lr_ratio: float = 0.1) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Linear warmup from ``lr / warmup_steps`` to ``lr`` over the first ``warmup_steps`` steps, then
    ``constant``, or ``cosine`` decay to ``min_lr_ratio * lr`` at ``total_steps`` (and held there).
    The schedule depends on the configured total, never on where a run stops, so a resumed run
    follows the same curve.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    floor = lr * min_lr_ratio
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# -------------------------------------------------------------------------------- optimizer
def param_groups(model: Any, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay on weight matrices, none on biases, norms and embeddings.

    A parameter decays when it has two or more dimensions and does not belong to an ``nn.Embedding``
    (a tied output head shares the embedding's tensor and so does not decay either).
    """
    import torch.nn as nn

    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in emb else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _make_loss_module(model: Any, chunk_tokens: int):
    """An ``nn.Module`` whose forward is the summed chunked loss, so DDP and torch.compile wrap it whole.

    DDP's gradient hooks are armed by its ``forward``; the loss calls ``model.hidden`` and the fused
    head directly, so the whole computation must sit in one module's forward.
    """
    import torch.nn as nn

    from xlab.loss import model_loss

    class LossModule(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m

        def forward(self, inputs, targets):
            return model_loss(self.model, inputs, targets, chunk_tokens)

    return LossModule(model)


# ---------------------------------------------------------------------------------- helpers
def _empty_window() -> dict:
    """Sums of the train steps since the last log line (loss in nats, targets, seconds)."""
    return {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "steps": 0, "seconds": 0.0}


def _jsonl_truncate(path: Path, max_step: int) -> None:
    """Keep only the records of ``metrics.jsonl`` up to ``max_step`` (a resumed run rewrites the rest)."""
    from xlab.io import atomic_write_text

    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    atomic_write_text(path, "".join(k + "\n" for k in keep))


class _Interrupt:
    """First Ctrl-C: finish the step, save, stop. Second Ctrl-C: the default KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def _fmt(x: Optional[float], spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


# ------------------------------------------------------------------------------------- train
def train(cfg: Any, shards_dir: Optional[str | os.PathLike] = None, resume: bool = False, *,
          stop_after: Optional[int] = None) -> dict:
    """Train ``cfg.model`` on the shard store; the function behind ``xlab train``.

    Args:
        cfg: the XLab configuration (``train`` and ``model`` sections are used; ``model.vocab_size``
            and ``model.max_len`` are set from the store).
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
    """
    from xlab import distributed as xdist

    info = xdist.dist_info()
    from xlab.device import resolve_device

    device = resolve_device(cfg.train.device, info.local_rank)
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)  # NCCL and the default CUDA stream follow the current device
    import torch

    deterministic_before = torch.are_deterministic_algorithms_enabled()
    xdist.init(info, device)
    try:
        summary = _Trainer(cfg, shards_dir, resume, info, device).run(stop_after)
        # Rank 0 finishes last (it saves); a rank that tears its gloo group down while a peer is
        # still busy can abort at exit, so all leave together.
        xdist.barrier()
        return summary
    finally:
        xdist.destroy()
        torch.use_deterministic_algorithms(deterministic_before)  # process-wide: leave it as found


class _Trainer:
    """State of one training run; :func:`train` is the entry point."""

    def __init__(self, cfg: Any, shards_dir, resume: bool, info, device) -> None:
        import random

        import numpy as np
        import torch

        from xlab.checkpoint import build_model, load_checkpoint
        from xlab.config import from_dict, stage_paths, to_dict
        from xlab.device import autocast_factory
        from xlab.io import sha256_bytes
        from xlab.shards import ShardLoader, ShardStore

        self.info, self.device = info, device
        paths = stage_paths(cfg)
        self.store = ShardStore(shards_dir if shards_dir is not None else paths.shards)
        self.store.check()
        tok_path = self.store.tokenizer_path
        if tok_path is None:
            raise XLabError(f"the tokenizer of shard store {self.store.path} is missing; run `xlab data encode --force`")
        self.tok_bytes = tok_path.read_bytes()
        self.tok_sha = sha256_bytes(self.tok_bytes)
        if self.tok_sha != self.store.tokenizer_sha256:
            raise XLabError(f"tokenizer {tok_path} does not match shard store {self.store.path}; "
                            "run `xlab data encode --force`")

        self.run_dir = paths.run
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.ckpt = None
        if resume:
            last = self.ckpt_dir / "last.pt"
            if not last.is_file():
                raise XLabError(f"nothing to resume: {last} does not exist; drop --resume to start a new run")
            self.ckpt = load_checkpoint(last)
            if self.ckpt.get("tokenizer_sha256") != self.tok_sha:
                raise XLabError(f"{last} was trained on a store with another tokenizer than {self.store.path}")
        elif self.ckpt_dir.is_dir() and any(self.ckpt_dir.glob("*.pt")):
            raise XLabError(f"run folder {self.run_dir} already has checkpoints; pass --resume to continue it "
                            "or --run-name to start a new run")

        # The configuration in force: the model's vocabulary and length come from the store.
        cfg = from_dict(to_dict(cfg))
        cfg.model.vocab_size = self.store.vocab_size
        cfg.model.max_len = self.store.seq_len
        if self.ckpt is not None:  # the architecture is the checkpoint's: it cannot change mid-run
            d = to_dict(cfg)
            saved = dict(self.ckpt["config"]["model"])
            asked = d["model"]
            differ = sorted(k for k in set(saved) | set(asked)
                            if k not in ("vocab_size", "max_len") and saved.get(k) != asked.get(k))
            if differ:
                what = ", ".join(f"{k} {saved.get(k)!r} (checkpoint) vs {asked.get(k)!r} (asked)" for k in differ)
                raise XLabError(f"model settings cannot change on --resume: {what}; resume with the run's "
                                f"settings ({self.run_dir / 'config.yaml'}) or start a new run with --run-name")
            d["model"] = saved
            cfg = from_dict(d)
        self.cfg = cfg
        t = cfg.train
        # Train settings may change on resume (e.g. a larger max_steps); say which ones did.
        self.changed = []
        if self.ckpt is not None:
            old = self.ckpt["config"].get("train", {})
            self.changed = [f"{k} {old.get(k)!r}->{v!r}" for k, v in to_dict(cfg)["train"].items()
                            if k in old and old[k] != v]

        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        # The same seed on every rank gives the same initial weights (DDP also broadcasts rank 0's).
        torch.manual_seed(t.seed)
        self.model = build_model(cfg).to(device)
        self.raw_model = self.model
        self.optimizer = torch.optim.AdamW(param_groups(self.model, t.weight_decay), lr=t.lr,
                                           betas=(t.beta1, t.beta2), **self._adamw_impl())
        self.loader = ShardLoader(self.store, "train", t.batch_size, seed=t.seed, shuffle=True,
                                  rank=info.rank, world_size=info.world_size, device=device)
        steps_per_epoch = len(self.loader) // t.grad_accum
        self.total_steps = int(t.max_steps) if t.max_steps is not None else int(t.epochs) * steps_per_epoch
        if self.total_steps <= 0:
            raise XLabError(f"no optimizer step to take: {len(self.loader)} batches per epoch for grad_accum "
                            f"{t.grad_accum}; lower train.batch_size or train.grad_accum, or encode more data")
        self.step = 0
        self.best: list[dict] = []
        # Sums over the steps since the last train log line; saved in checkpoints so that a resumed
        # run logs the same train loss and accuracy as an uninterrupted one.
        self.win = _empty_window()
        # Dropout differs per rank (different data, different masks), from a seed that resume restores.
        torch.manual_seed(t.seed + 1000003 * info.rank)
        random.seed(t.seed + info.rank)
        np.random.seed((t.seed + info.rank) % 2**32)
        if self.ckpt is not None:
            try:
                self._restore(self.ckpt)
            except XLabError:
                raise
            except Exception as e:  # noqa: BLE001 - a checkpoint missing or mangling optimizer/loader/rng state
                text = str(e).strip()
                raise XLabError(f"cannot resume from {self.ckpt_dir / 'last.pt'}: its training state is incomplete "
                                f"or damaged ({type(e).__name__}: {text.splitlines()[0][:200] if text else ''})"
                                ) from None

        loss_module = _make_loss_module(self.model, int(t.loss_chunk_tokens))
        self.ddp = None
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(loss_module, device_ids=[device.index] if device.type == "cuda" else None)
            loss_module = self.ddp
        if t.compile:
            loss_module = torch.compile(loss_module)
        self.loss_module = loss_module
        self.autocast = autocast_factory(t.precision, device)
        self.flops_per_token = float(self.raw_model.flops_per_token(self.store.seq_len))
        self.has_val = "val" in self.store.splits and self.store.rows("val") > 0
        self.to_dict = to_dict

    def _adamw_impl(self) -> dict:
        """The fused AdamW kernel where torch has one for the device (CUDA, and CPU since torch 2.4)."""
        import torch

        try:
            torch.optim.AdamW([torch.zeros(1, device=self.device, requires_grad=True)], fused=True)
            return {"fused": True}
        except (RuntimeError, TypeError, ValueError):
            return {}

    # ----------------------------------------------------------------------------- state
    def _gather_rank_rng(self) -> Optional[list]:
        """Every rank's torch random state (CPU, and CUDA on CUDA), gathered to all ranks; None in one process.

        Collective: every rank must call it at the same step.
        """
        if not self.info.distributed:
            return None
        import torch
        import torch.distributed as dist

        on = self.device if self.device.type == "cuda" else torch.device("cpu")  # NCCL needs CUDA tensors
        states = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        out: list[dict] = [{} for _ in range(self.info.world_size)]
        for key, st in states.items():
            parts = [torch.empty_like(st, device=on) for _ in range(self.info.world_size)]
            dist.all_gather(parts, st.to(on))
            for r, part in enumerate(parts):
                out[r][key] = part.cpu()
        return out

    def _state(self, rank_rng: Optional[list] = None) -> dict:
        from xlab.checkpoint import rng_state, tokenizer_bytes_tensor

        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "total_steps": self.total_steps,
            "loader": self.loader.state_dict(),
            "rng": rng_state(),
            "config": self.to_dict(self.cfg),
            "tokenizer": tokenizer_bytes_tensor(self.tok_bytes),
            "tokenizer_sha256": self.tok_sha,
            "shards": str(self.store.path),
            "best": list(self.best),
            "rank_rng": rank_rng or [],
            "log_window": {k: (int(v) if k == "steps" else float(v)) for k, v in self.win.items()},
        }

    def _restore(self, ckpt: dict) -> None:
        from xlab.checkpoint import set_rng_state

        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])
        self.loader.load_state_dict(ckpt["loader"])
        self.best = [dict(b) for b in ckpt.get("best", [])]
        saved_win = ckpt.get("log_window")
        if isinstance(saved_win, dict) and set(saved_win) == set(self.win):
            self.win = {k: (int(v) if k == "steps" else float(v)) for k, v in saved_win.items()}
        import torch

        if self.info.rank == 0:
            set_rng_state(ckpt["rng"])
        rank_rng = ckpt.get("rank_rng") or []
        if len(rank_rng) == self.info.world_size and self.info.distributed:
            torch.set_rng_state(rank_rng[self.info.rank]["torch"])
            if "cuda" in rank_rng[self.info.rank] and self.device.type == "cuda":
                torch.cuda.set_rng_state(rank_rng[self.info.rank]["cuda"], self.device)

    def _save_last(self, rank_rng: Optional[list] = None) -> Path:
        from xlab.checkpoint import save_checkpoint

        return save_checkpoint(self.ckpt_dir / "last.pt", self._state(rank_rng))

    def _rank_best(self, val_loss: float) -> tuple[Optional[str], list[str]]:
        """Enter this step in the best list if its ``val_loss`` is among the ``keep_best`` lowest.

        Returns ``(file name for this step or None, files that fell out of the list)``; the list is
        updated first so that the checkpoint saved next records it.
        """
        k = int(self.cfg.train.keep_best)
        if k <= 0 or not math.isfinite(val_loss):
            return None, []
        name = f"best-step{self.step:07d}.pt"
        ranked = sorted([b for b in self.best if b["file"] != name] +
                        [{"loss": float(val_loss), "step": self.step, "file": name}], key=lambda b: b["loss"])
        self.best = ranked[:k]
        entered = name if any(b["file"] == name for b in self.best) else None
        return entered, [b["file"] for b in ranked[k:] if b["file"] != name]

    def _link_best(self, last: Path, name: str, dropped: list[str]) -> None:
        """Snapshot ``last`` as ``name`` (a hard link: last.pt is replaced, never rewritten in place)."""
        tmp = self.ckpt_dir / f".{name}.link"
        tmp.unlink(missing_ok=True)
        try:
            os.link(last, tmp)
        except OSError:
            import shutil

            shutil.copyfile(last, tmp)
        os.replace(tmp, self.ckpt_dir / name)
        for f in dropped:
            (self.ckpt_dir / f).unlink(missing_ok=True)

    # -------------------------------------------------------------------------- one step
    def _micro_batches(self):
        """Micro-batches forever, epoch after epoch; the loader's state always points at the next one."""
        while True:
            yield from self.loader

    def train_step(self, micro: list, stop_flag: bool = False) -> dict:
        """One optimizer step over ``micro`` (this process's ``grad_accum`` micro-batches).

        Returns ``{"loss_sum", "correct", "count", "grad_norm", "stop"}``, the sums over all processes.

        Raises:
            XLabError: a non-finite loss or gradient norm (before the weights are touched).
        """
        import torch

        from xlab.distributed import all_reduce_sum

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
            with (nullcontext() if sync else self.ddp.no_sync()):
                with (self.autocast() if self.autocast else nullcontext()):
                    try:
                        ls, c, _ = self.loss_module(x, y)
                    except IndexError as e:  # the embedding's lookup of an id >= vocab_size (on CPU)
                        if "out of range" not in str(e):
                            raise
                        raise XLabError(f"a training batch of shard store {self.store.path} holds a token id "
                                        f"outside the vocabulary ({self.store.vocab_size}); the store is "
                                        "damaged: run `xlab data validate`, then `xlab data encode --force`"
                                        ) from None
                (ls * scale).backward()
            loss_sum += ls.detach().double()
            correct += c.double()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = float(t.grad_clip) if t.grad_clip and t.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        stats = torch.stack([loss_sum, correct, grad_norm.double().to(dev)])
        all_reduce_sum(stats[:2])
        loss_sum_v, correct_v, gn = (float(v) for v in stats.tolist())
        global_count, stop = (float(v) for v in head.tolist())
        if not (math.isfinite(loss_sum_v) and math.isfinite(gn)):
            self.optimizer.zero_grad(set_to_none=True)
            what = "loss" if not math.isfinite(loss_sum_v) else "gradient norm"
            raise XLabError(f"non-finite {what} at step {self.step + 1}; stopped, the last checkpoint in "
                            f"{self.ckpt_dir} is untouched (lower train.lr or check the data)")
        lr = lr_at(self.step, lr=t.lr, total_steps=self.total_steps, warmup_steps=t.warmup_steps,
                   schedule=t.lr_schedule, min_lr_ratio=t.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss_sum": loss_sum_v, "correct": correct_v, "count": global_count, "grad_norm": gn,
                "lr": lr, "stop": stop > 0}

    # ------------------------------------------------------------------------ evaluation
    def evaluate_val(self) -> Optional[dict]:
        """Validation metrics over the first ``eval_batches`` batches of val (all ranks share the work)."""
        import torch

        from xlab.distributed import all_reduce_sum
        from xlab.evaluate import evaluate, metrics, split_batches

        if not self.has_val:
            return None
        t = self.cfg.train
        batches = split_batches(self.store, "val", t.batch_size, rank=self.info.rank,
                                world_size=self.info.world_size, max_batches=t.eval_batches, device=self.device,
                                vocab_size=int(self.cfg.model.vocab_size))
        s = evaluate(self.raw_model, batches, chunk_tokens=int(t.loss_chunk_tokens), autocast=self.autocast)
        v = torch.tensor([s["loss_sum"], s["correct"], s["count"]], dtype=torch.float64, device=self.device)
        all_reduce_sum(v)
        loss_sum, correct, count = v.tolist()
        return metrics(loss_sum, int(correct), int(count), self.store.split_info("val"))

    # ------------------------------------------------------------------------------- run
    def run(self, stop_after: Optional[int]) -> dict:
        from omegaconf import OmegaConf
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from xlab.io import atomic_write_text
        from xlab.mfu import mfu, peak_flops

        t = self.cfg.train
        main = self.info.is_main
        console = Console(highlight=False)
        writer = None
        metrics_path = self.run_dir / "metrics.jsonl"
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(self.cfg))
            if self.ckpt is not None:
                _jsonl_truncate(metrics_path, self.step)
            elif metrics_path.exists():
                metrics_path.unlink()  # a run folder without checkpoints holds nothing worth keeping
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=self.step if self.ckpt else None)
            n_params = self.raw_model.num_parameters()
            console.print(
                f"[bold]train[/bold] {self.run_dir}: {n_params / 1e6:.2f}M parameters, "
                f"{self.info.world_size} process(es) on {self.device}, "
                f"{t.batch_size}x{t.grad_accum}x{self.info.world_size} rows of {self.store.seq_len} tokens per step, "
                f"steps {self.step}->{self.total_steps}" + (" (resumed)" if self.ckpt else ""), soft_wrap=True)
            if self.changed:
                console.print(f"resumed with changed train settings: {', '.join(self.changed)}", soft_wrap=True)
        peak = peak_flops(self.device)
        tokens_per_step = t.batch_size * t.grad_accum * self.info.world_size * self.store.seq_len
        jsonl = open(metrics_path, "a", encoding="utf-8") if main else None

        def log(record: dict) -> None:
            if not main:
                return
            jsonl.write(json.dumps(record) + "\n")
            jsonl.flush()
            for k, v in record.items():
                if k not in ("step", "split") and isinstance(v, (int, float)):
                    writer.add_scalar(f"{record['split']}/{k}", v, record["step"])

        last_val: Optional[dict] = None
        last_train_loss = float("nan")
        last_ckpt: Optional[Path] = None
        interrupted = sigint = False
        win = self.win
        t_start = time.perf_counter()
        start_step = self.step
        last_mfu = None
        train_seconds = 0.0  # time in training steps only (not evaluation or saving)

        progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeRemainingColumn(), console=console, disable=not main, transient=True)
        micro_iter = self._micro_batches()
        self.model.train()

        def do_eval() -> None:
            nonlocal last_val
            m = self.evaluate_val()
            if m is None:
                return
            last_val = m
            log({"step": self.step, "split": "val", **{k: m[k] for k in ("loss", "accuracy", "perplexity",
                                                                         "bits_per_byte", "tokens")}})
            if main:
                progress.console.print(
                    f"step {self.step:>6} | val loss {m['loss']:.4f} | acc {m['accuracy']:.3f} | "
                    f"ppl {m['perplexity']:.1f} | bpb {_fmt(m['bits_per_byte'], '.3f')}", soft_wrap=True)

        try:
            with _Interrupt() as intr, progress:
                task = progress.add_task("train", total=self.total_steps, completed=self.step, info="")
                while self.step < self.total_steps:
                    t_step = time.perf_counter()
                    micro = [next(micro_iter) for _ in range(t.grad_accum)]
                    r = self.train_step(micro, stop_flag=intr.requested)
                    dt_step = time.perf_counter() - t_step
                    win["seconds"] += dt_step
                    train_seconds += dt_step
                    for k in ("loss_sum", "correct", "count"):
                        win[k] += r[k]
                    win["steps"] += 1
                    progress.update(task, advance=1, info=f"loss {r['loss_sum'] / max(r['count'], 1):.4f}")
                    if self.step % t.log_every == 0 or self.step == self.total_steps:
                        tps = win["steps"] * tokens_per_step / max(win["seconds"], 1e-9)
                        last_mfu = mfu(self.flops_per_token, tps, peak)
                        last_train_loss = win["loss_sum"] / max(win["count"], 1.0)
                        acc = win["correct"] / max(win["count"], 1.0)
                        log({"step": self.step, "split": "train", "loss": last_train_loss, "accuracy": acc,
                             "lr": r["lr"], "grad_norm": r["grad_norm"], "tokens_per_s": tps,
                             "mfu": last_mfu, "time": round(time.perf_counter() - t_start, 3)})
                        if main:
                            progress.console.print(
                                f"step {self.step:>6} | loss {last_train_loss:.4f} | acc {acc:.3f} | "
                                f"lr {r['lr']:.2e} | gnorm {r['grad_norm']:.2f} | {tps:,.0f} tok/s | "
                                f"mfu {_fmt(last_mfu and 100 * last_mfu, '.1f')}%", soft_wrap=True)
                        win = self.win = _empty_window()
                    at_end = self.step == self.total_steps
                    stop = r["stop"] or (stop_after is not None and self.step >= stop_after)
                    evaluated = False
                    if (self.step % t.eval_every == 0 or at_end) and not stop:
                        do_eval()
                        evaluated = True
                    # Every rank keeps the same best list (the validation loss is all-reduced), so all
                    # agree on when to save and can take part in gathering their random states.
                    best_name, dropped = (None, [])
                    if evaluated and last_val is not None:
                        best_name, dropped = self._rank_best(last_val["loss"])
                    if self.step % t.checkpoint_every == 0 or at_end or stop or best_name:
                        rank_rng = self._gather_rank_rng()
                        if main:
                            last_ckpt = self._save_last(rank_rng)
                            if best_name is not None:
                                self._link_best(last_ckpt, best_name, dropped)
                    if stop:
                        interrupted = True
                        sigint = r["stop"]
                        break
        finally:
            if jsonl is not None:
                jsonl.close()
            if writer is not None:
                writer.close()

        seconds = time.perf_counter() - t_start
        done = self.step - start_step
        summary = {
            "steps": self.step, "total_steps": self.total_steps, "train_loss": last_train_loss,
            "val_loss": last_val and last_val["loss"], "val_accuracy": last_val and last_val["accuracy"],
            "val_perplexity": last_val and last_val["perplexity"],
            "val_bits_per_byte": last_val and last_val["bits_per_byte"],
            "tokens": done * tokens_per_step, "seconds": seconds,
            "tokens_per_s": done * tokens_per_step / train_seconds if train_seconds > 0 else None,
            "mfu": last_mfu, "interrupted": interrupted, "run_dir": str(self.run_dir),
            "last_checkpoint": str(last_ckpt) if last_ckpt else None,
        }
        if main:
            console.print(
                f"[bold]train[/bold]: {'stopped' if interrupted else 'done'} at step {self.step}/{self.total_steps}"
                f" in {seconds:.1f}s"
                + (f"; train loss {last_train_loss:.4f}" if math.isfinite(last_train_loss)
                   else "; no step to run (the run was already complete)" if self.step == start_step else "")
                + (f", val loss {last_val['loss']:.4f}, bpb {_fmt(last_val['bits_per_byte'], '.3f')}" if last_val else "")
                + (f"; checkpoint {last_ckpt}" if last_ckpt else ""), soft_wrap=True)
        if sigint:
            raise KeyboardInterrupt
        return summary
