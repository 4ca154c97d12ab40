"""End to end through the CLI, as a user runs it: every command on a small slice of the real
Wikipedia sample with a tiny model, in a fresh working folder."""

import json

import pytest

pytestmark = pytest.mark.slow

# A tiny but complete configuration: 400 articles, vocabulary 512, sequences of 32 tokens.
TINY = [
    "-o",
    "data.max_articles=400",
    "-o",
    "tokenizer.vocab_size=512",
    "-o",
    "shards.seq_len=32",
    "-o",
    "shards.num_proc=2",
    "-o",
    "model.d_model=32",
    "-o",
    "model.n_layers=1",
    "-o",
    "model.n_heads=2",
    "-o",
    "model.d_ff=64",
    "-o",
    "train.batch_size=8",
    "-o",
    "train.max_steps=12",
    "-o",
    "train.warmup_steps=2",
    "-o",
    "train.eval_every=6",
    "-o",
    "train.checkpoint_every=6",
    "-o",
    "train.log_every=3",
    "-o",
    "train.eval_batches=4",
    "-o",
    "train.lr=3e-3",
    "-o",
    "generate.max_new_tokens=8",
]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


def test_every_command(work, cli):
    cli(["data", "download"] + TINY, cwd=work)
    assert (work / "data/raw/wiki/articles.parquet").is_file()
    assert "up to date" in cli(["data", "download"] + TINY, cwd=work).stdout  # skipped the second time

    cli(["data", "split"] + TINY, cwd=work)
    split_manifest = json.loads((work / "data/splits/wiki/manifest.json").read_text())
    assert sum(split_manifest["counts"][s] for s in ("train", "val", "test", "predict")) <= 400

    cli(["tokenizer", "train"] + TINY, cwd=work)
    assert (work / "tokenizers/wiki.model").is_file()
    shown = cli(["tokenizer", "show", "Hello,\nworld ▁!"] + TINY, cwd=work).stdout
    assert "round trip: exact" in shown and "byte" in shown

    cli(["data", "encode"] + TINY, cwd=work)
    manifest = json.loads((work / "shards/wiki-packed/manifest.json").read_text())  # the demo packs its rows
    assert manifest["seq_len"] == 32 and manifest["dtype"] == "uint16"
    assert manifest["splits"]["train"]["layout"] == "packed" and manifest["splits"]["val"]["layout"] == "padded"
    assert manifest["splits"]["train"]["rows"] > 0
    assert cli(["data", "validate"] + TINY, cwd=work).returncode == 0
    cli(["stats", "--plot", work / "lengths.png"] + TINY, cwd=work)
    assert (work / "lengths.png").stat().st_size > 1000

    cli(["train"] + TINY, cwd=work)
    ckpt = work / "runs/demo/checkpoints/last.pt"
    assert ckpt.is_file()
    lines = [json.loads(x) for x in (work / "runs/demo/metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in x or x.get("split") == "val" for x in lines)

    res = work / "eval.json"
    cli(["evaluate", ckpt, "--split", "test", "--json", res, "--device", "cpu"], cwd=work)
    metrics = json.loads(res.read_text())
    assert metrics["loss"] > 0 and metrics["perplexity"] > 1 and metrics["bits_per_byte"] > 0

    g1 = cli(["generate", ckpt, "The history of", "--max-new-tokens", "8", "--seed", "1"], cwd=work).stdout
    g2 = cli(["generate", ckpt, "The history of", "--max-new-tokens", "8", "--seed", "1"], cwd=work).stdout
    assert "The history of" in g1 and g1 == g2
    cli(["generate", ckpt, "The", "--greedy", "--max-new-tokens", "5"], cwd=work)
    cli(["generate", ckpt, "The", "--beam-width", "3", "--max-new-tokens", "5"], cwd=work)

    pred = work / "pred.jsonl"
    cli(["predict", ckpt, "--out", pred, "-n", "3", "--prompt-tokens", "8", "--max-new-tokens", "4"], cwd=work)
    rows = [json.loads(x) for x in pred.read_text().splitlines()]
    assert len(rows) == 3 and all("prompt" in r and "reference" in r for r in rows)

    exp = work / "export"
    cli(["export", ckpt, "--out", exp], cwd=work)
    assert any(p.suffix == ".safetensors" for p in exp.iterdir())
    again = cli(["export", ckpt, "--out", exp], cwd=work, check=False)
    assert again.returncode == 2 and "Traceback" not in again.stderr  # refuses to overwrite
    g3 = cli(["generate", exp, "The history of", "--max-new-tokens", "8", "--seed", "1"], cwd=work).stdout
    assert g3 == g1  # the export generates exactly what the checkpoint does

    # The whole pipeline again: every stage is up to date, so it only evaluates and generates.
    out = cli(["pipeline"] + TINY, cwd=work).stdout
    assert out.count("up to date") >= 5
    assert "unigram" in out


@pytest.mark.parametrize(
    "args, word",
    [
        (["data", "split"], "xlab data download"),
        (["tokenizer", "train"], "xlab data split"),
        (["data", "encode"], "xlab data split"),
        (["train"], "xlab data encode"),
        (["generate", "missing.pt", "hi"], "missing.pt"),
        (["evaluate", "missing.pt"], "missing.pt"),
    ],
)
def test_missing_earlier_stage_is_one_line_exit_2(tmp_path, cli, args, word):
    p = cli(args, cwd=tmp_path, check=False)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    err = p.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and word in err
