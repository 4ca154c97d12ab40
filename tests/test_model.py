"""Tests of the decoder (xlab/model.py): shapes, causality, backends, GQA, KV cache, accounting."""

from __future__ import annotations

import io
import itertools
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from xlab.config import load_config
from xlab.errors import XLabError
from xlab.model import KVCache, ModelConfig, Transformer

ROOT = Path(__file__).resolve().parent.parent

# Small enough to be quick, big enough to have several heads, layers and GQA groups.
SMALL = ModelConfig(vocab_size=97, max_len=24, d_model=32, n_layers=2, n_heads=4, d_ff=48)
POSITIONS = ("sinusoidal", "learned", "rope")


def make(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(replace(SMALL, **overrides)).eval()


def ids(b: int = 2, t: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SMALL.vocab_size, (b, t), generator=g)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_shapes_and_forward_is_head_of_hidden():
    m = make()
    x = ids(3, 11)
    logits = m(x)
    h = m.hidden(x)
    assert logits.shape == (3, 11, SMALL.vocab_size) and logits.dtype == torch.float32
    assert h.shape == (3, 11, SMALL.d_model)
    assert torch.equal(m.head(h), logits)
    # the final norm is applied: every position has zero mean and unit variance (LayerNorm, weight 1)
    assert h.mean(-1).abs().max() < 1e-5
    assert (h.var(-1, unbiased=False) - 1).abs().max() < 1e-3


def test_longer_than_max_len_is_refused():
    with pytest.raises(ValueError, match="max_len"):
        make()(ids(1, SMALL.max_len + 1))


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_causality(position, backend):
    m = make(position=position, attention=backend)
    x = ids(2, 16)
    base = m(x)
    for t in (0, 7, 15):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % SMALL.vocab_size
        out = m(y)
        if t:
            assert maxdiff(out[:, :t], base[:, :t]) < 1e-6
        assert maxdiff(out[:, t], base[:, t]) > 1e-4  # the changed token itself matters


# The modern recipe's model options (conf/recipe/modern.yaml), all on at once.
MODERN = dict(qk_norm=True, activation="relu2", zero_init_proj=False, logit_softcap=5.0)


@pytest.mark.parametrize("modern", [False, True])
@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
@pytest.mark.parametrize("position", POSITIONS)
def test_backends_agree_fp32(position, n_kv_heads, modern):
    x = ids(2, 20)
    extra = MODERN if modern else {}
    sd = make(position=position, n_kv_heads=n_kv_heads, attention="sdpa", **extra)
    mt = make(position=position, n_kv_heads=n_kv_heads, attention="math", **extra)
    mt.load_state_dict(sd.state_dict())
    assert maxdiff(sd(x), mt(x)) < 1e-5
    # the bottom-right masked path (a cache holding a prefix, then several new tokens at once)
    outs = []
    for m in (sd, mt):
        c = m.new_cache(2)
        m(x[:, :9], cache=c)
        outs.append(m(x[:, 9:], cache=c))
    assert maxdiff(*outs) < 1e-5


@pytest.mark.parametrize("n_kv_heads", [None, 1])
def test_backends_agree_bf16(n_kv_heads):
    x = ids(2, 20)
    sd = make(n_kv_heads=n_kv_heads, attention="sdpa").to(torch.bfloat16)
    mt = make(n_kv_heads=n_kv_heads, attention="math").to(torch.bfloat16)
    mt.load_state_dict(sd.state_dict())
    a, b = sd(x), mt(x)
    assert a.dtype == torch.bfloat16
    assert maxdiff(a, b) < 2e-2
    # and both stay close to the fp32 model with the same weights
    ref = make(n_kv_heads=n_kv_heads)
    ref.load_state_dict({k: v.float() for k, v in sd.state_dict().items()})
    assert maxdiff(a, ref(x)) < 5e-2


def test_autocast_bf16_gives_bf16_logits_close_to_fp32():
    m = make()
    x = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        cache = m.new_cache(2)  # in the autocast dtype: keys and values are bf16 there
        steps = [m(x[:, :8], cache=cache)] + [m(x[:, t : t + 1], cache=cache) for t in range(8, 16)]
    assert out.dtype == torch.bfloat16 and cache.k.dtype == torch.bfloat16
    assert m.new_cache(2).k.dtype == torch.float32
    assert maxdiff(out, m(x)) < 5e-2
    assert maxdiff(torch.cat(steps, 1), out) < 5e-2


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("n_kv_heads", [2, 1])
def test_gqa_equals_attention_with_repeated_kv_heads(n_kv_heads, backend):
    """A GQA model equals a plain multi-head model whose k/v heads are copies of the shared ones."""
    gqa = make(n_kv_heads=n_kv_heads, attention=backend)
    mha = make(attention=backend)
    H, D, C = SMALL.n_heads, SMALL.d_model // SMALL.n_heads, SMALL.d_model
    state = gqa.state_dict()
    for i in range(SMALL.n_layers):
        for name in ("weight", "bias"):
            key = f"blocks.{i}.attn.qkv.{name}"
            q, k, v = state[key].split([C, n_kv_heads * D, n_kv_heads * D])
            # head j of the plain model reads shared head j // (H // K)
            expand = lambda t: t.unflatten(0, (n_kv_heads, D)).repeat_interleave(H // n_kv_heads, 0).flatten(0, 1)
            state[key] = torch.cat([q, expand(k), expand(v)])
    mha.load_state_dict(state)
    x = ids()
    assert maxdiff(gqa(x), mha(x)) < 1e-5
    assert gqa.num_parameters() < mha.num_parameters()


def test_n_kv_heads_equal_to_n_heads_is_plain_attention():
    a, b = make(n_kv_heads=None), make(n_kv_heads=SMALL.n_heads)
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(ids()), b(ids()))


@pytest.mark.parametrize("modern", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("n_kv_heads", [None, 1])
@pytest.mark.parametrize("position", POSITIONS)
def test_kv_cache_prefill_then_step_by_step_equals_full_forward(position, n_kv_heads, backend, modern):
    m = make(position=position, n_kv_heads=n_kv_heads, attention=backend, **(MODERN if modern else {}))
    x = ids(2, SMALL.max_len)
    full = m(x)
    cache = m.new_cache(2)
    assert isinstance(cache, KVCache) and cache.length == 0
    # the cache stores only the key/value heads
    assert cache.k.shape == (SMALL.n_layers, 2, n_kv_heads or SMALL.n_heads, SMALL.max_len, 8)
    steps = [m(x[:, :5], cache=cache)]
    for t in range(5, SMALL.max_len):
        steps.append(m(x[:, t : t + 1], cache=cache))
    assert cache.length == SMALL.max_len
    assert maxdiff(torch.cat(steps, dim=1), full) < 1e-4
    with pytest.raises(ValueError, match="overflow"):
        m(x[:, :1], cache=cache)


def test_kv_cache_chunks_of_several_tokens():
    m = make(position="rope")
    x = ids(1, 20)
    cache = m.new_cache(1)
    parts = [m(x[:, a:b], cache=cache) for a, b in ((0, 3), (3, 10), (10, 11), (11, 20))]
    assert maxdiff(torch.cat(parts, 1), m(x)) < 1e-4


def test_kv_cache_reorder_grows_and_permutes_rows():
    m = make(position="rope", n_kv_heads=2)
    prompt = ids(1, 6)
    cache = m.new_cache(1)
    m(prompt, cache=cache)
    cache.reorder(torch.tensor([0, 0, 0]))  # one prompt -> three beams
    nxt = torch.tensor([[3], [5], [7]])
    out = m(nxt, cache=cache)[:, -1]
    full = m(torch.cat([prompt.expand(3, -1), nxt], 1))[:, -1]
    assert maxdiff(out, full) < 1e-4
    cache.reorder(torch.tensor([2, 0]))  # keep beams 2 and 0, in that order
    nxt2 = torch.tensor([[1], [2]])
    out2 = m(nxt2, cache=cache)[:, -1]
    seqs = torch.cat([prompt.expand(2, -1), torch.tensor([[7], [3]]), nxt2], 1)
    assert maxdiff(out2, m(seqs)[:, -1]) < 1e-4
    with pytest.raises(ValueError, match="batch"):
        m(ids(3, 1), cache=cache)


def test_state_dict_round_trip():
    a = make(seed=0, position="rope", tie_embeddings=True)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make(seed=1, position="rope", tie_embeddings=True)
    assert not torch.equal(a(ids()), b(ids()))
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(a(ids()), b(ids()))
    assert b.lm_head.weight is b.tok_emb.weight  # tying survives loading
    # fixed tables are rebuilt from the config, never stored
    assert not any(k in make().state_dict() for k in ("pe", "rope_cos", "rope_sin"))


def test_same_seed_same_weights():
    a, b, c = make(seed=3), make(seed=3), make(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["tok_emb.weight"], sc["tok_emb.weight"])


def test_initialization():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=4096, max_len=16, d_model=128, n_layers=8, n_heads=4, d_ff=512)
    m = Transformer(cfg)
    # Sinusoidal positions: embeddings N(0, 1/d_model), scaled by sqrt(d_model) to unit RMS, the
    # table's scale (RMS 1/sqrt(2)); not 0.2's N(0, 1) * sqrt(d_model), nor GPT-2's 0.02 next to it.
    assert abs(m.tok_emb.weight.std().item() - 1 / math.sqrt(128)) < 2e-3
    x = m.tok_emb.weight * m.emb_scale
    assert abs(x.pow(2).mean().sqrt().item() - 1.0) < 0.02
    assert abs(m.pe.pow(2).mean().sqrt().item() - 1 / math.sqrt(2)) < 0.02
    for position in ("learned", "rope"):  # no fixed table to match: GPT-2's N(0, 0.02), unscaled
        other = Transformer(ModelConfig(**{**cfg.__dict__, "position": position}))
        assert other.emb_scale == 1.0 and abs(other.tok_emb.weight.std().item() - 0.02) < 1e-3
    assert abs(m.blocks[0].attn.qkv.weight.std().item() - 0.02) < 1e-3
    resid = 0.02 / math.sqrt(2 * cfg.n_layers)
    assert abs(m.blocks[3].attn.proj.weight.std().item() - resid) < 1e-3
    assert abs(m.blocks[3].ffn.proj.weight.std().item() - resid) < 1e-3
    assert all(mod.bias.abs().max() == 0 for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    # the untrained model predicts close to uniform: loss near ln(V)
    loss = torch.nn.functional.cross_entropy(
        m(torch.randint(0, 4096, (4, 16))).flatten(0, 1), torch.randint(0, 4096, (64,))
    )
    assert abs(loss.item() - math.log(4096)) < 0.2


def test_dropout_only_in_training():
    a = make(dropout=0.5)
    b = make(dropout=0.0)
    x = ids()
    assert torch.equal(a(x), b(x))  # eval mode: dropout off, same weights (same seed)
    a.train()
    assert not torch.equal(a(x), a(x))
    for backend in ("sdpa", "math"):  # both backends drop attention probabilities in training
        c = make(dropout=0.5, attention=backend)
        c.blocks[0].ffn.dropout.p = 0.0  # leave only the attention dropout
        c.train()
        assert maxdiff(c(x), b(x)) > 1e-3


# Every combination of the architecture options, forward and backward on a tiny model.
COMBOS = list(
    itertools.product(
        ("layernorm", "rmsnorm"),
        ("gelu", "swiglu", "relu", "relu2"),
        POSITIONS,
        (False, True),
        (False, True),
        (None, 1),
    )
)


@pytest.mark.parametrize("norm,activation,position,tie,bias,n_kv_heads", COMBOS)
def test_every_option_combination_trains(norm, activation, position, tie, bias, n_kv_heads):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=31,
        max_len=8,
        d_model=16,
        n_layers=1,
        n_heads=2,
        d_ff=24,
        dropout=0.1,
        norm=norm,
        activation=activation,
        position=position,
        tie_embeddings=tie,
        bias=bias,
        n_kv_heads=n_kv_heads,
    )
    m = Transformer(cfg).train()
    x = torch.randint(0, 31, (2, 8))
    loss = torch.nn.functional.cross_entropy(m(x).flatten(0, 1), x.roll(-1, 1).flatten())
    loss.backward()
    assert math.isfinite(loss.item())
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    has_bias = any(n.endswith("bias") for n, _ in m.named_parameters())
    assert has_bias == bias
    assert (m.lm_head.weight is m.tok_emb.weight) == tie


def test_learns_a_repeated_sequence():
    m = make(position="rope").train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x = ids(4, 17)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0 and losses[-1] < 0.5


def test_flash_attn_backend_without_the_package_names_the_extra_as_the_readme_does(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn -> ImportError
    with pytest.raises(XLabError) as e:
        make(attention="flash_attn")
    readme = (ROOT / "README.md").read_text()
    for hint in ("pip install -e '.[flash]'", "pip install 'xlabml[flash]'"):  # from a clone, elsewhere
        assert hint in str(e.value) and f"`{hint}`" in readme


def test_flash_attn_on_cpu_is_refused_clearly(monkeypatch):
    fake = type(sys)("flash_attn")
    fake.flash_attn_func = lambda *a, **k: pytest.fail("must not be called on CPU")
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    with pytest.raises(XLabError, match="CUDA"):
        make(attention="flash_attn")(ids())


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(n_kv_heads=3), "n_kv_heads"),
        (dict(d_model=30), "divisible"),
        (dict(position="alibi"), "position"),
        (dict(d_model=20, n_heads=4, position="rope"), "even head size"),
    ],
)
def test_bad_configuration_is_refused(bad, match):
    with pytest.raises(XLabError, match=match):
        Transformer(replace(SMALL, **bad))


def test_accepts_the_omegaconf_model_section():
    cfg = load_config(use_defaults_file=False)
    m = Transformer(cfg.model)
    assert isinstance(m.cfg, ModelConfig) and m.cfg.d_model == cfg.model.d_model


def _xlab_yaml_model() -> ModelConfig:
    cfg = load_config([ROOT / "conf" / "xlab.yaml"])
    # vocab_size and max_len come from the tokenizer and the shard store at train time
    return ModelConfig.of(cfg.model, vocab_size=cfg.tokenizer.vocab_size, max_len=cfg.shards.seq_len)


def test_parameter_count_of_the_release_configuration():
    mc = _xlab_yaml_model()
    V, C, F, L = mc.vocab_size, mc.d_model, mc.d_ff, mc.n_layers
    assert (V, C, F, L, mc.n_heads, mc.tie_embeddings, mc.bias) == (32768, 512, 2048, 6, 8, False, True)
    per_layer = (
        3 * (C * C + C)  # q, k, v projections with biases
        + (C * C + C)  # attention output projection
        + (C * F + F)
        + (F * C + C)  # feed-forward
        + 2 * 2 * C  # two LayerNorms (weight and bias)
    )
    expected = V * C + L * per_layer + 2 * C + (C * V + V)  # embedding, blocks, final norm, head with bias
    assert expected == 52_502_528
    with torch.device("meta"):  # no memory, no init time
        m = Transformer(mc)
    assert m.num_parameters() == expected
    assert round(m.num_parameters() / 1e6, 1) == 52.5
    assert m.num_parameters(non_embedding=True) == expected - 2 * V * C  # no embedding, no head matrix
    # 6N (every matmul weight: all but the embedding lookup) + 12 L C T
    assert m.flops_per_token() == 6 * (expected - V * C) + 12 * L * C * mc.max_len
    assert m.flops_per_token(seq_len=1024) == 6 * (expected - V * C) + 12 * L * C * 1024


def test_tied_embeddings_count_once_and_keep_the_head_flops():
    a, b = make(), make(tie_embeddings=True)
    V, C = SMALL.vocab_size, SMALL.d_model
    assert a.num_parameters() - b.num_parameters() == V * C
    assert a.flops_per_token() == b.flops_per_token()
    # non-embedding: the head's matrix is left out whether tied or not, so both count the same
    assert b.num_parameters(non_embedding=True) == a.num_parameters(non_embedding=True)
    blocks = sum(p.numel() for p in a.blocks.parameters())
    norm_f = sum(p.numel() for p in a.norm_f.parameters())
    assert a.num_parameters(non_embedding=True) == blocks + norm_f + V  # + the head's bias


def test_modern_options_keep_the_parameter_count():
    # QK-norm has no learned gains, ReLU^2 keeps d_ff, zero-init and the cap change no shape.
    base = make()
    for opt in (dict(qk_norm=True), dict(activation="relu2"), dict(zero_init_proj=True), dict(logit_softcap=15.0)):
        assert make(**opt).num_parameters() == base.num_parameters(), opt


def test_relu2_is_relu_squared():
    m = make(activation="relu2")
    ffn = m.blocks[0].ffn
    x = torch.randn(3, SMALL.d_model)
    expected = ffn.proj(torch.relu(ffn.fc(x)) ** 2)
    assert maxdiff(ffn(x), expected) < 1e-6


def test_qk_norm_scores_do_not_grow_with_the_qk_weights():
    # With QK-norm, scaling the q/k rows of the projection changes nothing: queries and keys are
    # RMS-normalised per head before the scores. Without it the output changes.
    x = ids()
    for qk_norm in (True, False):
        m = make(qk_norm=qk_norm, bias=False)
        before = m(x)
        with torch.no_grad():
            for b in m.blocks:
                b.attn.qkv.weight[: 2 * SMALL.d_model] *= 7.0  # the q and k rows (no GQA here)
        changed = maxdiff(m(x), before)
        assert (changed < 1e-4) if qk_norm else (changed > 1e-3), qk_norm


def test_logit_softcap_bounds_the_logits():
    cap = 2.0
    m = make(logit_softcap=cap)
    with torch.no_grad():
        m.lm_head.weight.mul_(200.0)  # raw logits far beyond the cap
    h = m.hidden(ids())
    raw = m.lm_head(h)
    z = m.head(h)
    assert raw.abs().max() > 10 * cap
    assert z.abs().max() <= cap  # tanh rounds to 1 in float32 far out
    assert maxdiff(z, cap * torch.tanh(raw / cap)) < 1e-6
    assert maxdiff(make()(ids()), make(logit_softcap=None)(ids())) == 0


def test_zero_init_proj_starts_every_block_as_the_identity():
    m = make(zero_init_proj=True)
    for b in m.blocks:
        assert not b.attn.proj.weight.any() and not b.ffn.proj.weight.any()
    x = ids()
    h = m.tok_emb(x) * m.emb_scale + m.pe[: x.shape[1]]  # what the blocks receive (sinusoidal)
    assert maxdiff(m(x), m.head(m.norm_f(h))) < 1e-5
    # the projections do learn: their gradient is not zero at the start
    m.train()
    torch.nn.functional.cross_entropy(m(x).flatten(0, 1), x.flatten()).backward()
    assert m.blocks[0].attn.proj.weight.grad.abs().sum() > 0
    assert m.blocks[0].ffn.proj.weight.grad.abs().sum() > 0
