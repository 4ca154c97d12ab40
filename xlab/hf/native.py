"""Which transformers class expresses an XLab model exactly, and its weights in that class's layout.

One function per architecture maps XLab's state dict (``blocks.i.attn.qkv.weight``, ...) to the
class's names and configuration; :func:`architecture` chooses among them per option (the table in
docs/export.md). A model no class expresses exactly is exported with XLab's own remote code
(:mod:`xlab.hf.remote`), whose parameter names are XLab's.

Exactness notes, the reason behind each choice:
  - GPT-2 adds learned position embeddings to the token embeddings once, as XLab adds its sinusoidal
    table to the scaled embeddings: the table goes into ``wpe`` and the scale sqrt(d_model) is folded
    into ``wte`` (so the head, which reads the unscaled embedding when tied, is stored untied).
  - Weight-free parts are written as the identity: zero biases where the class has biases that XLab's
    ``bias: false`` lacks, weights of ones for the QK-norm of Qwen3.
  - Qwen3's QK-norm uses the layers' eps (1e-5) where XLab's uses 1e-6. rms_norm(s x, eps) equals
    rms_norm(x, eps / s**2), so the query and key projections are scaled by s = sqrt(10): exact.
  - XLab's rotary layout is the half-split one, transformers' ``rotate_half``: no permutation.
"""

from __future__ import annotations

import math

from xlab.config import ModelConfig

QK_NORM_EPS, LAYER_EPS = 1e-6, 1e-5
NON_GATED = ("gelu", "relu", "relu2")  # transformers' ACT2FN names are XLab's: gelu is the exact (erf) one


def architecture(mc: ModelConfig) -> tuple[str, str]:
    """``(name, why)``: the transformers architecture that computes exactly what ``mc`` computes
    (``gpt2``, ``llama``, ``qwen3``, ``arcee``, ``starcoder2``), or ``xlab`` (remote code) with the
    option no class expresses."""
    act, pos, norm = str(mc.activation), str(mc.position), str(mc.norm)
    if mc.bias:
        return "xlab", "model.bias=true gives the output head a bias, which these classes' heads lack"
    if mc.logit_softcap is not None:
        return "xlab", "model.logit_softcap (the classes with a soft cap differ elsewhere)"
    mha = mc.kv_heads == mc.n_heads
    if norm == "layernorm" and pos in ("learned", "sinusoidal") and act in NON_GATED and not mc.qk_norm and mha:
        return "gpt2", ""
    if pos == "rope" and not mc.qk_norm:
        if norm == "rmsnorm":
            return ("llama", "") if act == "swiglu" else ("arcee", "")
        if act in NON_GATED:
            return "starcoder2", ""
    if pos == "rope" and mc.qk_norm and norm == "rmsnorm" and act == "swiglu":
        return "qwen3", ""
    return "xlab", f"model.norm={norm} with position={pos}, activation={act}, qk_norm={mc.qk_norm}"


def _split_qkv(mc: ModelConfig, w):
    D = mc.d_model // mc.n_heads
    return w.split([mc.n_heads * D, mc.kv_heads * D, mc.kv_heads * D], dim=0)


def _common(mc: ModelConfig, special: dict) -> dict:
    return {"vocab_size": mc.vocab_size, "torch_dtype": "float32", "use_cache": True, **special}


def _gpt2(mc: ModelConfig, sd: dict, special: dict, sinusoidal_table) -> tuple[dict, dict]:
    import torch

    C, sinus = mc.d_model, str(mc.position) == "sinusoidal"
    zeros = lambda n: torch.zeros(n)  # noqa: E731 - GPT-2's biases where XLab has none
    out = {"transformer.wte.weight": sd["tok_emb.weight"] * (math.sqrt(C) if sinus else 1.0)}
    out["transformer.wpe.weight"] = sinusoidal_table(mc.max_len, C) if sinus else sd["pos_emb.weight"]
    for i in range(mc.n_layers):
        p, q = f"blocks.{i}.", f"transformer.h.{i}."
        for x, y in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[q + y + ".weight"] = sd[p + x + ".weight"]
            out[q + y + ".bias"] = zeros(C)
        for x, y in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("ffn.fc", "mlp.c_fc"),
                     ("ffn.proj", "mlp.c_proj")):  # fmt: skip
            w = sd[p + x + ".weight"]
            out[q + y + ".weight"] = w.t().contiguous()  # GPT-2's Conv1D stores (in, out)
            out[q + y + ".bias"] = zeros(w.shape[0])
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["norm_f.weight"], zeros(C)
    tie = mc.tie_embeddings and not sinus
    if not tie:
        out["lm_head.weight"] = sd["lm_head.weight"]
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": C, "n_layer": mc.n_layers,
        "n_head": mc.n_heads, "n_inner": mc.d_ff, "n_positions": mc.max_len, "n_ctx": mc.max_len,
        "activation_function": str(mc.activation), "layer_norm_epsilon": LAYER_EPS, "resid_pdrop": 0.0,
        "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True, "tie_word_embeddings": tie,
    }  # fmt: skip
    return _common(mc, special) | config, out


def _llama_family(mc: ModelConfig, sd: dict, special: dict, arch: str) -> tuple[dict, dict]:
    """Llama, Qwen3 (Llama with QK-norm), Arcee (Llama with a non-gated MLP) and StarCoder2
    (LayerNorm, non-gated ``c_fc``/``c_proj``): the same attention names and rotary layout."""
    import torch

    C, D = mc.d_model, mc.d_model // mc.n_heads
    s = math.sqrt(LAYER_EPS / QK_NORM_EPS) if arch == "qwen3" else 1.0
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"]}
    layernorm = arch == "starcoder2"

    def norm(src: str, dst: str) -> None:
        out[dst + ".weight"] = sd[src + ".weight"]
        if layernorm:
            out[dst + ".bias"] = torch.zeros(C)

    for i in range(mc.n_layers):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        norm(p + "norm1", q + "input_layernorm")
        norm(p + "norm2", q + "post_attention_layernorm")
        wq, wk, wv = _split_qkv(mc, sd[p + "attn.qkv.weight"])
        out[q + "self_attn.q_proj.weight"] = wq * s
        out[q + "self_attn.k_proj.weight"] = wk * s
        out[q + "self_attn.v_proj.weight"] = wv.contiguous()
        out[q + "self_attn.o_proj.weight"] = sd[p + "attn.proj.weight"]
        if arch == "qwen3":
            out[q + "self_attn.q_norm.weight"] = torch.ones(D)
            out[q + "self_attn.k_norm.weight"] = torch.ones(D)
        fc, proj = sd[p + "ffn.fc.weight"], sd[p + "ffn.proj.weight"]
        if arch in ("llama", "qwen3"):
            gate, up = fc.chunk(2, dim=0)
            out[q + "mlp.gate_proj.weight"], out[q + "mlp.up_proj.weight"] = gate.contiguous(), up.contiguous()
            out[q + "mlp.down_proj.weight"] = proj
        elif arch == "arcee":
            out[q + "mlp.up_proj.weight"], out[q + "mlp.down_proj.weight"] = fc, proj
        else:
            out[q + "mlp.c_fc.weight"], out[q + "mlp.c_proj.weight"] = fc, proj
    norm("norm_f", "model.norm")
    if not mc.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    classes = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "arcee": "ArceeForCausalLM",
               "starcoder2": "Starcoder2ForCausalLM"}  # fmt: skip
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    config = {
        "architectures": [classes[arch]], "model_type": arch, "hidden_size": C, "intermediate_size": mc.d_ff,
        "num_hidden_layers": mc.n_layers, "num_attention_heads": mc.n_heads, "num_key_value_heads": mc.kv_heads,
        "head_dim": D, "max_position_embeddings": mc.max_len, "rope_parameters": rope, "rope_theta": 10000.0,
        "attention_dropout": 0.0, "tie_word_embeddings": bool(mc.tie_embeddings),
    }  # fmt: skip
    if layernorm:
        config |= {"norm_epsilon": LAYER_EPS, "use_bias": False, "hidden_act": str(mc.activation),
                   "residual_dropout": 0.0, "embedding_dropout": 0.0, "sliding_window": None}  # fmt: skip
    else:
        act = "silu" if arch in ("llama", "qwen3") else str(mc.activation)
        config |= {"rms_norm_eps": LAYER_EPS, "hidden_act": act, "attention_bias": False, "mlp_bias": False}
    if arch == "qwen3":
        config |= {"use_sliding_window": False, "sliding_window": None}
    return _common(mc, special) | config, out


def _remote(mc: ModelConfig, sd: dict, special: dict) -> tuple[dict, dict]:
    out = {k: v.clone() if k == "lm_head.weight" and mc.tie_embeddings else v for k, v in sd.items()}
    config = {
        "architectures": ["XLabForCausalLM"], "model_type": "xlab",
        "auto_map": {"AutoConfig": "configuration_xlab.XLabConfig",
                     "AutoModelForCausalLM": "modeling_xlab.XLabForCausalLM"},
        "hidden_size": mc.d_model, "num_hidden_layers": mc.n_layers, "num_attention_heads": mc.n_heads,
        "num_key_value_heads": mc.kv_heads, "intermediate_size": mc.d_ff, "max_position_embeddings": mc.max_len,
        "norm": str(mc.norm), "activation": str(mc.activation), "position": str(mc.position), "bias": bool(mc.bias),
        "qk_norm": bool(mc.qk_norm), "logit_softcap": mc.logit_softcap, "tie_word_embeddings": False,
    }  # fmt: skip
    return _common(mc, special) | config, out


def convert(mc: ModelConfig, state_dict: dict, special: dict) -> tuple[str, dict, dict]:
    """``(architecture, config.json dict, tensors)`` of an XLab model for transformers.

    Args:
        mc: the model's checked :class:`ModelConfig`.
        state_dict: XLab's state dict (CPU tensors).
        special: ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` (the tokenizer's).

    Returns:
        The tensors are float32, contiguous and share no memory (safetensors' requirement).
    """
    from xlab.attention import sinusoidal_table

    sd = {k: v.detach().float().cpu() for k, v in state_dict.items()}
    arch, _ = architecture(mc)
    if arch == "gpt2":
        config, out = _gpt2(mc, sd, special, sinusoidal_table)
    elif arch == "xlab":
        config, out = _remote(mc, sd, special)
    else:
        config, out = _llama_family(mc, sd, special, arch)
    # Own copies: safetensors refuses tensors that share memory (tied weights, views of one q/k/v matrix).
    return arch, config, {k: v.contiguous().clone() for k, v in out.items()}
