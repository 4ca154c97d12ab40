"""FSDP2 for the trainer: shard the model with ``fully_shard``, gather and load XLab checkpoints.

``train.parallel=fsdp`` under torchrun wraps each transformer block, then the whole model, with
``torch.distributed.fsdp.fully_shard`` (FSDP2, per-parameter sharding on dim 0 as DTensors; the
torchtitan layout). The model is the root group, so the embedding, the final norm and the output head
are sharded together, and a tied head (``lm_head.weight is tok_emb.weight``) stays one parameter.
``Transformer.hidden`` is registered as an FSDP forward method: the loss and the evaluation call it
instead of ``forward``, and the root's parameters must be gathered for it.

Checkpoints keep XLab's format (:mod:`xlab.checkpoint`): full, unsharded tensors, the model's
``state_dict`` keys and torch's own optimizer ``state_dict`` layout, so a run trained under FSDP is
evaluated, exported and resumed (under DDP, FSDP or one process) like any other.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def fsdp_wrap(model: nn.Module, device: torch.device, bf16: bool) -> nn.Module:
    """Shard ``model`` in place over the default process group and return it.

    Each of ``model.blocks`` becomes an FSDP group, then ``model`` itself (the root: embeddings,
    final norm, head). On CUDA with ``bf16`` the parameters are gathered in bf16 and the gradients
    reduced in fp32 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``); otherwise
    (CPU, or fp32) everything stays fp32. The sharded parameters replace the module's: build the
    optimizer after this call.

    The gradient is averaged over ranks, as DDP does (the trainer's loss scaling assumes it): FSDP2
    reduce-scatters fp32 and bf16 gradients with ``ReduceOp.AVG``, which gloo supports too in torch
    2.13 (tests/test_fsdp.py compares 2 ranks with one process). No divide factor is set: a factor
    other than the world size makes FSDP2 use ``PREMUL_SUM``, which gloo refuses.

    Raises:
        AttributeError: ``model`` has no ``blocks``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if device.type == "cuda" and bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    register_fsdp_forward_method(model, "hidden")
    return model


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _gather(obj: Any) -> Any:
    """``obj`` (nested dicts and lists) with every DTensor gathered whole onto the CPU.

    Collective: every rank calls it with the same structure (the same optimizer), in the same order."""
    if _is_dtensor(obj):
        return obj.full_tensor().cpu()
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _gather(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_gather(v) for v in obj]
    return obj


def full_model_state(model: nn.Module) -> dict:
    """The unsharded ``state_dict`` of an FSDP ``model`` (the keys of ``model.state_dict()``, CPU
    tensors) on rank 0, ``{}`` on the other ranks.

    Collective: every rank must call it (a call from rank 0 alone waits forever). Uses
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` with
    ``StateDictOptions(full_state_dict=True, cpu_offload=True)``.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: nn.Module, state: dict) -> None:
    """Load an unsharded ``state`` (as :func:`full_model_state` or a one-process run saves it) into the
    FSDP ``model``. Every rank passes the whole state (each has read the checkpoint) and keeps its
    own shard; collective.

    Raises:
        RuntimeError: missing or unexpected keys, or shapes that do not fit.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(optimizer: Any) -> dict:
    """``optimizer.state_dict()`` with its sharded moments and buffers gathered whole (CPU tensors):
    torch's layout (states keyed by parameter index), the same as a one-process run writes, for a
    ``torch.optim`` optimizer or :class:`xlab.train.optim.MuonAdamW` (``{"muon": ..., "adamw": ...}``).

    ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` gathers the same tensors but
    keys them by parameter name, which would give FSDP runs another checkpoint layout than DDP and
    one-process runs; the layout is kept instead. Collective: every rank calls it.
    """
    return _gather(optimizer.state_dict())


def _shard_state(opt: torch.optim.Optimizer, state: dict) -> dict:
    """``state`` (torch's layout, whole tensors) with each tensor of a parameter's shape laid out as
    that parameter's DTensor: every rank keeps its own shard of the tensor it read (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for g in opt.param_groups for p in g["params"]]
    out = dict(state)
    out["state"] = {}
    for idx, entry in state["state"].items():
        p = params[int(idx)]
        if not _is_dtensor(p):
            out["state"][idx] = entry
            continue
        out["state"][idx] = {
            k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            if isinstance(v, torch.Tensor) and v.shape == p.shape
            else v
            for k, v in entry.items()
        }
    return out


def shard_optimizer_state(optimizer: Any, state: dict) -> dict:
    """The inverse of :func:`full_optimizer_state`: a whole optimizer ``state`` (from any XLab
    checkpoint) with the tensors of sharded parameters cut to this rank's shard, ready for
    :func:`xlab.train.optim.load_optimizer_state` (torch's ``load_state_dict`` maps states to
    parameters by index, so a freshly built optimizer with no state yet takes it).

    Raises:
        KeyError, IndexError: ``state`` does not fit ``optimizer``.
    """
    from xlab.train.optim import MuonAdamW

    if isinstance(optimizer, MuonAdamW):
        return {
            "muon": _shard_state(optimizer.muon, state["muon"]),
            "adamw": _shard_state(optimizer.adamw, state["adamw"]),
        }
    return _shard_state(optimizer, state)


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """The total gradient norm ``clip_grad_norm_`` returned, as a plain tensor: over DTensor gradients
    it is a DTensor (already reduced over the shards), whose ``full_tensor()`` is the value."""
    return norm.full_tensor() if _is_dtensor(norm) else norm
