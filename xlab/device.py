"""Which device and which precision a command runs in."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from xlab.errors import XLabError


def resolve_device(device: Optional[str], local_rank: int = 0):
    """The ``torch.device`` that a ``--device`` value names.

    ``auto`` (or None) is ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; a bare ``cuda``
    is ``cuda:<local_rank>`` (one GPU per torchrun process).

    Raises:
        XLabError: an unknown device name, CUDA asked for where it is not available, or an index past
            the number of GPUs.
    """
    import torch

    if device in (None, "auto"):
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise XLabError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise XLabError(f"device {device!r}: CUDA is not available here; use --device cpu")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
        if dev.index >= torch.cuda.device_count():
            raise XLabError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise XLabError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    return dev


def autocast_factory(precision: str, device: Any) -> Optional[Callable[[], Any]]:
    """A zero-argument factory of the autocast context for ``precision`` (auto | bf16 | fp32), or None
    for plain fp32. ``auto`` is bf16 on CUDA and fp32 on CPU."""
    import torch

    device = torch.device(device)
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return None
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
