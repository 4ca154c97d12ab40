"""The configuration of an XLab decoder exported for transformers (``trust_remote_code=True``).

Self-contained: it imports only transformers. The fields are XLab's ``ModelConfig`` under the names
transformers uses where it has one (``hidden_size`` for ``d_model``, ``intermediate_size`` for
``d_ff``, ``max_position_embeddings`` for ``max_len``); XLab's own options keep their names.
"""

from transformers import PretrainedConfig


class XLabConfig(PretrainedConfig):
    model_type = "xlab"

    def __init__(
        self,
        vocab_size=8192,
        max_position_embeddings=128,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=None,
        intermediate_size=1024,
        norm="layernorm",
        activation="gelu",
        position="sinusoidal",
        bias=True,
        qk_norm=False,
        logit_softcap=None,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.norm = norm  # layernorm | rmsnorm (eps 1e-5)
        self.activation = activation  # gelu (exact) | relu | relu2 | swiglu
        self.position = position  # sinusoidal | learned | rope (half-split, base 10000)
        self.bias = bias  # biases in every linear layer, the output head and LayerNorm
        self.qk_norm = qk_norm  # weight-free RMS norm (eps 1e-6) of each head's queries and keys
        self.logit_softcap = logit_softcap  # logits = cap * tanh(logits / cap); None: no cap
        kwargs["tie_word_embeddings"] = False  # the head is stored on its own, even when XLab tied it
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
