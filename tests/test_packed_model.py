"""Document masks in the decoder (xlab/attention.py, used by xlab/model.py): rows that pack several
articles must process each article exactly as if it were alone — in every attention backend, for every kind of position."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import xlab.attention as attention_mod
from xlab.attention import DocumentMask, document_positions
from xlab.errors import XLabError
from xlab.loss import model_loss
from xlab.model import ModelConfig, Transformer
from xlab.store.format import IGNORE_INDEX

SMALL = ModelConfig(vocab_size=97, max_len=32, d_model=32, n_layers=2, n_heads=4, d_ff=48)
POSITIONS = ("sinusoidal", "learned", "rope")
SOS, EOS, PAD = 1, 2, 0


def make(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(replace(SMALL, **overrides)).eval()


def packed_batch(lengths_per_row: list[list[int]], T: int, seed: int = 0):
    """Rows of ``T`` ids packing documents of the given lengths (each ``<sos> text <eos>``, pad after);
    returns ids (B, T), doc_ids (B, T) and the (row, start, length) of every document."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths_per_row), T), PAD)
    doc_ids = torch.zeros_like(ids)
    docs = []
    for b, lengths in enumerate(lengths_per_row):
        at = 0
        for d, n in enumerate(lengths):
            text = torch.randint(3, SMALL.vocab_size, (n,), generator=g)
            ids[b, at : at + n + 2] = torch.cat([torch.tensor([SOS]), text, torch.tensor([EOS])])
            doc_ids[b, at : at + n + 2] = d
            docs.append((b, at, n + 2))
            at += n + 2
        doc_ids[b, at:] = len(lengths) - 1 if at < T else doc_ids[b, at:]  # pads join the last document
        assert at <= T
    return ids, doc_ids, docs


ROWS = [[5, 9, 3], [20], [2, 2, 2, 2, 4]]  # lengths of text; rows of 32 with pad at the end of two


def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, causal=True):
    """flash_attn_varlen_func's contract, in plain torch: q (N, H, D), k/v (N, K, D), one causal
    attention per [cu[i], cu[i+1]) slice."""
    assert torch.equal(cu_q, cu_k) and causal and cu_q.dtype == torch.int32 and int(cu_q[-1]) == q.shape[0]
    assert max_q >= int((cu_q[1:] - cu_q[:-1]).max())
    H, K = q.shape[1], k.shape[1]
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))  # (H|K, n, D)
        ks, vs = ks.repeat_interleave(H // K, 0), vs.repeat_interleave(H // K, 0)
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
    return out


@pytest.fixture
def fake_flash(monkeypatch):
    """The flash_attn backend with the varlen kernel replaced by :func:`varlen_reference`, on CPU."""
    fake = type(sys)("flash_attn")
    fake.flash_attn_func = lambda *a, **k: pytest.fail("packed rows must take the varlen kernel")
    fake.flash_attn_varlen_func = varlen_reference
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.setattr(attention_mod, "_check_flash_inputs", lambda q: None)


def test_document_positions_restart_at_each_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 0, 0], [3, 4, 4, 4, 5, 5, 5, 5]])
    want = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 1, 2, 0, 1, 2, 3]])
    assert torch.equal(document_positions(doc_ids), want)


def test_dense_mask_and_cu_seqlens_of_a_batch():
    doc_ids = torch.tensor([[0, 0, 1], [0, 1, 1]])
    m = DocumentMask(doc_ids)
    want = torch.tensor([[[1, 0, 0], [1, 1, 0], [0, 0, 1]], [[1, 0, 0], [0, 1, 0], [0, 1, 1]]], dtype=torch.bool)
    assert torch.equal(m.dense()[:, 0], want)
    cu, max_len = m.varlen()
    assert cu.tolist() == [0, 2, 3, 4, 6] and cu.dtype == torch.int32 and max_len == 3


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
@pytest.mark.parametrize("position", POSITIONS)
def test_every_backend_equals_the_math_reference_on_packed_rows(position, n_kv_heads, fake_flash):
    ids, doc_ids, _ = packed_batch(ROWS, 32)
    ref = make(position=position, n_kv_heads=n_kv_heads, attention="math")
    with torch.no_grad():
        want = ref(ids, doc_ids=doc_ids)
        for backend in ("sdpa", "flex", "flash_attn"):
            m = make(position=position, n_kv_heads=n_kv_heads, attention=backend)
            got = m(ids, doc_ids=doc_ids)
            assert (got - want).abs().max().item() < 1e-4, backend


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("position", POSITIONS)
def test_each_packed_document_is_processed_as_if_alone(position, backend):
    ids, doc_ids, docs = packed_batch(ROWS, 32)
    m = make(position=position, attention=backend, qk_norm=True)
    with torch.no_grad():
        packed = m(ids, doc_ids=doc_ids)
        for b, start, n in docs:
            alone = m(ids[b : b + 1, start : start + n])[0]  # the document alone, positions 0..n-1
            assert (packed[b, start : start + n] - alone).abs().max().item() < 1e-4


@pytest.mark.parametrize("position", POSITIONS)
def test_packed_row_loss_is_the_sum_of_the_articles_losses_alone(position):
    """No information crosses a document boundary: the loss of packed rows (target after <eos>
    ignored) equals the summed losses of the same articles, each alone in a padded row."""
    T = 32
    ids, doc_ids, docs = packed_batch(ROWS, T + 1)  # rows of seq_len + 1, as the store keeps them
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[(targets == PAD) | (targets == SOS)] = IGNORE_INDEX
    m = make(position=position, attention="sdpa")
    m.train(False)
    loss, _, count = model_loss(m, inputs, targets, doc_ids=doc_ids[:, :-1])
    total, n_targets = 0.0, 0
    for b, start, n in docs:
        row = torch.full((1, T + 1), PAD)
        row[0, :n] = ids[b, start : start + n]
        t = row[:, 1:].clone()
        t[t == PAD] = IGNORE_INDEX
        lo, _, c = model_loss(m, row[:, :-1], t)
        total, n_targets = total + lo.item(), n_targets + int(c)
    assert int(count) == n_targets == sum(n - 1 for _, _, n in docs)
    assert loss.item() == pytest.approx(total, rel=1e-5)


def test_gradients_do_not_cross_documents():
    ids, doc_ids, docs = packed_batch([[6, 7]], 32)
    m = make(attention="sdpa")
    emb = m.tok_emb(ids).detach().requires_grad_()
    # the loss of the second document's outputs only; the first document's inputs must get no gradient
    x = emb * m.emb_scale + m.pe[document_positions(doc_ids)]
    docs_mask = DocumentMask(doc_ids)
    for i, block in enumerate(m.blocks):
        x = block(x, None, None, i, docs_mask)
    _, start, n = docs[1]
    x[0, start : start + n].sum().backward()
    assert emb.grad[0, :start].abs().max() == 0
    assert emb.grad[0, start : start + n].abs().max() > 0


def test_flex_training_on_cpu_is_refused_clearly():
    ids, doc_ids, _ = packed_batch(ROWS, 32)
    m = make(attention="flex").train()
    with pytest.raises(XLabError, match="CUDA"):
        m(ids, doc_ids=doc_ids)


def test_flex_without_documents_equals_causal_sdpa_with_a_cache():
    m_flex, m_sdpa = make(attention="flex"), make(attention="sdpa")
    x = torch.randint(3, SMALL.vocab_size, (2, 12))
    with torch.no_grad():
        assert (m_flex(x) - m_sdpa(x)).abs().max() < 1e-4
        c_flex, c_sdpa = m_flex.new_cache(2), m_sdpa.new_cache(2)
        m_flex(x[:, :8], c_flex), m_sdpa(x[:, :8], c_sdpa)
        assert (m_flex(x[:, 8:], c_flex) - m_sdpa(x[:, 8:], c_sdpa)).abs().max() < 1e-4


def test_doc_ids_with_a_cache_or_of_another_shape_are_refused():
    m = make()
    x = torch.randint(3, SMALL.vocab_size, (2, 8))
    with pytest.raises(ValueError, match="doc_ids"):
        m(x, m.new_cache(2), doc_ids=torch.zeros_like(x))
    with pytest.raises(ValueError, match="doc_ids"):
        m(x, doc_ids=torch.zeros(2, 7, dtype=torch.long))
