"""The optimizers: AdamW (Loshchilov & Hutter 2019) alone, or Muon for the blocks' weight matrices
beside AdamW for everything else (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural
networks", https://kellerjordan.github.io/posts/muon/).

Muon replaces each matrix's momentum-averaged gradient by its nearest semi-orthogonal matrix (five
Newton-Schulz iterations), so every direction of the update has the same size. It is meant for the 2-D
weights inside the blocks; the embedding, the output head, norms and biases stay with AdamW, as in the
Muon paper and in modded-nanogpt. XLab uses ``torch.optim.Muon`` (torch >= 2.9) with Keller Jordan's
shape scaling, lr * sqrt(max(1, rows / cols)).

Every param group carries ``lr_scale``: the trainer sets ``lr = schedule(step) * lr_scale``, so one
schedule drives both learning rates (AdamW's ``train.lr`` and Muon's ``train.muon_lr``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn as nn

from xlab.config import Optimizer, TrainConfig
from xlab.errors import XLabError


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    lr: Optional[float] = None,
    embedding_lr: Optional[float] = None,
    head_lr: Optional[float] = None,
) -> list[dict]:
    """AdamW parameter groups: decay on weight matrices, none on biases, norms and embeddings.

    A parameter decays when it has two or more dimensions and does not belong to an ``nn.Embedding``
    (a tied output head shares the embedding's tensor and so does not decay either). With
    ``embedding_lr`` (the token embedding, ``model.tok_emb``) or ``head_lr`` (the output head,
    ``model.lm_head``), those parameters get groups of their own, without weight decay, whose
    ``lr_scale`` is that rate over ``lr``; without them the two groups above are all there is.
    Empty groups are left out.
    """
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    own: dict[int, int] = {}  # id(parameter) -> index of its own group below
    extra = []
    for name, rate in (("tok_emb", embedding_lr), ("lm_head", head_lr)):
        module = getattr(model, name, None)
        if rate is None or module is None:
            continue
        params = [p for p in module.parameters() if p.requires_grad and id(p) not in own]  # tied: the embedding's
        own |= {id(p): len(extra) for p in params}
        extra.append({"params": params, "weight_decay": 0.0, "lr_scale": rate / lr})
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in own:
            continue
        (decay if p.ndim >= 2 and id(p) not in emb else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
        *extra,
    ]
    return [g for g in groups if g["params"]]


def muon_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters Muon takes: the 2-D weights of ``model.blocks`` (q/k/v, attention output and
    feed-forward matrices). The embedding, the head, norms and biases are not among them."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return []
    return [p for p in blocks.parameters() if p.requires_grad and p.ndim == 2]


class MuonAdamW:
    """Muon over :func:`muon_params`, AdamW over the other parameters, used as one optimizer.

    It has what the trainer uses of ``torch.optim.Optimizer``: ``param_groups`` (Muon's first),
    ``step()``, ``zero_grad()``, ``state_dict()`` -> ``{"muon": ..., "adamw": ...}`` and
    ``load_state_dict()``.

    Muon's decoupled weight decay multiplies a matrix by ``1 - lr_muon * wd_muon`` per step; XLab sets
    ``wd_muon = weight_decay * lr / muon_lr`` so that every decayed matrix shrinks by the same
    ``1 - lr * weight_decay`` per step under either optimizer, and ``train.weight_decay`` keeps one
    meaning.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self, closure: Optional[Callable[[], Any]] = None) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Raises:
        KeyError: ``state`` is not a Muon + AdamW state (e.g. a plain AdamW checkpoint)."""
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


class ShardedMuon(torch.optim.Muon):
    """``torch.optim.Muon`` for matrices sharded by FSDP2 (DTensors split on dim 0 over ranks).

    Newton-Schulz needs the whole matrix. Torch's Muon does run on DTensors, but every matmul of its
    five iterations then reduces bf16 partial products across ranks, and the result drifts from the
    one-process update (a few bf16 ulps per element, measured at 2 ranks). Here the momentum update
    stays on each rank's shard (elementwise, exact), the update is gathered whole
    (``full_tensor()``, one all-gather per matrix per step), orthogonalised on every rank with torch's
    own routine, and each rank applies its own rows: the same arithmetic as one process. This is the
    gather-then-orthogonalise scheme of Muon under ZeRO/FSDP (Jordan et al. 2024; Moonlight, Liu et
    al. 2025, arXiv:2502.16982). Hyperparameters, state (``momentum_buffer``) and ``state_dict``
    layout are ``torch.optim.Muon``'s; the step follows torch's ``_single_tensor_muon``.

    Raises:
        ValueError: a parameter that is not 2-D (as torch's Muon).
    """

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

        for group in self.param_groups:
            lr, wd, momentum = float(group["lr"]), group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.ndim != 2:
                    raise ValueError("Param gradient must be a 2D matrix")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                sharded = isinstance(update, DTensor)
                whole = update.full_tensor() if sharded else update  # (rows, cols)
                ortho = _zeropower_via_newtonschulz(whole, group["ns_coefficients"], group["ns_steps"], group["eps"])
                if sharded:  # this rank's rows; every rank computed the same whole matrix
                    ortho = distribute_tensor(ortho, p.device_mesh, p.placements, src_data_rank=None)
                p.mul_(1 - lr * wd)
                p.add_(ortho, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))


def _adamw(groups: list[dict], t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one for ``device`` (CUDA, and CPU since torch 2.4)."""
    try:
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
        impl = {"fused": True}
    except (RuntimeError, TypeError, ValueError):
        impl = {}
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps, **impl)


def build_optimizer(model: nn.Module, t: TrainConfig, device: torch.device) -> torch.optim.Optimizer | MuonAdamW:
    """The optimizer ``t.optimizer`` names.

    ``adamw``: AdamW over :func:`param_groups` with ``t.lr`` (``t.embedding_lr`` and ``t.head_lr`` for
    their own groups), ``t.beta1``, ``t.beta2``, ``t.adam_eps``, ``t.weight_decay``. ``muon``: :class:`MuonAdamW`, Muon (``t.muon_lr``, ``t.muon_momentum``,
    Nesterov, 5 Newton-Schulz steps in bf16) over :func:`muon_params` and AdamW as above over the rest;
    :class:`ShardedMuon` when the matrices are FSDP2 shards.

    Raises:
        XLabError: ``muon`` on a torch without ``torch.optim.Muon`` (before 2.9), or a model without
            block matrices.
    """
    rates = {"lr": t.lr, "embedding_lr": t.embedding_lr, "head_lr": t.head_lr}
    if Optimizer.parse(t.optimizer, "train.optimizer") == Optimizer.adamw:
        return _adamw(param_groups(model, t.weight_decay, **rates), t, device)
    if not hasattr(torch.optim, "Muon"):
        raise XLabError(f"train.optimizer=muon needs torch >= 2.9 (installed: {torch.__version__}); use adamw")
    matrices = muon_params(model)
    if not matrices:
        raise XLabError("train.optimizer=muon found no block weight matrices in the model")
    taken = {id(p) for p in matrices}
    groups = param_groups(model, t.weight_decay, **rates)
    rest = [g | {"params": [p for p in g["params"] if id(p) not in taken]} for g in groups]
    scale = t.muon_lr / t.lr
    from torch.distributed.tensor import DTensor

    sharded = any(isinstance(p, DTensor) for p in matrices)  # under FSDP2 (xlab.train.parallel)
    muon = (ShardedMuon if sharded else torch.optim.Muon)(
        matrices,
        lr=t.muon_lr,
        weight_decay=t.weight_decay / scale,
        momentum=t.muon_momentum,
        nesterov=True,
        adjust_lr_fn="original",
    )
    for g in muon.param_groups:
        g["lr_scale"] = scale
    return MuonAdamW(muon, _adamw([g for g in rest if g["params"]], t, device))


def load_optimizer_state(
    optimizer: torch.optim.Optimizer | MuonAdamW, state: dict, names: Optional[dict[int, str]] = None
) -> None:
    """Load a checkpoint's optimizer ``state`` (moments, momentum buffers, step counts) into
    ``optimizer``, keeping the hyperparameters it was built with from the configuration in force
    (``betas``, ``weight_decay``, Muon's ``momentum``, ``lr_scale``): a resumed run that changes
    ``train.muon_lr`` or ``train.weight_decay`` trains with the new values, as it reports.
    ``optimizer.load_state_dict`` alone would bring back the saved ones.

    Every state tensor is checked first (:func:`check_optimizer_state`; ``names``: parameter names
    by ``id()``, for its message): torch's loader would take a moment of another shape as it is, and
    the fused step then reads past its end.

    Raises:
        KeyError, ValueError: ``state`` does not fit ``optimizer`` (another optimizer, other
            parameters, a state tensor of another shape or dtype than its parameter).
    """
    if isinstance(optimizer, MuonAdamW):
        check_optimizer_state(optimizer.muon, state["muon"], names)
        check_optimizer_state(optimizer.adamw, state["adamw"], names)
    else:
        check_optimizer_state(optimizer, state, names)
    built = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, built):
        group.update(settings)


def check_optimizer_state(optimizer: torch.optim.Optimizer, state: Any, names: Optional[dict[int, str]] = None) -> None:
    """Check that ``state`` (torch's ``state_dict`` layout: ``state`` by parameter id, ``param_groups``
    listing the ids) fits ``optimizer``: as many groups of as many parameters, and for every
    parameter each state tensor of the parameter's shape and dtype, its ``step`` one finite count
    (0 or more). Under FSDP the parameters are DTensors, whose shape is the whole tensor's.

    Raises:
        ValueError: the first misfit, naming the parameter (by ``names[id(param)]``, else its index).
    """
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict):
        raise ValueError("the optimizer state is not a torch optimizer state_dict")
    saved = state.get("param_groups")
    built = [g["params"] for g in optimizer.param_groups]
    sizes = [len(g.get("params", ())) if isinstance(g, dict) else None for g in saved or []]
    if not isinstance(saved, list) or sizes != [len(b) for b in built]:
        raise ValueError(
            f"the optimizer state has groups of {sizes} parameters, this model's {[len(b) for b in built]}"
        )
    param_of = {sid: p for g, b in zip(saved, built) for sid, p in zip(g["params"], b)}
    names = names or {}
    for sid, entry in state["state"].items():
        p = param_of.get(sid)
        if p is None or not isinstance(entry, dict):
            raise ValueError(f"the optimizer state holds an entry {sid!r} for no parameter of the model")
        name = names.get(id(p), f"#{sid}")
        for key, v in entry.items():
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"optimizer state {key!r} of parameter {name} is a {type(v).__name__}, not a tensor")
            if key == "step":
                if v.numel() != 1 or not math.isfinite(float(v)) or float(v) < 0:
                    raise ValueError(
                        f"optimizer state 'step' of parameter {name} is not a count: {v.flatten()[:3].tolist()}"
                    )
            elif v.shape != p.shape or v.dtype != p.dtype:
                raise ValueError(
                    f"optimizer state {key!r} of parameter {name} is {tuple(v.shape)} {v.dtype}, "
                    f"the parameter {tuple(p.shape)} {p.dtype}"
                )
