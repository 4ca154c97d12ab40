"""torchrun support: read the launcher's environment, tie a rank's life to its launcher's, start and
stop the process group.

``torchrun --nproc_per_node N`` sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in each
worker's environment; without them XLab runs as a single process (rank 0 of 1).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from xlab.errors import XLabError, first_line

# What to say after any launcher variable that does not fit: where such variables come from.
_LAUNCHER_HINT = (
    "start the processes with torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT), "
    "or unset these variables to run as one process"
)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its global rank, rank on this node, and the number of processes."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """True on the one process (rank 0) that writes logs and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info(env: Mapping[str, str] | None = None) -> DistInfo:
    """The torchrun environment of this process (``env``, default ``os.environ``): a single process
    (rank 0 of 1) when WORLD_SIZE is not set.

    Raises:
        XLabError: one line naming the variable: RANK, LOCAL_RANK, WORLD_SIZE (or LOCAL_WORLD_SIZE,
            MASTER_PORT) that is not an integer; WORLD_SIZE below 1; RANK outside ``[0, WORLD_SIZE)``;
            LOCAL_RANK negative or not below LOCAL_WORLD_SIZE (or a WORLD_SIZE above 1); several processes
            (WORLD_SIZE above 1) without RANK, MASTER_ADDR or MASTER_PORT (the process group's
            rendezvous reads them), or a MASTER_PORT outside 1..65535.
    """
    env = os.environ if env is None else env

    def number(name: str, default: int | None = None) -> int | None:
        value = env.get(name)
        if value is None:
            return default
        try:
            return int(value.strip())
        except ValueError:
            raise XLabError(f"launcher variable {name}={value!r} is not an integer; {_LAUNCHER_HINT}") from None

    world = number("WORLD_SIZE", 1)
    rank, local = number("RANK"), number("LOCAL_RANK", 0)
    if world < 1:
        raise XLabError(f"launcher variable WORLD_SIZE={world} is not a number of processes (1 or more)")
    if world > 1 and rank is None:
        raise XLabError(f"launcher variable RANK is not set, but WORLD_SIZE={world} asks for several processes; "
                        + _LAUNCHER_HINT)  # fmt: skip
    rank = 0 if rank is None else rank
    if not 0 <= rank < world:
        raise XLabError(f"launcher variable RANK={rank} is not a rank of WORLD_SIZE={world} (0..{world - 1}); "
                        + _LAUNCHER_HINT)  # fmt: skip
    # A bound only where a launcher gave one: LOCAL_RANK alone still picks the GPU of one process.
    local_world = number("LOCAL_WORLD_SIZE", world if world > 1 else None)
    if local < 0 or (local_world is not None and local >= local_world):
        within = f" (0..{local_world - 1})" if local_world is not None else ""
        raise XLabError(f"launcher variable LOCAL_RANK={local} is not a rank on this node{within}; {_LAUNCHER_HINT}")
    if world > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not env.get(name, "").strip():
                raise XLabError(f"launcher variable {name} is not set, but WORLD_SIZE={world} asks for several "
                                f"processes, which meet there; {_LAUNCHER_HINT}")  # fmt: skip
        port = number("MASTER_PORT")
        if not 1 <= port <= 65535:
            raise XLabError(f"launcher variable MASTER_PORT={port} is not a port (1..65535); {_LAUNCHER_HINT}")
    return DistInfo(rank=rank, local_rank=local, world_size=world)


def init(info: DistInfo, device) -> None:
    """Start the default process group when running under torchrun (NCCL on CUDA, gloo on CPU).

    Raises:
        XLabError: the process group cannot start (the rendezvous at MASTER_ADDR:MASTER_PORT fails:
            an unknown host, a port in use); one line naming them.
    """
    import torch
    import torch.distributed as dist

    if not info.distributed or dist.is_initialized():
        return
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    try:
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size, **kwargs)
    except (RuntimeError, ValueError, OSError) as e:  # torch's DistNetworkError and DistStoreError are RuntimeErrors
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise XLabError(
            f"cannot start the process group of rank {info.rank} of {info.world_size} at MASTER_ADDR:MASTER_PORT "
            f"{where} ({type(e).__name__}: {first_line(e, 200)})"
        ) from None


def die_with_parent(parent_pid: int, *, ignore_ctrl_c: bool = True) -> None:
    """Make this process end when the process that started it (``parent_pid``) ends, however it
    ends; with ``ignore_ctrl_c``, also leave Ctrl-C to the parent.

    A child otherwise outlives a parent killed with SIGKILL (nothing can run in the parent then): a
    pool's workers stay blocked forever on their task queue, a training rank trains on and holds
    its run's lock. On Linux the kernel delivers SIGKILL to this process when its parent dies
    (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread polls ``os.getppid()`` once a second
    and exits with code 1. Either way a parent that died before this call is noticed here and this
    process exits at once (code 1). SIGKILL, not SIGTERM: nothing is left to report to, and every
    XLab file is written atomically, so what was last saved stays whole.
    """
    if ignore_ctrl_c:
        # Ctrl-C in a terminal reaches the whole process group: only the parent handles it (it stops
        # the pool and says in one line that a rerun resumes), so a worker prints no traceback of its own.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:  # the parent is already gone (we were re-parented)
        os._exit(1)
    if not armed:

        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="xlab-parent-watch", daemon=True).start()


def die_with_launcher(env: Mapping[str, str] | None = None) -> bool:
    """Under torchrun (its agent sets TORCHELASTIC_RUN_ID in ``env``, default ``os.environ``), tie
    this rank's life to the launcher's (:func:`die_with_parent`; Ctrl-C stays this rank's own, so it
    can save): a launcher killed with SIGKILL, as an out-of-memory killer or a node agent does, then
    takes its ranks with it instead of leaving them training on as orphans that hold the run's lock.
    Returns True when armed (under torchrun), False otherwise (nothing to watch).

    torchrun starts its ranks itself (one process each), so the launcher is this process's parent.
    """
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" not in env:
        return False
    die_with_parent(os.getppid(), ignore_ctrl_c=False)
    return True


def barrier() -> None:
    """Wait until every process gets here (no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    """Stop the default process group if one is running."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t):
    """Sum ``t`` in place over all processes (no-op in a single process); returns ``t``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
