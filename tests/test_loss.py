"""The fused, chunked cross-entropy (xlab/loss.py): equal to full logits in value and gradient, zero
for all-padding targets, and close to fp32 under bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from xlab.loss import chunked_cross_entropy, full_cross_entropy, linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_fused_and_checkpointed_losses_match_full_logits(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True)
    t = torch.randint(0, 40, (3, 11), generator=g)
    t[0, 3:] = -100
    t[2, :] = -100
    results = []
    for kind in ("full", "fused", "ckpt"):
        for p in (h, w, b):
            p.grad = None
        if kind == "full":
            loss, correct, count = full_cross_entropy(h @ w.T + b, t)
        elif kind == "fused":
            loss, correct, count = linear_cross_entropy(h, w, b, t, chunk)
        else:
            loss, correct, count = chunked_cross_entropy(h, lambda x: x @ w.T + b, t, chunk)
        (loss * 0.37).backward()
        results.append((loss.detach(), int(correct), int(count), h.grad.clone(), w.grad.clone(), b.grad.clone()))
    ref = results[0]
    assert ref[2] == 3 + 11  # non-ignored targets
    for r in results[1:]:
        assert r[1:3] == ref[1:3]
        for a, e in zip(r[:1] + r[3:], ref[:1] + ref[3:]):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_all_padding_gives_zero_loss_and_zero_gradients():
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    t = torch.full((2, 5), -100)
    loss, correct, count = linear_cross_entropy(h, w, None, t, 3)
    loss.backward()
    assert loss.item() == 0.0 and int(correct) == 0 and int(count) == 0
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0
    assert torch.isfinite(h.grad).all()


def test_fused_loss_under_bf16_autocast_is_close_to_fp32():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 32, generator=g)
    w = torch.randn(50, 32, generator=g) * 0.1
    t = torch.randint(0, 50, (64,), generator=g)
    ref, _, _ = linear_cross_entropy(h, w, None, t, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _, _ = linear_cross_entropy(h, w, None, t, 16)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=2e-2)


@pytest.mark.parametrize("cap", [None, 3.0, 1e-3])
def test_model_loss_scores_the_logits_the_model_gives(cap):
    # The fused loss skips Transformer.head; with a soft cap it must not (the cap is part of the model).
    from xlab.loss import model_loss
    from xlab.model import ModelConfig, Transformer

    torch.manual_seed(0)
    m = Transformer(
        ModelConfig(vocab_size=50, max_len=12, d_model=16, n_layers=1, n_heads=2, d_ff=32, logit_softcap=cap)
    )
    with torch.no_grad():
        m.lm_head.weight.mul_(50.0)  # logits well beyond the cap
    x = torch.randint(0, 50, (3, 12))
    y = x.roll(-1, 1)
    loss_sum, _, count = model_loss(m, x, y, chunk_tokens=8)
    expected = torch.nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten(), reduction="sum")
    assert count == 36
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    if cap == 1e-3:  # logits within +-0.001 of 0: the loss is ln V per token
        assert loss_sum.item() / 36 == pytest.approx(torch.log(torch.tensor(50.0)).item(), abs=1e-3)


@pytest.mark.parametrize("chunk", [5, 64])
def test_fused_loss_with_a_soft_cap_matches_capped_full_logits(chunk):
    torch.manual_seed(0)
    n, d, v, cap = 23, 8, 40, 2.0
    h = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(v, d) * 3).requires_grad_()  # raw logits well past the cap
    b = torch.randn(v, requires_grad=True)
    t = torch.randint(0, v, (n,))
    t[3] = -100
    loss, correct, count = linear_cross_entropy(h, w, b, t, chunk, softcap=cap)
    loss.backward()
    grads = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    z = cap * torch.tanh((h @ w.T + b) / cap)
    ref = torch.nn.functional.cross_entropy(z, t, reduction="sum")
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert count == n - 1 and correct == ((z.argmax(-1) == t) & (t != -100)).sum()
    for g, x in zip(grads, (h, w, b)):
        assert torch.allclose(g, x.grad, atol=1e-5), (g - x.grad).abs().max()
