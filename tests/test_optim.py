"""The optimizers (xlab/train/optim.py): which parameters Muon takes, what one Muon step does, the
shared weight decay and learning-rate schedule, and the checkpointed state."""

from __future__ import annotations

import io

import pytest
import torch
from train_helpers import make_cfg

from xlab.config import ModelConfig
from xlab.model import Transformer
from xlab.train.optim import MuonAdamW, build_optimizer, muon_params

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")


def model_and_cfg(*overrides: str):
    cfg = make_cfg("/unused", "train.optimizer=muon", "train.lr=1e-3", "train.muon_lr=0.05", *overrides)
    torch.manual_seed(0)
    return Transformer(ModelConfig.of(cfg.model, vocab_size=50, max_len=cfg.shards.seq_len)), cfg.train


def names_of(model, params) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model, t = model_and_cfg()
    opt = build_optimizer(model, t, torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    muon = names_of(model, muon_params(model))
    assert muon == {
        n for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2
    }  # qkv, attn.proj, ffn.fc, ffn.proj per block
    assert len(muon) == 4 * 2
    adamw = names_of(model, [p for g in opt.adamw.param_groups for p in g["params"]])
    assert {"tok_emb.weight", "lm_head.weight", "lm_head.bias", "norm_f.weight"} <= adamw
    assert not muon & adamw and len(muon) + len(adamw) == len(list(model.parameters()))
    # one schedule drives both: the trainer sets lr * lr_scale on every group
    assert [g["lr_scale"] for g in opt.param_groups] == [50.0, 1.0, 1.0]


def test_embedding_and_head_learning_rates_have_their_own_groups():
    model, t = model_and_cfg("train.embedding_lr=0.2", "train.head_lr=0.004")
    opt = build_optimizer(model, t, torch.device("cpu"))
    by_scale = {round(g["lr_scale"], 6): names_of(model, g["params"]) for g in opt.adamw.param_groups}
    assert by_scale[200.0] == {"tok_emb.weight"} and by_scale[4.0] == {"lm_head.weight", "lm_head.bias"}
    assert all(g["weight_decay"] == 0.0 for g in opt.adamw.param_groups if g["lr_scale"] != 1.0)
    tied, t = model_and_cfg("train.embedding_lr=0.2", "train.head_lr=0.004", "model.tie_embeddings=true")
    groups = build_optimizer(tied, t, torch.device("cpu")).adamw.param_groups
    # a tied head is the embedding: it trains at embedding_lr; only the head's bias is the head's own
    assert {round(g["lr_scale"], 6): names_of(tied, g["params"]) for g in groups}[4.0] == {"lm_head.bias"}
    plain, t = model_and_cfg()
    assert len(build_optimizer(plain, t, torch.device("cpu")).adamw.param_groups) == 2  # as before: unchanged


def test_one_muon_step_is_an_orthogonalised_update_of_the_shape_scaled_size():
    model, t = model_and_cfg("train.weight_decay=0")
    opt = build_optimizer(model, t, torch.device("cpu"))
    w = model.blocks[0].ffn.fc.weight  # (d_ff 64, d_model 32): Muon scales lr by sqrt(64 / 32)
    e = model.tok_emb.weight
    w0, e0 = w.detach().clone(), e.detach().clone()
    x = torch.randint(0, 50, (4, 16))
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    opt.step()
    step = (w0 - w.detach()) / (0.05 * 2**0.5)  # the orthogonalised momentum itself
    s = torch.linalg.svdvals(step)
    # Newton-Schulz in bf16 gives singular values near 1 (about 0.5..1.5 by design), not the
    # gradient's spread, whose largest is many times its smallest.
    assert s.max() < 1.6 and (s > 0.5).float().mean() > 0.9
    g = torch.linalg.svdvals(w.grad)
    spread = lambda v: (v.quantile(0.9) / v.quantile(0.1)).item()  # noqa: E731
    assert spread(g) > 3 * spread(s)
    # AdamW's first step moves each touched embedding entry by lr (its update is the gradient's sign)
    moved = (e0 - e.detach()).abs()
    assert moved.max() == pytest.approx(1e-3, rel=1e-3)


def test_weight_decay_shrinks_matrices_alike_under_either_optimizer():
    # With zero gradients the only change is the decoupled decay: 1 - lr * weight_decay per step for
    # Muon's matrices (which run at muon_lr) and AdamW's matrices alike.
    model, t = model_and_cfg("train.weight_decay=0.5")
    opt = build_optimizer(model, t, torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    muon_w, adam_w = model.blocks[0].attn.qkv.weight, model.lm_head.weight
    a0, b0 = muon_w.detach().clone(), adam_w.detach().clone()
    opt.step()
    assert torch.allclose(muon_w.detach(), a0 * (1 - 1e-3 * 0.5), atol=1e-7)
    assert torch.allclose(adam_w.detach(), b0 * (1 - 1e-3 * 0.5), atol=1e-7)


def test_state_dict_round_trip_continues_identically():
    def run(opt, model, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x = torch.randint(0, 50, (4, 16), generator=g)
            torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    a, t = model_and_cfg()
    oa = build_optimizer(a, t, torch.device("cpu"))
    run(oa, a, 2, 0)
    buf = io.BytesIO()  # through a file, as a checkpoint (a live state dict shares AdamW's step tensors)
    torch.save(oa.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state) == {"muon", "adamw"} and state["muon"]["state"]  # momentum buffers exist
    b, _ = model_and_cfg()
    b.load_state_dict(a.state_dict())
    ob = build_optimizer(b, t, torch.device("cpu"))
    ob.load_state_dict(state)
    run(oa, a, 2, 1)
    run(ob, b, 2, 1)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_adamw_checkpoint_state_is_refused_by_muon():
    model, t = model_and_cfg()
    opt = build_optimizer(model, t, torch.device("cpu"))
    plain = torch.optim.AdamW(model.parameters()).state_dict()
    with pytest.raises(KeyError):
        opt.load_state_dict(plain)
