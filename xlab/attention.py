"""Attention for the XLab decoder (:mod:`xlab.model`): which keys each query sees, where they are, and
the kernels that compute it.

- :func:`attention`: causal multi-head attention with one of four backends: PyTorch SDPA (``sdpa``),
  the flash-attn package (``flash_attn``, its varlen kernel for packed rows), torch's FlexAttention
  (``flex``) and an explicit reference (``math``), which defines the right answer.
- :class:`DocumentMask`: rows that pack several documents (articles) back to back carry ``doc_ids``
  (B, T); the mask gives each backend the form it takes, so attention stays inside each document.
- Positions: the fixed sinusoidal table, rotary embeddings (applied to queries and keys), and
  :func:`document_positions`, which restarts positions at each document's first token.

Shapes: B batch, T new tokens, S keys (cached + new), C = d_model, H query heads, K key/value heads,
D = C // H head size.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from xlab.config import Attention
from xlab.errors import XLabError

__all__ = [
    "DocumentMask",
    "apply_rope",
    "attention",
    "check_flash_available",
    "document_positions",
    "refuse_flex_training",
    "rope_tables",
    "sinusoidal_table",
]

FLEX_TRAINS_ONLY_ON_CUDA = (
    "model.attention=flex trains only on CUDA (torch's FlexAttention has no CPU backward); "
    "use model.attention=sdpa on CPU"
)


def refuse_flex_training(device: torch.device | str) -> None:
    """Refuse to train the ``flex`` backend on ``device`` unless it is CUDA.

    One check for the trainer (before the run folder exists) and the model (at the first forward with
    gradients): torch's FlexAttention runs forward on CPU but has no CPU backward.

    Raises:
        XLabError: ``device`` is not a CUDA device.
    """
    if torch.device(device).type != "cuda":
        raise XLabError(FLEX_TRAINS_ONLY_ON_CUDA)


# ----------------------------------------------------------------------------------------------------
# Backends


def _flash_attn_func(name: str = "flash_attn_func"):
    """``flash_attn_func`` or ``flash_attn_varlen_func`` of the flash-attn package.

    Raises:
        XLabError: the package is not installed.
    """
    try:
        import flash_attn
    except ImportError:
        raise XLabError(
            "model.attention=flash_attn needs the flash-attn package (CUDA only): pip install -e '.[flash]' "
            "in a clone of XLab, pip install 'xlabml[flash]' otherwise; or use model.attention=sdpa"
        ) from None
    return getattr(flash_attn, name)


def check_flash_available() -> None:
    """Fail early (at model construction, not at the first batch) when ``flash_attn`` cannot run.

    Raises:
        XLabError: the flash-attn package is not installed.
    """
    _flash_attn_func()


def _check_flash_inputs(q: torch.Tensor) -> None:
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise XLabError("model.attention=flash_attn runs only on CUDA in bf16/fp16; use model.attention=sdpa")


_compiled_flex = None


def _flex_attention():
    """torch's ``flex_attention``: compiled on first use on CUDA (eager flex materialises every score,
    and is only a reference), eager on CPU, where torch runs its forward but has no backward."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None and torch.cuda.is_available():
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex or flex_attention


class DocumentMask:
    """Which keys each query may see when a row packs several documents (articles) back to back.

    Built once per forward from ``doc_ids`` (B, T) int64, the document index of every position,
    non-decreasing along T (the loader counts the ``<sos>`` tokens of the row): query ``i`` sees key
    ``j <= i`` only when ``doc_ids[:, i] == doc_ids[:, j]``. Each backend gets the form its kernel
    takes, computed lazily and once for all layers:

    - ``dense()``: bool (B, 1, T, T), True = may attend, for ``sdpa`` and ``math``. With a mask SDPA on
      CUDA cannot use its FlashAttention kernel and runs the memory-efficient (xFormers-style) kernel,
      which reads the (B, 1, T, T) mask; it still skips no fully-masked block.
    - ``varlen()``: ``(cu_seqlens, max_seqlen)`` for flash-attn's ``flash_attn_varlen_func``: the
      rows flattened to B*T tokens cut into one sequence per (row, document), ``cu_seqlens`` int32
      (n_docs + 1,) their cumulative lengths (Dao 2023, FlashAttention-2, "variable length").
    - ``block_mask()``: a FlexAttention ``BlockMask`` (Dong et al. 2024, arXiv:2412.05496) that skips
      every 128x128 block of scores lying outside all documents.
    """

    def __init__(self, doc_ids: torch.Tensor) -> None:
        if doc_ids.dim() != 2:
            raise ValueError(f"doc_ids must be (B, T), got shape {tuple(doc_ids.shape)}")
        self.doc_ids = doc_ids
        self._dense = self._varlen = self._block = None

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            d = self.doc_ids
            T = d.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=d.device).tril()
            self._dense = (causal[None] & (d[:, :, None] == d[:, None, :]))[:, None]  # (B, 1, T, T)
        return self._dense

    def varlen(self) -> tuple[torch.Tensor, int]:
        if self._varlen is None:
            B, T = self.doc_ids.shape
            # a document id unique over the whole batch: row b's documents follow row b - 1's
            glob = (self.doc_ids - self.doc_ids[:, :1]) + torch.arange(B, device=self.doc_ids.device)[:, None] * T
            _, counts = torch.unique_consecutive(glob.reshape(-1), return_counts=True)
            cu = torch.zeros(len(counts) + 1, dtype=torch.int32, device=self.doc_ids.device)
            cu[1:] = counts.cumsum(0)
            self._varlen = (cu, T)  # T bounds every document's length, and needs no device sync
        return self._varlen

    def block_mask(self, H: int):
        if self._block is None:
            from torch.nn.attention.flex_attention import create_block_mask

            d = self.doc_ids
            B, T = d.shape

            def document_causal(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (d[b, q_idx] == d[b, kv_idx])

            self._block = create_block_mask(document_causal, B, None, T, T, device=d.device)
        return self._block


def _causal_block_mask(T: int, S: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = S - T  # bottom-right alignment, as everywhere in :func:`attention`

    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return create_block_mask(causal, None, None, T, S, device=device)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: Attention | str = Attention.sdpa,
    dropout_p: float = 0.0,
    docs: Optional[DocumentMask] = None,
) -> torch.Tensor:
    """Causal multi-head attention, softmax(q k^T / sqrt(D)) v, for the last T of S positions.

    Args:
        q: (B, H, T, D) queries of the T newest positions.
        k, v: (B, K, S, D) keys and values of all S >= T positions (cached ones first); K divides H
            (K < H: grouped-query attention, query head h reads key/value head h // (H // K)).
        backend: ``sdpa`` (torch's scaled_dot_product_attention, which picks FlashAttention-2 on CUDA
            with bf16/fp16 and no document mask), ``flash_attn`` (the flash-attn package; CUDA,
            bf16/fp16), ``flex`` (torch's FlexAttention, compiled on CUDA; forward only on CPU) or
            ``math`` (explicit reference, softmax in float32), which defines the right answer.
        dropout_p: dropout on the attention probabilities (pass 0 in evaluation; ``flex`` has none).
        docs: a :class:`DocumentMask` for rows packing several documents (T == S, no cache): queries
            see only earlier keys of their own document.

    Returns:
        (B, T, H, D), ready to be merged into (B, T, C).

    The mask is causal and aligned bottom-right: query i (absolute position S - T + i) sees keys
    0..S - T + i. SDPA's ``is_causal=True`` aligns top-left, which is right only when T == S, so a
    decoding step with a cache (T < S) gets an explicit mask (or none when T == 1: the newest query
    may see every key).

    Raises:
        XLabError: ``flash_attn`` without the package, or on CPU / in float32; ``flex`` with
            gradients on CPU or with dropout.
        ValueError: a document mask with T != S.
    """
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    if docs is not None and T != S:
        raise ValueError(f"a document mask needs T == S (no KV cache), got T={T}, S={S}")
    if backend == "flash_attn":
        _check_flash_inputs(q)
        # flash-attn wants (B, T, H, D); transposing back is a view (last dim stays contiguous). Its
        # causal mask is aligned bottom-right when T < S (flash-attn >= 2.1), and it handles K < H.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if docs is None:
            return _flash_attn_func()(q, k, v, dropout_p=dropout_p, causal=True)
        cu, max_len = docs.varlen()
        y = _flash_attn_func("flash_attn_varlen_func")(
            q.reshape(B * T, H, D),
            k.reshape(B * T, K, D),
            v.reshape(B * T, K, D),
            cu,
            cu,
            max_len,
            max_len,
            dropout_p=dropout_p,
            causal=True,
        )  # (B*T, H, D)
        return y.view(B, T, H, D)
    if backend == "flex":
        if torch.is_grad_enabled() and q.requires_grad:
            refuse_flex_training(q.device)
        if dropout_p > 0:
            raise XLabError("model.attention=flex has no attention dropout: set model.dropout=0 or use sdpa")
        block = docs.block_mask(H) if docs is not None else _causal_block_mask(T, S, q.device)
        with warnings.catch_warnings():  # eager flex on CPU is the known reference path, not a mistake
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            y = _flex_attention()(q, k, v, block_mask=block, enable_gqa=K != H)  # (B, H, T, D)
        return y.transpose(1, 2)

    mask = None  # bool (T, S) or (B, 1, T, S), True = may attend; None with is_causal when T == S, or T == 1
    if docs is not None:
        mask = docs.dense()
    elif T != S and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    is_causal = mask is None and T == S and T > 1

    if backend == "sdpa":
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=K != H
        )  # (B, H, T, D)
        return y.transpose(1, 2)
    if backend == "math":
        if K != H:
            k = k.repeat_interleave(H // K, dim=1)  # (B, H, S, D)
            v = v.repeat_interleave(H // K, dim=1)
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(D)  # (B, H, T, S)
        if is_causal:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = F.dropout(scores.softmax(dim=-1), p=dropout_p, training=dropout_p > 0)
        y = probs @ v.float()  # (B, H, T, D)
        return y.to(q.dtype).transpose(1, 2)
    raise XLabError(f"unknown model.attention {backend!r}: use sdpa, flash_attn, flex or math")


# ----------------------------------------------------------------------------------------------------
# Positions


def sinusoidal_table(max_len: int, d_model: int) -> torch.Tensor:
    """The fixed encodings of Vaswani et al. (2017, section 3.5), float32 (max_len, d_model):
    PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d))."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]  # float64: exact angles at large p
    inv_freq = torch.pow(10000.0, -torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    angles = pos * inv_freq  # (max_len, ceil(d/2))
    pe = torch.zeros(max_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = angles.sin()
    pe[:, 1::2] = angles.cos()[:, : d_model // 2]
    return pe.float()


def rope_tables(max_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, float32 (max_len, D/2), of rotary position embeddings (Su et al. 2021,
    arXiv:2104.09864) with frequencies base^(-2i/D)."""
    inv_freq = torch.pow(base, -torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq  # (max_len, D/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by position: pairs (x[i], x[i + D/2]) are rotated by the angle of pair i
    (the half-split layout of GPT-NeoX, not the interleaved one of the paper; the two are equivalent
    up to a fixed permutation of the q/k weights). cos, sin: (T, D/2), or (B, T, D/2) when positions
    differ per row (packed documents)."""
    cos = cos.unsqueeze(-2).to(x.dtype)  # (T, 1, D/2) or (B, T, 1, D/2), broadcast over H (and B)
    sin = sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) int64 that restart at 0 where each document of a packed row begins.

    ``doc_ids`` (B, T), non-decreasing along T. The first segment of a row (an article continued from
    the row before) also starts at 0, as every window of the padded layout does.
    """
    B, T = doc_ids.shape
    t = torch.arange(T, device=doc_ids.device).expand(B, T)
    new = torch.ones_like(doc_ids, dtype=torch.bool)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.where(new, t, torch.zeros_like(t)).cummax(dim=1).values
    return t - start
