"""Cross-entropy of a language-model head, computed a chunk of positions at a time.

A full ``(batch, seq_len, vocab)`` logits tensor dominates a small model's training memory (batch 128,
sequence 128 and a 10,000-token vocabulary is 655 MB in fp32, and autograd keeps two or three of them).
:func:`linear_cross_entropy` fuses the output projection with the loss: for each chunk of
``chunk_tokens`` positions it computes the logits, the loss and, in the same pass, the gradient of the
loss with respect to the chunk's hidden states and to the head's weight and bias (softmax minus one-hot,
then two matrix products), and frees the chunk's logits. The backward pass only scales the stored
gradients by the incoming scalar gradient, so nothing is recomputed. This is the approach of
Liger-Kernel's fused linear cross-entropy and of Wijmans et al., "Cut Your Losses in Large-Vocabulary
Language Models" (2024), written with plain PyTorch operations.

:func:`chunked_cross_entropy` does the same for any head function (not only ``h @ W.T + b``) with
activation checkpointing per chunk: the chunk's logits are recomputed in the backward pass.

All functions return *sums* (not means) so that callers can normalise by the number of targets of a
whole accumulated step, across micro-batches and processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F

from xlab.store.format import IGNORE_INDEX  # torch's cross_entropy default


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The matmul dtype that autocast would use here (e.g. bf16), else ``dtype``."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """Fused ``cross_entropy(softcap(h @ W.T + b), t, reduction="sum")``; see :func:`linear_cross_entropy`."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_tokens, ignore_index, compute_dtype, need_grad, softcap):
        n = h.shape[0]
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        loss = torch.zeros((), dtype=torch.float64, device=h.device)
        correct = torch.zeros((), dtype=torch.int64, device=h.device)
        valid_all = targets != ignore_index
        count = valid_all.sum()
        grad_h = torch.zeros_like(h) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_grad else None
        grad_b = None
        if need_grad and bias is not None:
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk_tokens):
            e = min(n, s + chunk_tokens)
            hc = h[s:e].to(compute_dtype)  # (C, D)
            tc = targets[s:e]  # (C,)
            valid = valid_all[s:e]
            logits = F.linear(hc, w, b).float()  # (C, V) fp32: the softmax and its sums need the range
            th = None
            if softcap is not None:  # logits = c tanh(z / c); keep tanh for its derivative 1 - tanh^2
                th = logits.div_(softcap).tanh_()
                logits = th * softcap
            safe_t = torch.where(valid, tc, torch.zeros_like(tc))
            tgt = logits.gather(1, safe_t[:, None]).squeeze(1)  # (C,)
            correct += ((logits.argmax(dim=-1) == tc) & valid).sum()
            # log-sum-exp written out so that it works in place: torch.logsumexp would allocate a
            # second (C, V) buffer, and the chunk's memory is the one thing this function is for.
            m = logits.amax(dim=-1, keepdim=True)  # (C, 1)
            ex = logits.sub_(m).exp_()  # (C, V) exp(logit - max), in place
            total = ex.sum(dim=-1, keepdim=True)  # (C, 1)
            lse = (m + total.log()).squeeze(1)  # (C,)
            loss += torch.where(valid, lse - tgt, torch.zeros_like(lse)).sum(dtype=torch.float64)
            if need_grad:
                # d(sum of losses)/d(logits) = softmax - onehot(target), zero on ignored rows.
                g = ex.div_(total)  # softmax, in place
                g.scatter_add_(1, safe_t[:, None], -valid[:, None].to(g.dtype))
                g.mul_(valid[:, None].to(g.dtype))
                if th is not None:  # back through the cap: d(c tanh(z/c))/dz = 1 - tanh(z/c)^2
                    g.mul_(th.square_().neg_().add_(1.0))
                gc = g.to(compute_dtype)
                grad_h[s:e] = (gc @ w).to(h.dtype)  # (C, D)
                grad_w += (gc.t() @ hc).float()  # (V, D)
                if grad_b is not None:
                    grad_b += g.sum(0)
                del g, gc
            # Drop every name of the (C, V) buffers before the next chunk allocates its own.
            del logits, ex, th
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(correct, count)
        return loss.float(), correct, count

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct, _grad_count):
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        dh_t, dw_t, db_t = ctx.dtypes
        out_h = out_w = out_b = None
        if grad_h is not None:
            scale = grad_loss.float()
            if ctx.needs_input_grad[0]:
                out_h = (grad_h * scale.to(grad_h.dtype)).to(dh_t)
            if ctx.needs_input_grad[1]:
                out_w = (grad_w * scale).to(dw_t)
            if grad_b is not None and ctx.needs_input_grad[2]:
                out_b = (grad_b * scale).to(db_t)
        return out_h, out_w, out_b, None, None, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    chunk_tokens: int = 8192,
    ignore_index: int = IGNORE_INDEX,
    softcap: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``logits = h @ weight.T + bias`` without materialising all the logits.

    Args:
        h: hidden states, float, shape ``(..., D)`` (e.g. ``(B, T, D)``); flattened to ``(N, D)``.
        weight: head weight ``(V, D)``. bias: ``(V,)`` or None.
        targets: int64, shape ``h.shape[:-1]``; positions equal to ``ignore_index`` count for nothing.
        chunk_tokens: positions per chunk; at most one ``(chunk_tokens, V)`` fp32 logits buffer (plus its
            compute-dtype copy under autocast) exists at a time.
        ignore_index: target value that marks padding.
        softcap: if given, c: the logits are ``c * tanh((h @ weight.T + bias) / c)`` (Gemma 2's soft
            cap, as :meth:`xlab.model.Transformer.head` applies it); one more ``(chunk_tokens, V)``
            buffer holds the tanh for the backward pass.

    Returns:
        ``(loss_sum, correct, count)``: the fp32 scalar sum of per-position losses in nats over the
        non-ignored positions (differentiable with respect to ``h``, ``weight`` and ``bias``); the int64
        number of those positions whose arg-max logit is the target; the int64 number of non-ignored
        positions. With no valid position the loss is 0 and every gradient is 0 (never NaN).

    Under CUDA/CPU autocast the matrix products run in the autocast dtype (e.g. bf16) and the softmax,
    the loss and the weight-gradient accumulation in fp32.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    d = h.shape[-1]
    h2 = h.reshape(-1, d)
    t2 = targets.reshape(-1)
    if t2.shape[0] != h2.shape[0]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match hidden states {tuple(h.shape)}")
    cd = _compute_dtype(h.device.type, h.dtype)
    need_grad = torch.is_grad_enabled() and (
        h.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    cap = None if softcap is None else float(softcap)
    return _LinearCrossEntropy.apply(h2, weight, bias, t2, int(chunk_tokens), int(ignore_index), cd, need_grad, cap)


def chunked_cross_entropy(
    h: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    chunk_tokens: int = 8192,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like :func:`linear_cross_entropy` for any ``head: (N, D) -> (N, V)``, one chunk at a time.

    Each chunk's logits are computed under :func:`torch.utils.checkpoint.checkpoint`, so autograd keeps
    only the chunk's input and recomputes its logits during the backward pass (one extra head
    forward). Returns ``(loss_sum, correct, count)`` as :func:`linear_cross_entropy` does.
    """
    from torch.utils.checkpoint import checkpoint

    d = h.shape[-1]
    h2 = h.reshape(-1, d)
    t2 = targets.reshape(-1)

    def chunk_loss(hc: torch.Tensor, tc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(hc).float()  # (C, V)
        loss = F.cross_entropy(logits, tc, ignore_index=ignore_index, reduction="sum")
        return loss, ((logits.argmax(-1) == tc) & (tc != ignore_index)).sum()

    loss = h2.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.int64, device=h.device)
    for s in range(0, h2.shape[0], chunk_tokens):
        hc, tc = h2[s : s + chunk_tokens], t2[s : s + chunk_tokens]
        if torch.is_grad_enabled():
            lc, cc = checkpoint(chunk_loss, hc, tc, use_reentrant=False)
        else:
            lc, cc = chunk_loss(hc, tc)
        loss = loss + lc
        correct += cc
    return loss, correct, (t2 != ignore_index).sum()


def full_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The naive reference: ``(loss_sum, correct, count)`` from a full ``(..., V)`` logits tensor."""
    v = logits.shape[-1]
    lg = logits.reshape(-1, v).float()
    t = targets.reshape(-1)
    loss = F.cross_entropy(lg, t, ignore_index=ignore_index, reduction="sum")
    valid = t != ignore_index
    return loss, ((lg.argmax(-1) == t) & valid).sum(), valid.sum()


def model_loss(
    model,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int = 8192,
    ignore_index: int = IGNORE_INDEX,
    doc_ids: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss_sum, correct, count)`` of a Transformer on ``inputs``/``targets`` (int64 ``(B, T)``).

    Runs ``model.hidden(inputs, doc_ids=doc_ids)`` (``(B, T, D)``; ``doc_ids`` (B, T) for packed rows,
    see :meth:`xlab.model.Transformer.hidden`), then the fused :func:`linear_cross_entropy` when the
    model's logits are a linear map of the hidden states, soft-capped or not (XLab's Transformer:
    ``lm_head`` and ``cfg.logit_softcap``), else :func:`chunked_cross_entropy` over ``model.head``.
    """
    h = model.hidden(inputs) if doc_ids is None else model.hidden(inputs, doc_ids=doc_ids)
    lm_head = getattr(model, "lm_head", None)
    cfg = getattr(model, "cfg", None)
    if isinstance(lm_head, torch.nn.Linear) and cfg is not None:
        return linear_cross_entropy(
            h, lm_head.weight, lm_head.bias, targets, chunk_tokens, ignore_index, softcap=cfg.logit_softcap
        )
    return chunked_cross_entropy(h, model.head, targets, chunk_tokens, ignore_index)
