"""An XLab decoder for transformers (``trust_remote_code=True``): the same computation as XLab's
``Transformer``, written out so that it imports nothing from XLab.

Pre-norm blocks (LayerNorm or RMSNorm, eps 1e-5) and a final norm; a fused q/k/v projection with
optional grouped-query heads and weight-free QK-norm (eps 1e-6, before rotary); exact-GELU, ReLU,
ReLU² or SwiGLU feed-forward; sinusoidal (token embeddings scaled by sqrt(d_model)), learned or rotary
(half-split) positions; an output head with an optional bias and an optional tanh soft cap. The
parameter names are XLab's, so the weights are XLab's state dict unchanged.

Positions follow ``position_ids`` when given (left-padded batches), else they count from the cache's
length; at most ``max_position_embeddings`` positions, as in XLab.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_xlab import XLabConfig

# transformers renamed the cache in its outputs from ``past_key_values`` to ``cache``.
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def sinusoidal_table(max_len, d_model):
    """PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)), float32 (max_len, d)."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    inv_freq = torch.pow(10000.0, -torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    angles = pos * inv_freq
    pe = torch.zeros(max_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = angles.sin()
    pe[:, 1::2] = angles.cos()[:, : d_model // 2]
    return pe.float()


def rope_tables(max_len, head_dim, base=10000.0):
    """cos and sin, float32 (max_len, D/2), with frequencies base^(-2i/D)."""
    inv_freq = torch.pow(base, -torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """Rotate x (B, T, H, D): pair (x[i], x[i + D/2]) by the angle of pair i; cos, sin (B, T, D/2)."""
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _norm(config):
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.hidden_size, eps=1e-5)
    return nn.LayerNorm(config.hidden_size, eps=1e-5, bias=config.bias)


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qk_norm = config.qk_norm
        n_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv = nn.Linear(config.hidden_size, n_out, bias=config.bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)

    def forward(self, x, rope, cache, layer, mask):
        B, T, C = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, K * D, K * D], dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, K, D), v.view(B, T, K, D)
        if self.qk_norm:
            q, k = F.rms_norm(q, (D,), eps=1e-6), F.rms_norm(k, (D,), eps=1e-6)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, layer)
        if K != H:
            k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
        S = k.shape[2]
        causal = mask is None and T == S and T > 1
        if mask is None and T != S and T > 1:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.activation = config.activation
        n_in = 2 * config.intermediate_size if config.activation == "swiglu" else config.intermediate_size
        self.fc = nn.Linear(config.hidden_size, n_in, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.bias)

    def forward(self, x):
        h = self.fc(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.activation == "relu":
            h = F.relu(h)
        elif self.activation == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h)
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1, self.attn = _norm(config), SelfAttention(config)
        self.norm2, self.ffn = _norm(config), FeedForward(config)

    def forward(self, x, rope, cache, layer, mask):
        x = x + self.attn(self.norm1(x), rope, cache, layer, mask)
        return x + self.ffn(self.norm2(x))


class XLabPreTrainedModel(PreTrainedModel):
    config_class = XLabConfig
    base_model_prefix = "xlab"
    _no_split_modules = ["Block"]
    _supports_cache_class = True
    _supports_sdpa = True

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class XLabForCausalLM(XLabPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        C = config.hidden_size
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        self.pos_emb = nn.Embedding(config.max_position_embeddings, C) if config.position == "learned" else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm_f = _norm(config)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=config.bias)
        self.emb_scale = math.sqrt(C) if config.position == "sinusoidal" else 1.0
        self._tables = {}  # fixed position tables per device, built on first use (never stored)
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_emb

    def set_input_embeddings(self, value):
        self.tok_emb = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _table(self, device):
        if device not in self._tables:
            c = self.config
            if c.position == "sinusoidal":
                t = (sinusoidal_table(c.max_position_embeddings, c.hidden_size).to(device),)
            else:
                t = tuple(x.to(device) for x in rope_tables(c.max_position_embeddings, c.head_dim))
            self._tables[device] = t
        return self._tables[device]

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        cache=None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        x = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
        if int(position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(
                f"positions reach {int(position_ids.max())}, beyond max_len {self.config.max_position_embeddings}"
            )
        if self.emb_scale != 1.0:
            x = x * self.emb_scale
        rope = None
        if self.config.position == "sinusoidal":
            x = x + self._table(x.device)[0][position_ids]
        elif self.config.position == "learned":
            x = x + self.pos_emb.weight[position_ids]
        else:
            cos, sin = self._table(x.device)
            rope = (cos[position_ids], sin[position_ids])
        mask = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            S = past + T
            keys = attention_mask[:, -S:].bool()[:, None, None, :]  # (B, 1, 1, S)
            causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            mask = causal[None, None] & keys
            mask = mask | ~mask.any(-1, keepdim=True)  # a padding query sees every key (its output is unused)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, i, mask)
        logits = self.lm_head(self.norm_f(x))
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
