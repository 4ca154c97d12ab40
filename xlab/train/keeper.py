"""Checkpoint keeping for a training run: ``last.pt``, the best ``keep_best`` by validation loss, and
every rank's random state under DDP. The file format itself is :mod:`xlab.checkpoint`."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from xlab.checkpoint import save_checkpoint, set_rng_state
from xlab.distributed import DistInfo
from xlab.fsio import remove_temporaries


class CheckpointKeeper:
    """Writes ``ckpt_dir/last.pt`` atomically and keeps ``best-stepNNNNNNN.pt`` snapshots of the
    ``keep_best`` lowest validation losses (hard links of ``last.pt``, so a snapshot costs no space).

    ``best`` is ``[{"loss", "step", "file"}]``, lowest loss first; it is saved in every checkpoint so
    a resumed run keeps the same list. Every rank holds the same list (the validation loss is
    all-reduced), so all ranks agree on when to save; only rank 0 writes.

    Made by rank 0 under the run's lock, it first removes what a killed earlier run of this folder
    left: the temporaries of a checkpoint (``.last.pt.XXXXXXXX.tmp``) or ``config.yaml`` write
    and of a best snapshot (``.best-stepNNNNNNN.pt.link``). The lock means no live writer has any.
    """

    def __init__(self, ckpt_dir: Path, keep_best: int, info: DistInfo, device: torch.device):
        self.dir = Path(ckpt_dir)
        self.keep_best = int(keep_best)
        self.info, self.device = info, device
        self.best: list[dict] = []
        if info.is_main:
            remove_temporaries(self.dir, [".best-step*.pt.link"])
            remove_temporaries(self.dir.parent)  # the run folder: config.yaml's

    def rank(self, step: int, val_loss: float) -> tuple[Optional[str], list[str]]:
        """Enter ``step`` in the best list if its ``val_loss`` is among the ``keep_best`` lowest.

        Returns ``(file name for this step or None, files that fell out of the list)``; the list is
        updated first so that the checkpoint saved next records it.
        """
        k = self.keep_best
        if k <= 0 or not math.isfinite(val_loss):
            return None, []
        name = f"best-step{step:07d}.pt"
        ranked = sorted(
            [b for b in self.best if b["file"] != name] + [{"loss": float(val_loss), "step": step, "file": name}],
            key=lambda b: b["loss"],
        )
        self.best = ranked[:k]
        entered = name if any(b["file"] == name for b in self.best) else None
        return entered, [b["file"] for b in ranked[k:] if b["file"] != name]

    def restore_best(self, best: list) -> None:
        """Take a checkpoint's ``best`` list, as saved by :meth:`rank`. Its file names are deleted as
        the list moves on: :func:`xlab.train.resume.check_counters` has checked that each is a
        ``best-stepNNNNNNN.pt`` of this run before any step (a crafted one could name a file elsewhere)."""
        self.best = [dict(b) for b in best]

    def save(self, state: dict, best_name: Optional[str] = None, dropped: list[str] = ()) -> Path:
        """Write ``state`` as ``last.pt``; snapshot it as ``best_name`` and delete ``dropped``."""
        last = save_checkpoint(self.dir / "last.pt", state)
        if best_name is not None:
            tmp = self.dir / f".{best_name}.link"
            tmp.unlink(missing_ok=True)
            try:
                os.link(last, tmp)  # last.pt is replaced, never rewritten in place
            except OSError:
                shutil.copyfile(last, tmp)
            os.replace(tmp, self.dir / best_name)
            for f in dropped:
                (self.dir / f).unlink(missing_ok=True)
        return last

    def gather_rank_rng(self) -> Optional[list]:
        """Every rank's torch random state (CPU, and CUDA on CUDA), gathered to all ranks; None in one
        process. Collective: every rank must call it at the same step."""
        if not self.info.distributed:
            return None
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

    def restore_rng(self, ckpt: dict) -> None:
        """Restore the random states of ``ckpt``: rank 0's process-wide states, and under DDP with the
        same number of processes each rank's own torch state (dropout masks)."""
        if self.info.rank == 0:
            set_rng_state(ckpt["rng"])
        rank_rng = ckpt.get("rank_rng") or []
        if len(rank_rng) == self.info.world_size and self.info.distributed:
            mine = rank_rng[self.info.rank]
            torch.set_rng_state(mine["torch"])
            if "cuda" in mine and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], self.device)
