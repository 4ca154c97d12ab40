"""The XLab decoder: a GPT-style, decoder-only transformer (Vaswani et al. 2017, arXiv:1706.03762).

The defaults reproduce the original XLab architecture:

- pre-norm: a LayerNorm before each sublayer, plus one final norm after the last block (the original
  found this better for loss and stability than the post-norm of the 2017 paper);
- GELU in the feed-forward sublayer;
- dropout only on the attention probabilities and on the feed-forward hidden activations (nowhere on
  the embeddings or the residual stream);
- fixed sinusoidal positional encodings (learned ones did worse in the original setup);
- biases everywhere, untied input and output embeddings, an output head with a bias.

The original's listed future work is available as configuration (:class:`ModelConfig`): RMSNorm, SwiGLU
or ReLU, learned or rotary positions, tied embeddings, no biases, grouped-query attention, and four
attention backends (SDPA, flash-attn, FlexAttention, an explicit reference: :mod:`xlab.attention`),
each with a document mask for rows that pack several articles (``doc_ids``).
So are the ingredients of today's fast small-model recipes (modded-nanogpt, nanochat; see
``conf/recipe/modern.yaml``): QK-norm (queries and keys RMS-normalised per head, Dehghani et al. 2023,
arXiv:2302.05442, without learned gains), ReLU² (So et al. 2021, "Primer", arXiv:2109.08668),
zero-initialised residual projections, and tanh soft-capped logits (Gemma 2, arXiv:2408.00118).

Initialization (see ``Transformer._init_weights``): every matrix N(0, 0.02), biases zero, norms at
identity, and the two projections that write into the residual stream (attention output and
feed-forward output) N(0, 0.02 / sqrt(2 * n_layers)), as in GPT-2 (Radford et al. 2019, section 2.3),
so the residual stream's variance does not grow with depth.

The token embedding and the fixed sinusoidal table must start on the same scale, because the first
norm divides their sum by its RMS and only the ratio of the two survives. The original XLab drew
embeddings from N(0, 1) and scaled them by sqrt(d_model) (std 22.6 at d_model 512) against encodings
of RMS 0.71, so positions were ~30 times too faint to see. The opposite mistake (GPT-2's N(0, 0.02)
embeddings next to the same table) hides the tokens instead: measured on the demo, the model sat at the
unigram loss for its first ~200 steps while Adam grew the embeddings. With sinusoidal positions XLab
therefore follows Vaswani et al. (2017, section 3.4) as intended: embeddings N(0, 1/d_model),
multiplied by sqrt(d_model), so tokens enter with unit RMS next to positions of RMS 0.71. With learned
or rotary positions the embedding is GPT-2's N(0, 0.02), unscaled.

Shapes in comments: B batch, T new tokens, S keys (cached + new), C = d_model, H query heads,
K key/value heads, D = C // H head size, V vocabulary size.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from xlab.attention import (
    DocumentMask,
    apply_rope,
    attention,
    check_flash_available,
    document_positions,
    rope_tables,
    sinusoidal_table,
)
from xlab.config import ModelConfig

__all__ = ["ModelConfig", "Transformer", "KVCache"]

INIT_STD = 0.02  # GPT-2's initializer range


# ----------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of the tokens seen so far, for incremental decoding.

    Storage: ``k`` and ``v`` of shape (n_layers, B, K, max_len, D), preallocated, so decoding a token
    writes in place instead of concatenating. With grouped-query attention only the K key/value heads
    are stored, which is what makes GQA cheap at inference.

    Attributes:
        length: tokens cached so far (the position of the next token).
        max_len: capacity in tokens (the model's ``max_len``).

    Create it with :meth:`Transformer.new_cache`; pass it to ``model(ids, cache=cache)``; the model
    advances ``length`` after each call.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        device: Any = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (LongTensor (B_new,)), in that order; rows may repeat.

        Beam search uses this to follow surviving beams, and to grow a batch of 1 prompt into
        ``beam_width`` rows after the prefill.
        """
        index = index.to(self.k.device)
        if self.k.requires_grad or self.v.requires_grad:
            # A cache filled with autograd on (outside inference_mode) holds graph tensors, which the
            # out= copy below cannot take.
            self.k, self.v = self.k.index_select(1, index), self.v.index_select(1, index)
            return
        # Copy only the cached positions: the rest of the capacity is written before it is read, and
        # copying all of it would cost beam search as much per step as the weights' reads.
        n = self.length
        shape = (self.k.shape[0], index.numel(), *self.k.shape[2:])
        k, v = self.k.new_empty(shape), self.v.new_empty(shape)
        torch.index_select(self.k[:, :, :, :n], 1, index, out=k[:, :, :, :n])
        torch.index_select(self.v[:, :, :, :n], 1, index, out=v[:, :, :, :n])
        self.k, self.v = k, v

    def _check(self, batch_size: int, n_new: int) -> None:
        if batch_size != self.batch_size:
            raise ValueError(f"batch of {batch_size} rows does not match the cache's {self.batch_size}")
        if self.length + n_new > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} cached + {n_new} new tokens > max_len {self.max_len}")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values (B, K, T, D) of ``layer`` at ``length`` and return all of them
        (B, K, length + T, D). ``length`` itself is advanced by the model after the last layer."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# ----------------------------------------------------------------------------------------------------
# Blocks


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=1e-5)
    return nn.LayerNorm(cfg.d_model, eps=1e-5, bias=cfg.bias)


class SelfAttention(nn.Module):
    """Causal self-attention with a fused q/k/v projection and optional grouped-query heads."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.backend = cfg.attention
        self.dropout = cfg.dropout
        self.qk_norm = cfg.qk_norm
        # One matmul for q, k and v: (C) -> (H + 2K) * D. Same parameters as three projections.
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)  # writes into the residual stream

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]],
        cache: Optional[KVCache],
        layer: int,
        docs: Optional[DocumentMask] = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, K * D, K * D], dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, K, D), v.view(B, T, K, D)
        if self.qk_norm:  # unit RMS per head, so the scores' scale no longer grows with the weights
            q, k = F.rms_norm(q, (D,), eps=1e-6), F.rms_norm(k, (D,), eps=1e-6)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, T, D)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, K, S, D)
            # a cache kept in another dtype than the activations (e.g. fp32 under autocast)
            k, v = k.to(q.dtype), v.to(q.dtype)
        y = attention(q, k, v, backend=self.backend, dropout_p=self.dropout if self.training else 0.0, docs=docs)
        return self.proj(y.reshape(B, T, C))  # (B, T, H, D) -> (B, T, C)


class FeedForward(nn.Module):
    """Position-wise feed-forward: C -> d_ff -> C with GELU, ReLU or ReLU² (relu(x)^2, Primer), or
    SwiGLU (Shazeer 2020, arXiv:2002.05202): silu(x W1) * (x W3), then W2.

    For SwiGLU ``d_ff`` stays the hidden width, so its feed-forward has 1.5x the parameters of GELU at
    the same ``d_ff``; for parameter parity set d_ff to about 2/3 of the GELU value (as LLaMA does).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.activation = cfg.activation
        n_in = 2 * cfg.d_ff if cfg.activation == "swiglu" else cfg.d_ff  # swiglu: W1 and W3 fused
        self.fc = nn.Linear(cfg.d_model, n_in, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)  # writes into the residual stream
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, T, d_ff) or (B, T, 2 d_ff)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.activation == "relu":
            h = F.relu(h)
        elif self.activation == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h)  # exact (erf) GELU, as the original
        return self.proj(self.dropout(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = _norm(cfg)
        self.attn = SelfAttention(cfg)
        self.norm2 = _norm(cfg)
        self.ffn = FeedForward(cfg)

    def forward(self, x, rope, cache, layer, docs=None):
        x = x + self.attn(self.norm1(x), rope, cache, layer, docs)
        return x + self.ffn(self.norm2(x))


# ----------------------------------------------------------------------------------------------------
# The model


def _as_model_config(cfg: ModelConfig | dict) -> ModelConfig:
    """A checked :class:`ModelConfig` from a ModelConfig, a plain dict or an OmegaConf ``cfg.model``."""
    c = cfg if isinstance(cfg, ModelConfig) else ModelConfig(**dict(cfg))
    return c.check()


class Transformer(nn.Module):
    """Decoder-only transformer language model.

    ``forward(ids) == head(hidden(ids))``; the trainer calls the two halves separately to compute the
    loss over a few positions at a time instead of materializing all (B, T, V) logits.

    Args:
        cfg: a :class:`ModelConfig` (or a mapping with its fields, e.g. ``cfg.model``).

    Raises:
        XLabError: inconsistent sizes or an unknown option; ``attention=flash_attn`` without the
            flash-attn package.
    """

    def __init__(self, cfg: ModelConfig | Any) -> None:
        super().__init__()
        cfg = _as_model_config(cfg)
        if cfg.attention == "flash_attn":
            check_flash_available()  # fail at construction, not at the first batch
        self.cfg = cfg
        C = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        self.pos_emb = nn.Embedding(cfg.max_len, C) if cfg.position == "learned" else None
        # Fixed tables are non-persistent buffers: rebuilt from the config, never stored in checkpoints.
        if cfg.position == "sinusoidal":
            self.register_buffer("pe", sinusoidal_table(cfg.max_len, C), persistent=False)
        if cfg.position == "rope":
            cos, sin = rope_tables(cfg.max_len, C // cfg.n_heads)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = _norm(cfg)
        self.lm_head = nn.Linear(C, cfg.vocab_size, bias=cfg.bias)
        # Vaswani et al. 2017, section 3.4: see the module docstring (Initialization).
        self.emb_scale = math.sqrt(C) if cfg.position == "sinusoidal" else 1.0
        self._init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # (V, C) shared; both were drawn N(0, 0.02)

    def _init_weights(self) -> None:
        """N(0, 0.02) for matrices and embeddings; zero biases; norms at identity (their default).
        The two projections per block that write into the residual stream get std 0.02 / sqrt(2 L)
        (GPT-2): the stream is a sum of 2 L such terms, so its variance stays O(1) at any depth.
        With sinusoidal positions the token embedding is N(0, 1/d_model) instead, scaled by
        sqrt(d_model) in :meth:`hidden` (unit RMS, on the scale of the fixed table). With
        ``zero_init_proj`` the two residual projections start at zero instead, so every block starts
        as the identity (as modded-nanogpt and nanochat do); their gradients are not zero, so they
        leave zero at the first step."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=INIT_STD)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=INIT_STD)
        if self.emb_scale != 1.0:
            nn.init.normal_(self.tok_emb.weight, std=1.0 / self.emb_scale)
        residual_std = INIT_STD / math.sqrt(2 * self.cfg.n_layers)
        for block in self.blocks:
            for proj in (block.attn.proj, block.ffn.proj):
                if self.cfg.zero_init_proj:
                    nn.init.zeros_(proj.weight)
                else:
                    nn.init.normal_(proj.weight, std=residual_std)

    # -- forward -------------------------------------------------------------------------------------

    def new_cache(self, batch_size: int, device: Any = None, dtype: Optional[torch.dtype] = None) -> KVCache:
        """An empty :class:`KVCache` for ``batch_size`` rows and ``cfg.max_len`` tokens.

        Device: the model's unless given. Dtype: unless given, the autocast dtype when called under
        autocast (keys and values are computed in it, so the cache then needs no conversion at every
        step), else the parameter dtype.
        """
        p = self.lm_head.weight
        c = self.cfg
        device = p.device if device is None else torch.device(device)
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else p.dtype
        return KVCache(
            c.n_layers, batch_size, c.kv_heads, c.max_len, c.d_model // c.n_heads, device=device, dtype=dtype
        )

    def hidden(
        self, ids: torch.Tensor, cache: Optional[KVCache] = None, doc_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Final-normed hidden states.

        Args:
            ids: LongTensor (B, T) of token ids.
            cache: a :class:`KVCache`; the ids then continue the cached tokens (positions start at
                ``cache.length``), their keys/values are appended and ``cache.length`` grows by T.
            doc_ids: LongTensor (B, T), non-decreasing along T, for rows that pack several documents:
                attention stays inside each document (:class:`DocumentMask`) and positions restart at
                each document's first token (:func:`document_positions`), so every document is
                processed exactly as if it were alone in its row. None: one sequence per row.

        Returns:
            (B, T, d_model), in the parameter dtype (or the autocast dtype).

        Raises:
            ValueError: more than ``max_len`` positions in all (a cache overflow included), a batch
                size that differs from the cache's, or ``doc_ids`` with a cache or of another shape.
        """
        B, T = ids.shape
        start = 0
        docs = pos = None
        if doc_ids is not None:
            if cache is not None or doc_ids.shape != ids.shape:
                raise ValueError(f"doc_ids must be (B, T) = {tuple(ids.shape)} and come without a cache")
            docs = DocumentMask(doc_ids)
            pos = document_positions(doc_ids)  # (B, T)
        if cache is not None:
            cache._check(B, T)
            start = cache.length
        elif T > self.cfg.max_len:
            raise ValueError(f"sequence of {T} tokens is longer than max_len {self.cfg.max_len}")
        x = self.tok_emb(ids)  # (B, T, C)
        if self.emb_scale != 1.0:
            x = x * self.emb_scale
        rope = None
        at = slice(start, start + T) if pos is None else pos  # rows of the position tables: (T,) or (B, T)
        if self.cfg.position == "sinusoidal":
            x = x + self.pe[at]  # (T, C) broadcast over B, or (B, T, C)
        elif self.cfg.position == "learned":
            x = x + self.pos_emb.weight[at]
        else:
            rope = (self.rope_cos[at], self.rope_sin[at])  # (T, D/2) or (B, T, D/2) each
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, i, docs)
        if cache is not None:
            cache.length += T
        return self.norm_f(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of hidden states (..., d_model); with ``logit_softcap`` c, c * tanh(z / c),
        which keeps every logit inside (-c, c) (Gemma 2) and so bounds how confident the model can be."""
        z = self.lm_head(h)
        cap = self.cfg.logit_softcap
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        return z

    def forward(
        self, ids: torch.Tensor, cache: Optional[KVCache] = None, doc_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Next-token logits (B, T, V) for ids (B, T); float32 unless under autocast. See :meth:`hidden`."""
        return self.head(self.hidden(ids, cache, doc_ids))

    # -- accounting ----------------------------------------------------------------------------------

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Number of parameters (tied weights counted once).

        ``non_embedding=True`` counts what the transformer's depth adds (Kaplan et al. 2020,
        arXiv:2001.08361): the blocks, the final norm and the head's bias. It leaves out the token
        embedding, the learned position table and the head's V x C matrix, whether that matrix is
        tied to the embedding or not, so tied and untied models of the same shape report the same
        count.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward), for MFU.

        6 N + 12 L C T, following PaLM (Chowdhery et al. 2022, arXiv:2204.02311, appendix B) and
        Chinchilla (Hoffmann et al. 2022, appendix F): 2 FLOPs per weight per token forward, twice that
        backward; plus the attention scores and weighted sum, 2 * 2 * T * C per layer forward (the full
        T x T square, as PaLM counts it, not halved for the causal mask), times 3 for training.

        N counts every weight that takes part in a matrix multiply: the non-embedding parameters plus
        the output head's V x C matrix (tied or not). The token/position lookups are gathers, not
        matmuls, so they are left out. T is ``seq_len`` (default ``cfg.max_len``).
        """
        c = self.cfg
        n = self.num_parameters(non_embedding=True) + self.lm_head.weight.numel()
        t = c.max_len if seq_len is None else seq_len
        return 6.0 * n + 12.0 * c.n_layers * c.d_model * t

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.cfg).items())
