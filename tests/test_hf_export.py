"""The Hugging Face export (``xlab export --format hf``): logits parity with XLab for every shipped
model configuration and every architecture mapping, greedy generation through ``model.generate``,
and bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the HF export tests need transformers: pip install -e '.[hf]'")

import torch  # noqa: E402

from xlab.checkpoint import save_checkpoint, tokenizer_bytes_tensor  # noqa: E402
from xlab.config import ModelConfig, load_config, to_dict  # noqa: E402
from xlab.errors import XLabError  # noqa: E402
from xlab.generate import greedy_search  # noqa: E402
from xlab.hf import export_hf  # noqa: E402
from xlab.hf.native import architecture  # noqa: E402
from xlab.model import Transformer  # noqa: E402
from xlab.tokenizer import Tokenizer  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"  # never the network: every file is local
ROOT = Path(__file__).resolve().parent.parent
CONFS = sorted(p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("conf/*.yaml"), *ROOT.glob("conf/extra/*.yaml")])
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=48"]
MAX_LEN = 64
NO_BIAS = ["model.bias=false"]
ROPE = ["model.position=rope", "model.bias=false"]
# One case per architecture mapping (docs/export.md), plus the options only remote code expresses.
OPTIONS = {
    "gpt2-sinusoidal-tied": NO_BIAS + ["model.tie_embeddings=true"],
    "gpt2-learned-relu": NO_BIAS + ["model.position=learned", "model.activation=relu", "model.tie_embeddings=true"],
    "gpt2-relu2": NO_BIAS + ["model.activation=relu2"],
    "llama-mqa": ROPE + ["model.norm=rmsnorm", "model.activation=swiglu", "model.n_kv_heads=1"],
    "qwen3": ROPE + ["model.norm=rmsnorm", "model.activation=swiglu", "model.qk_norm=true", "model.n_kv_heads=2"],
    "arcee": ROPE + ["model.norm=rmsnorm", "model.activation=relu2", "model.tie_embeddings=true"],
    "starcoder2": ROPE + ["model.activation=gelu", "model.n_kv_heads=2"],
    "xlab-softcap": ["model.logit_softcap=5.0", "model.qk_norm=true", "model.position=rope", "model.n_kv_heads=2"],
    "xlab-rmsnorm-learned": NO_BIAS + ["model.norm=rmsnorm", "model.position=learned", "model.activation=swiglu"],
}
EXPECTED = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
            "arcee": "ArceeForCausalLM", "starcoder2": "Starcoder2ForCausalLM", "xlab": "XLabForCausalLM"}  # fmt: skip


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    from test_tokenizer import make_corpus

    return Tokenizer.train(make_corpus(150, seed=3), 400, None, seed=1, num_threads=1)


def save_tiny(path: Path, tok: Tokenizer, files=(), overrides=(), serve_attention: str | None = None):
    """A tiny random XLab model saved as a training checkpoint; returns the model (eval mode).

    Its norms and biases are moved off their initial ones and zeros, so a mapping that dropped or
    misplaced one would show in the logits."""
    cfg = load_config(list(files), [*TINY, *overrides], use_defaults_file=True)
    mc = ModelConfig.of(cfg.model, vocab_size=tok.vocab_size, max_len=MAX_LEN)
    if serve_attention:  # e.g. flash_attn, which cannot run here: XLab serves it with sdpa
        mc.attention = serve_attention
    torch.manual_seed(0)
    model = Transformer(mc).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = {"model": model.state_dict(), "config": to_dict(cfg), "model_config": to_dict_cfg(cfg, mc), "step": 7,
             "tokenizer": tokenizer_bytes_tensor(tok.to_bytes()), "tokenizer_sha256": tok.sha256}  # fmt: skip
    save_checkpoint(path, state)
    return model


def to_dict_cfg(cfg, mc: ModelConfig) -> dict:
    """The model_config a run saves: the configured attention backend, whatever served it here."""
    return {**mc.to_dict(), "attention": str(cfg.model.attention)}


def check_parity(model: Transformer, out: Path, tok: Tokenizer) -> None:
    """fp32 logits within 1e-4 on a real and a random batch; 50 greedy tokens identical."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32).eval()
    arch, _ = architecture(model.cfg)
    assert type(hf).__name__ == EXPECTED[arch]
    real = [tok.sos_id, *tok.encode("The history of the storm, in 1921.\nIt began")][:MAX_LEN]
    batches = [
        torch.tensor([real]),
        torch.randint(0, tok.vocab_size, (2, MAX_LEN), generator=torch.Generator().manual_seed(1)),
    ]
    with torch.no_grad():
        for ids in batches:
            diff = (model(ids) - hf(ids).logits).abs().max().item()
            assert diff <= 1e-4, f"{arch}: max abs logit difference {diff:.2e}"
        prompt = real[:8]
        ours = greedy_search(model, prompt, 50, eos_id=tok.eos_id)
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=50, do_sample=False)[0, len(prompt) :].tolist()
    assert theirs[: len(ours)] == ours and theirs[len(ours) :] in ([], [tok.eos_id])


@pytest.mark.parametrize("conf", CONFS)
def test_every_shipped_configuration_exports_exactly(conf, tok, tmp_path):
    files = [ROOT / conf]
    serve = "sdpa" if "flash_attn" in conf else None
    model = save_tiny(tmp_path / "last.pt", tok, files, serve_attention=serve)
    check_parity(model, export_hf(tmp_path / "last.pt", tmp_path / "hf"), tok)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_architecture_mapping_is_exact(name, tok, tmp_path):
    model = save_tiny(tmp_path / "last.pt", tok, overrides=OPTIONS[name])
    assert architecture(model.cfg)[0] == name.split("-")[0]
    out = export_hf(tmp_path / "last.pt", tmp_path / "hf")
    remote = (out / "modeling_xlab.py").is_file()
    assert remote == name.startswith("xlab")  # a native class needs no remote code
    check_parity(model, out, tok)


def test_remote_code_follows_left_padding(tok, tmp_path):
    """A left-padded batch (as generate pads several prompts) gives each row its unpadded logits."""
    from transformers import AutoModelForCausalLM

    model = save_tiny(tmp_path / "last.pt", tok)
    hf = AutoModelForCausalLM.from_pretrained(
        str(export_hf(tmp_path / "last.pt", tmp_path / "hf")), trust_remote_code=True
    )
    ids = torch.randint(5, tok.vocab_size, (1, 10))
    padded = torch.cat([torch.full((1, 3), tok.pad_id), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 10)], dim=1).long()
    with torch.no_grad():
        got = hf(padded, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits[:, 3:]
        assert (got - model(ids)).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------------- bad input
def test_existing_out_and_foreign_checkpoint_are_refused(tok, tmp_path, cli):
    save_tiny(tmp_path / "last.pt", tok)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    p = cli(["export", tmp_path / "last.pt", "--format", "hf", "--out", out], cwd=tmp_path, check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--force" in p.stderr
    p = cli(["export", tmp_path / "last.pt", "--format", "hf", "--out", out, "--force"], cwd=tmp_path, check=False)
    assert p.returncode == 2 and "not an export folder" in p.stderr  # --force replaces only an export
    assert [f.name for f in out.iterdir()] == ["keep.txt"]
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    p = cli(["export", foreign, "--format", "hf", "--out", tmp_path / "new"], cwd=tmp_path, check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "not an XLab" in p.stderr
    assert not (tmp_path / "new").exists()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["foreign.pt", "hf", "last.pt"]  # no temporary left


def test_force_replaces_an_earlier_export(tok, tmp_path):
    save_tiny(tmp_path / "last.pt", tok)
    out = export_hf(tmp_path / "last.pt", tmp_path / "hf")
    with pytest.raises(XLabError, match="already exists"):
        export_hf(tmp_path / "last.pt", out)
    (out / "stale.txt").write_text("old")
    export_hf(tmp_path / "last.pt", out, force=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()


# ------------------------------------------------------------------------- generation config, card
def test_generation_config_and_model_card(tok, tmp_path):
    """generation_config.json carries the run's generate: settings (sampling works from it as it is);
    the card names the data, tokens seen, the recorded val loss and bits per byte, and the licence."""
    import json

    from transformers import AutoModelForCausalLM, GenerationConfig

    run = tmp_path / "runs" / "demo"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "last.pt"
    save_tiny(ckpt, tok, overrides=["generate.top_k=10", "generate.temperature=0.7", "train.batch_size=4"])
    records = [
        {"step": 5, "split": "val", "loss": 5.25, "bits_per_byte": 2.5},
        {"step": 9, "split": "val", "loss": 1.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = export_hf(ckpt, tmp_path / "hf")
    g = GenerationConfig.from_pretrained(str(out))
    assert (g.do_sample, g.temperature, g.top_k, g.top_p, g.max_new_tokens) == (True, 0.7, 10, 0.95, 80)
    assert (g.bos_token_id, g.eos_token_id, g.pad_token_id) == (tok.sos_id, tok.eos_id, tok.pad_id)
    card = (out / "README.md").read_text()
    for words in ("validation loss 5.2500", "2.5000 bits per byte", "CC BY-SA 4.0", "Wikipedia sample",
                  f"{7 * 4 * MAX_LEN:,}", "muon", "trust_remote_code=True"):  # fmt: skip
        assert words in card, words
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    torch.manual_seed(0)
    assert hf.generate(torch.tensor([[tok.sos_id]]), max_new_tokens=5).shape[1] <= 6
    save_tiny(ckpt, tok, overrides=["generate.temperature=0", *OPTIONS["llama-mqa"]])
    out = export_hf(ckpt, tmp_path / "hf", force=True)
    assert GenerationConfig.from_pretrained(str(out)).do_sample is False
    assert "not recorded" not in (out / "README.md").read_text()  # step 7: the record of step 5
