"""Checkpoints, export and evaluation: weights_only loading, RNG round trips, refusal of unsafe or
corrupt files, the safetensors export (size, no overwrite, same outputs), and `xlab evaluate`."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import make_cfg, make_store

import xlab
from xlab.checkpoint import export, load_checkpoint, load_model, rng_state, save_checkpoint, set_rng_state
from xlab.commands.evaluate import run as evaluate_run
from xlab.errors import XLabError
from xlab.store import ShardStore
from xlab.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    store = make_store(root)
    train(make_cfg(root / "runs", "train.max_steps=4", "train.eval_every=100"), shards_dir=store)
    return store, root / "runs" / "t" / "checkpoints" / "last.pt", root


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_rng_state_round_trip():
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    torch.rand(5), np.random.rand(7), random.random()
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and a[3] == b[3]


def test_checkpoint_loads_weights_only_and_refuses_pickled_objects(tmp_path, trained):
    _, last, _ = trained
    # The real checkpoint has only tensors and plain data: torch's own weights_only loader accepts it.
    ck = torch.load(last, weights_only=True)
    assert {"model", "optimizer", "step", "loader", "rng", "config", "tokenizer", "shards", "xlab_version"} <= set(ck)
    assert ck["xlab_version"] == xlab.__version__ and isinstance(ck["config"], dict)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "xlab-checkpoint", "format_version": 1, "model": Evil()}, evil)
    with pytest.raises(XLabError, match="refusing to load"):
        load_checkpoint(evil)
    with pytest.raises(XLabError, match="refusing to load"):
        load_model(evil)


def test_missing_corrupt_and_foreign_files(tmp_path, trained):
    _, last, _ = trained
    with pytest.raises(XLabError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(last.read_bytes()[:5000])
    with pytest.raises(XLabError, match="cannot read checkpoint"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(XLabError, match="not an XLab training checkpoint"):
        load_checkpoint(other)
    with pytest.raises(XLabError, match="not an XLab export"):
        load_model(tmp_path)


def test_save_is_atomic(tmp_path):
    p = tmp_path / "c.pt"
    save_checkpoint(p, {"step": 1})
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint(p, {"step": 2, "x": lambda: 0})  # fails half-way through writing
    assert torch.load(p, weights_only=True)["step"] == 1 and [f.name for f in tmp_path.iterdir()] == ["c.pt"]


def test_export_and_load_model_both_forms(tmp_path, trained):
    _, last, _ = trained
    out = export(last, tmp_path / "exp")
    assert sorted(f.name for f in out.iterdir()) == [
        "config.json",
        "config.yaml",
        "meta.json",
        "model.safetensors",
        "model_config.json",
        "tokenizer.model",
    ]
    umask = os.umask(0)
    os.umask(umask)
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {
        f.name: 0o666 & ~umask for f in out.iterdir()
    }  # readable like any file the user writes
    ratio = sum(f.stat().st_size for f in out.iterdir()) / last.stat().st_size
    assert 0.2 < ratio < 0.45  # AdamW's two moments stay behind
    with pytest.raises(XLabError, match="already exists"):
        export(last, out)
    with pytest.raises(XLabError, match="is an export, not a training checkpoint"):
        export(out, tmp_path / "exp2")  # an export of an export: say what the folder is
    m1, cfg1, tok1 = load_model(last)
    m2, cfg2, tok2 = xlab.load_model(out)
    assert not m1.training and not m2.training
    assert cfg1 == cfg2 and tok1.sha256 == tok2.sha256
    ids = torch.tensor([tok1.encode("the kalo ri an.")])
    with torch.no_grad():
        assert torch.equal(m1(ids), m2(ids))
    assert tok2.decode(tok2.encode("mus ter ion")) == "mus ter ion"


def test_evaluate_whole_split_matches_full_logits(tmp_path, trained):
    store_path, last, _ = trained
    m = evaluate_run(last, split="val", json_out=tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["loss"] == m["loss"]
    store = ShardStore(store_path)
    info = store.split_info("val")
    assert m["complete"] and m["tokens"] == info["target_tokens"]  # every target, the last batch too
    # Reference: naive full logits over every row.
    model, _, _ = load_model(last)
    rows = store.read_rows("val", np.arange(store.rows("val"))).astype(np.int64)
    x, y = torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])
    y = torch.where(y == store.pad_id, -100, y)
    with torch.no_grad():
        logits = model(x)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
    assert m["loss"] == pytest.approx(ref.item(), rel=1e-5)
    acc = ((logits.argmax(-1) == y) & (y != -100)).sum().item() / (y != -100).sum().item()
    assert m["accuracy"] == pytest.approx(acc)
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert m["bits_per_byte"] == pytest.approx(m["loss"] * info["target_tokens"] / (info["text_bytes"] * math.log(2)))
    part = evaluate_run(last, split="val", max_batches=1)
    assert not part["complete"] and part["tokens"] < m["tokens"]
    assert part["bits_per_byte"] == pytest.approx(
        part["loss"] * info["target_tokens"] / (info["text_bytes"] * math.log(2))
    )
    with pytest.raises(XLabError, match="not in shard store"):
        evaluate_run(last, split="test")


def test_evaluate_refuses_a_store_with_another_tokenizer(tmp_path, trained):
    _, last, _ = trained
    other = make_store(tmp_path, vocab=320)
    with pytest.raises(XLabError, match="another tokenizer"):
        evaluate_run(last, split="val", shards_dir=other)


def _ck_variant(tmp_path, last, name, **change):
    ck = torch.load(last, weights_only=True)
    for k, v in change.items():
        if v is None:
            del ck[k]
        else:
            ck[k] = v
    p = tmp_path / name
    torch.save(ck, p)
    return p


def test_broken_checkpoints_are_one_line_errors_everywhere(tmp_path, trained, cli):
    _, last, _ = trained
    rng = np.random.default_rng(0)
    files = {
        "random.pt": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "text.pt": b"hello\n",
        "empty.pt": b"",
        "truncated.pt": last.read_bytes()[:20000],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    bad = [tmp_path / n for n in files]
    bad.append(_ck_variant(tmp_path, last, "nomodel.pt", model=None))
    bad.append(_ck_variant(tmp_path, last, "tokstr.pt", tokenizer="abc"))
    bad.append(_ck_variant(tmp_path, last, "cfglist.pt", config=[1, 2]))
    cfg = dict(torch.load(last, weights_only=True)["config"])
    cfg["model"] = {**cfg["model"], "d_model": 48}
    bad.append(_ck_variant(tmp_path, last, "shape.pt", config=cfg))
    cfg2 = dict(cfg, model={**cfg["model"], "d_model": "wide"})
    bad.append(_ck_variant(tmp_path, last, "badcfg.pt", config=cfg2))
    for p in bad:
        with pytest.raises(XLabError):
            load_model(p)
        with pytest.raises(XLabError):
            export(p, tmp_path / f"out-{p.stem}")
        assert not (tmp_path / f"out-{p.stem}").exists()
    for args in (
        ["generate", tmp_path / "random.pt", "Hi"],
        ["export", tmp_path / "text.pt"],
        ["evaluate", tmp_path / "nomodel.pt"],
        ["export", tmp_path / "shape.pt"],
    ):
        r = cli(args, cwd=tmp_path, check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: "), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli(["generate", tmp_path / "random.pt", "Hi"], cwd=tmp_path, check=False)
    assert "cannot read checkpoint" in r.stderr and "Warning" not in r.stderr
    evil = tmp_path / "evil.pt"
    torch.save({"format": "xlab-checkpoint", "format_version": 1, "model": Evil()}, evil)
    r = cli(["generate", evil, "Hi"], cwd=tmp_path, check=False)
    assert r.returncode == 2 and "refusing to load" in r.stderr and "weights_only" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_export_folder_with_broken_json_is_a_one_line_error(tmp_path, trained):
    _, last, _ = trained
    out = export(last, tmp_path / "exp")
    good = {n: (out / n).read_bytes() for n in ("meta.json", "config.json")}
    for name in ("meta.json", "config.json"):
        for data in (b"", b"{garbage", b"\xff\xfe\x00", b"[1, 2]", b"{}"):
            if name == "meta.json" and data == b"{}":
                continue  # an empty meta is fine: step and store unknown
            (out / name).write_bytes(data)
            with pytest.raises(XLabError, match="cannot read|configuration"):
                load_model(out)
            (out / name).write_bytes(good[name])
    m, _, _ = load_model(out)
    assert not m.training


def _store_copy(store_path, dst, edit_manifest=None):
    import shutil

    shutil.copytree(store_path, dst)
    if edit_manifest is not None:
        man = json.loads((dst / "manifest.json").read_text())
        edit_manifest(man)
        (dst / "manifest.json").write_text(json.dumps(man))
    return dst


def test_evaluate_refuses_empty_splits_and_bad_options(tmp_path, trained, cli):
    store_path, last, _ = trained

    def add_empty_test(man):
        man["splits"]["test"] = {
            "rows": 0,
            "articles": 0,
            "real_tokens": 0,
            "target_tokens": 0,
            "text_bytes": 0,
            "text_chars": 0,
            "shards": [],
        }

    store = _store_copy(store_path, tmp_path / "s", add_empty_test)
    with pytest.raises(XLabError, match="split test of .* has no rows"):
        evaluate_run(last, split="test", shards_dir=store, json_out=tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()
    with pytest.raises(XLabError, match="'nope' not in shard store .*has train, val"):
        evaluate_run(last, split="nope", shards_dir=store)
    for n in (0, -3):
        with pytest.raises(XLabError, match="--max-batches must be >= 1"):
            evaluate_run(last, split="val", shards_dir=store, max_batches=n)
    with pytest.raises(XLabError, match="is a folder"):
        evaluate_run(last, split="val", shards_dir=store, json_out=tmp_path)
    r = cli(
        ["evaluate", last, "--split", "test", "--shards", store, "--json", tmp_path / "m.json"],
        cwd=tmp_path,
        check=False,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: split test") and "Traceback" not in r.stderr, r.stderr
    r = cli(["evaluate", last, "--json", tmp_path], cwd=tmp_path, check=False)
    assert r.returncode == 2 and "is a folder" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_evaluate_a_split_smaller_than_one_batch(tmp_path, trained):
    store_path, last, _ = trained
    store = ShardStore(store_path)
    assert store.rows("val") > 4  # batch_size 4 in the fixture: one batch of the split's first rows
    m = evaluate_run(last, split="val", max_batches=1)
    rows = store.read_rows("val", np.arange(4))
    assert m["tokens"] == int((rows[:, 1:] != store.pad_id).sum()) and not m["complete"]

    def only_three_rows(man):
        sh = man["splits"]["val"]["shards"][0]
        man["splits"]["val"]["rows"] = sh["rows"] = 3

    small = _store_copy(store_path, tmp_path / "small", only_three_rows)
    np.save(small / "val" / "000000.npy", store.read_rows("val", np.arange(3)))
    m3 = evaluate_run(last, split="val", shards_dir=small)
    assert m3["complete"] and m3["batches"] == 1
    assert m3["tokens"] == int((store.read_rows("val", np.arange(3))[:, 1:] != store.pad_id).sum())
    assert math.isfinite(m3["loss"])


def test_evaluate_refuses_damaged_stores(tmp_path, trained):
    store_path, last, _ = trained
    store = ShardStore(store_path)
    rows = store.read_rows("val", np.arange(store.rows("val")))
    wide = _store_copy(store_path, tmp_path / "wide")
    np.save(wide / "val" / "000000.npy", rows.astype(np.int64))  # what train refuses, evaluate refuses
    with pytest.raises(XLabError, match="int64"):
        evaluate_run(last, split="val", shards_dir=wide)
    bad = _store_copy(store_path, tmp_path / "bad")
    rows = rows.copy()
    rows[1, 3] = store.vocab_size + 7  # fits uint16, but no embedding row
    np.save(bad / "val" / "000000.npy", rows)
    with pytest.raises(XLabError, match="xlab data validate"):
        evaluate_run(last, split="val", shards_dir=bad)


def test_checkpoint_with_a_setting_this_xlab_no_longer_has_still_loads(tmp_path, trained):
    _, last, _ = trained
    ck = torch.load(last, weights_only=True)
    cfg = dict(ck["config"])
    cfg["shards"] = {**cfg["shards"], "rows_per_shard": 4096}  # dropped from the schema since
    old = _ck_variant(tmp_path, last, "old.pt", config=cfg)
    m, c, _ = load_model(old)
    ref, _, _ = load_model(last)
    assert c == load_model(last)[1]
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        assert torch.equal(m(ids), ref(ids))
    out = export(old, tmp_path / "exp")
    assert "rows_per_shard" not in (out / "config.json").read_text()
    cfg["model"] = {**cfg["model"], "new_kind_of_layer": True}  # unknown model settings are refused
    with pytest.raises(XLabError, match="unusable configuration"):
        load_model(_ck_variant(tmp_path, last, "future.pt", config=cfg))


def test_a_checkpoint_with_nan_weights_is_refused_in_one_line(tmp_path, trained, cli):
    """A diverged run's weights gave `IndexError` in beam search; now loading refuses them."""
    _, last, _ = trained
    ck = torch.load(last, weights_only=True)
    ck["model"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in ck["model"].items()}
    nan = tmp_path / "nan.pt"
    torch.save(ck, nan)
    with pytest.raises(XLabError, match="non-finite weights"):
        load_model(nan)
    r = cli(["generate", nan, "hi", "--beam-width", "2"], cwd=tmp_path, check=False)
    assert r.returncode == 2 and "non-finite weights" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_full_disk_is_one_line_and_keeps_the_earlier_files(tmp_path, trained, monkeypatch):
    """torch.save on a full disk raised `RuntimeError: basic_ios::clear: iostream error` (a ~60-line
    traceback from `xlab train --resume`); safetensors a SafetensorError from `xlab export`."""
    import safetensors.torch

    _, last, _ = trained
    before = last.read_bytes()

    def full(*a, **k):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:603] . unexpected pos\\nbasic_ios::clear: iostream error"
        )

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(XLabError, match=r"cannot write checkpoint .*is the disk full.*intact") as e:
        save_checkpoint(last, {"model": {}})
    assert "\n" not in str(e.value) and last.read_bytes() == before
    monkeypatch.setattr(safetensors.torch, "save_model", full)
    with pytest.raises(XLabError, match="cannot write the export"):
        export(last, tmp_path / "exp")
    assert not (tmp_path / "exp").exists()


def test_export_writes_the_default_folder_its_help_names(tmp_path, trained, monkeypatch):
    import re

    import typer.main

    from xlab.commands.app import app

    _, last, _ = trained
    monkeypatch.chdir(tmp_path)
    out = export(last)
    help_ = next(p.help for p in typer.main.get_command(app).commands["export"].params if p.name == "out")
    named = re.search(r"default: (\S+)\)", help_).group(1)
    ck = load_checkpoint(last)
    assert named.replace("<run>", ck["config"]["train"]["run_name"]).replace("<step>", str(ck["step"])) == str(out)


def test_a_file_that_is_no_checkpoint_says_so_everywhere(tmp_path, cli):
    """Random bytes or text read as a pickle used to report whatever their first bytes meant to
    torch's unpickler ("Unsupported operand 103", "KeyError: 101", "IndexError: pop from empty list")."""
    files = {"text.pt": b"garbage in\n", "empty.pt": b"", "json.pt": b'{"a": 1}\n'}
    for seed in range(30):
        files[f"random{seed}.pt"] = np.random.default_rng(seed).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(XLabError, match="not an XLab checkpoint") as e:
            load_model(tmp_path / name)
        assert str(e.value).startswith(f"cannot read checkpoint {tmp_path / name}: not an XLab checkpoint")
    for args in (["evaluate", "text.pt"], ["generate", "random3.pt", "Hi"], ["export", "empty.pt"]):
        r = cli(args, cwd=tmp_path, check=False)
        assert r.returncode == 2 and r.stderr.startswith(
            f"error: cannot read checkpoint {args[1]}: not an XLab checkpoint"
        )
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "exports").exists()


def test_a_recorded_store_that_does_not_resolve_points_to_shards(tmp_path, trained, cli, monkeypatch):
    """Run from another folder than training's, the relative store path in the checkpoint does not
    resolve: the message named `xlab data encode`, which would build a new store, not find the old one."""
    from xlab.commands.predict import cli_predict

    store_path, last, _ = trained
    moved = _ck_variant(tmp_path, last, "moved.pt", shards="shards/wiki")
    monkeypatch.chdir(tmp_path)
    want = f"the shard store the model was trained on was not found at shards/wiki, relative to {tmp_path}; pass --shards DIR"
    with pytest.raises(XLabError) as e:
        evaluate_run(moved, split="val")
    assert str(e.value) == want
    with pytest.raises(XLabError) as e:
        cli_predict(moved, out=tmp_path / "p.jsonl", num_articles=1, prompt_tokens=2, max_new_tokens=2,
                    shards_dir=None, greedy=True, seed=1, device="cpu")  # fmt: skip
    assert str(e.value) == want
    r = cli(["evaluate", "moved.pt"], cwd=tmp_path, check=False)
    assert r.returncode == 2 and r.stderr == f"error: {want}\n", r.stderr
    assert evaluate_run(moved, split="val", shards_dir=store_path)["tokens"] > 0


def test_the_pipeline_evaluates_again_only_when_the_checkpoint_or_store_changed(tmp_path, trained, monkeypatch):
    import shutil

    from xlab.commands import evaluate as evaluate_cmd
    from xlab.commands import pipeline

    store_path, last, root = trained
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    shutil.copy2(last, ckpt)
    store = _store_copy(store_path, tmp_path / "store")
    calls, real = [], evaluate_cmd.run
    monkeypatch.setattr(evaluate_cmd, "run", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    cfg = make_cfg(root / "runs")
    first = pipeline._evaluate(cfg, ckpt, store, force=False)
    assert len(calls) == 1 and (tmp_path / "run" / "eval-val.json").is_file()
    assert pipeline._evaluate(cfg, ckpt, store, force=False) == first and len(calls) == 1  # up to date
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten (a resumed run)
    assert pipeline._evaluate(cfg, ckpt, store, force=False) == first and len(calls) == 2
    assert pipeline._evaluate(cfg, ckpt, store, force=False) == first and len(calls) == 2
    (store / "manifest.json").write_text((store / "manifest.json").read_text() + "\n")  # re-encoded
    pipeline._evaluate(cfg, ckpt, store, force=False)
    assert len(calls) == 3
    pipeline._evaluate(cfg, ckpt, store, force=True)
    assert len(calls) == 4
    (tmp_path / "run" / "eval-val.json").write_text("{trunc")  # a damaged record is redone, not an error
    assert pipeline._evaluate(cfg, ckpt, store, force=False) == first and len(calls) == 5


# ------------------------------------------------------------------ names and paths read from files
@pytest.mark.parametrize(
    "key, name",
    [("train", "ABS"), ("train", "../../../x"), ("train", ".."), ("data", "../up"), ("data", "a/b")],
)
def test_a_crafted_name_in_a_checkpoint_never_leads_outside_the_project(tmp_path, trained, cli, key, name):
    """`xlab export` built exports/<run_name>-step<step> from the checkpoint's saved run_name: '/abs'
    or '../../../x' wrote outside exports/. A name read from a file is checked like a typed one."""
    _, last, _ = trained
    name = str(tmp_path / "outside") if name == "ABS" else name  # an absolute path, kept inside the test's folder
    cfg = torch.load(last, weights_only=True)["config"]
    field = "run_name" if key == "train" else "name"
    cfg = {**cfg, key: {**cfg[key], field: name}}
    proj = tmp_path / "a" / "b" / "proj"
    proj.mkdir(parents=True)
    _ck_variant(proj, last, "crafted.pt", config=cfg)
    before = sorted(p for p in tmp_path.rglob("*"))
    for args in (["export", "crafted.pt"], ["generate", "crafted.pt", "Hi", "--max-new-tokens", "2"]):
        r = cli(args, cwd=proj, check=False)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"{key}.{field} must be one folder name" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written, anywhere


def test_the_default_export_folder_is_always_one_folder_in_exports():
    from xlab.export import default_folder

    assert default_folder("demo", 12) == Path("exports/demo-step12")
    for bad in ("../x", "/abs", "a/b"):
        with pytest.raises(XLabError, match="--out"):
            default_folder(bad, 3)


def test_a_crafted_best_list_is_refused_on_resume_and_deletes_nothing(tmp_path, trained):
    """The best list's file names are deleted as better checkpoints arrive: a crafted one could name
    any file. They are checked at --resume, before any step."""
    store, last, _ = trained
    runs = tmp_path / "runs"
    (runs / "t" / "checkpoints").mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for bad in ("../../../victim.txt", str(victim), "last.pt", 3):
        ck = torch.load(last, weights_only=True)
        ck["best"] = [{"loss": 0.1, "step": 1, "file": bad}]
        torch.save(ck, runs / "t" / "checkpoints" / "last.pt")
        cfg = make_cfg(runs, "train.max_steps=8", "train.eval_every=1", "train.keep_best=1")
        with pytest.raises(XLabError, match="cannot resume .* best list"):
            train(cfg, shards_dir=store, resume=True)
        assert victim.read_text() == "keep me" and (runs / "t" / "checkpoints" / "last.pt").is_file()


# --------------------------------------------------------------------------- reproducible exports
def test_exports_of_one_checkpoint_are_byte_identical_file_by_file(tmp_path, trained):
    """The safetensors writer keeps its metadata in a hash map: the same checkpoint exported five
    times gave two different model.safetensors (the order of the __metadata__ keys)."""
    _, last, _ = trained
    outs = [export(last, tmp_path / f"e{i}") for i in range(6)]
    first = {f.name: f.read_bytes() for f in outs[0].iterdir()}
    assert len(first) == 6
    for out in outs[1:]:
        assert {f.name: f.read_bytes() for f in out.iterdir()} == first, out
    header = json.loads(first["model.safetensors"][8 : 8 + int.from_bytes(first["model.safetensors"][:8], "little")])
    assert list(header)[0] == "__metadata__" and list(header["__metadata__"]) == sorted(header["__metadata__"])
    assert "time" not in first["meta.json"].decode() and "date" not in first["meta.json"].decode()


def test_a_safetensors_header_is_written_in_one_order(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from xlab.export import canonical_safetensors

    tensors = {"b": torch.arange(6.0).view(2, 3), "a": torch.ones(5, dtype=torch.int16)}
    meta = {f"k{i}": str(i) for i in (7, 3, 9, 1, 5, 2, 8, 0, 6, 4)}
    files = []
    for i in range(4):
        p = tmp_path / f"{i}.safetensors"
        save_file(tensors, p, metadata=meta)
        canonical_safetensors(p)
        files.append(p.read_bytes())
    assert files.count(files[0]) == 4
    with safe_open(tmp_path / "0.safetensors", "pt") as f:
        assert f.metadata() == meta and all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    # A header that grows or shrinks (other spacing) is rewritten whole, the data kept as it was.
    p = tmp_path / "0.safetensors"
    data = p.read_bytes()
    n = int.from_bytes(data[:8], "little")
    wide = json.dumps(json.loads(data[8 : 8 + n]), indent=1).encode()
    wide += b" " * (-len(wide) % 8)
    p.write_bytes(len(wide).to_bytes(8, "little") + wide + data[8 + n :])
    canonical_safetensors(p)
    assert p.read_bytes() == files[0]


# ----------------------------------------------------------------------- paths a user gets wrong
def test_a_folder_or_a_cut_file_given_for_a_checkpoint_says_what_to_pass(tmp_path, trained, cli):
    _, last, root = trained
    ckdir, rundir = last.parent, last.parent.parent
    for args, words in (
        (["generate", ckdir, "Hi"], [f"{ckdir} is not an XLab export folder", f"{ckdir / 'last.pt'}"]),
        (["generate", rundir, "Hi"], [f"{rundir} is not an XLab export folder", f"{ckdir / 'last.pt'}"]),
        (["evaluate", ckdir], [f"pass one of the .pt files it holds: {ckdir / 'last.pt'}"]),
        (["export", ckdir], [f"checkpoint {ckdir} is a folder, not a .pt file", f"{ckdir / 'last.pt'}"]),
        (["export", rundir], [f"checkpoint {rundir} is a folder", f"{ckdir / 'last.pt'}"]),
    ):
        r = cli(args, cwd=tmp_path, check=False)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert all(w in r.stderr for w in words), r.stderr
    data = last.read_bytes()
    for n in (100, 5000, len(data) // 2, len(data) - 1):  # torch said miniz at length, or EINVAL
        (tmp_path / "cut.pt").write_bytes(data[:n])
        r = cli(["generate", "cut.pt", "Hi"], cwd=tmp_path, check=False)
        err = r.stderr.strip()
        assert r.returncode == 2 and "cut.pt: it is truncated or not a checkpoint" in err, err
        assert len(err.splitlines()) == 1 and len(err) < 140 and "miniz" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.pt"]


def test_an_interpolation_in_a_saved_configuration_is_refused(tmp_path, trained, cli):
    """Saved configurations hold resolved values: `${oc.env:HOME}` as a crafted run_name made export
    print the environment variable back."""
    _, last, _ = trained
    for where in ("config", "model_config"):
        ck = torch.load(last, weights_only=True)
        if where == "config":
            ck["config"]["train"]["run_name"] = "${oc.env:HOME}"
        else:
            ck["model_config"]["d_model"] = "${oc.env:HOME}"
        torch.save(ck, tmp_path / "crafted.pt")
        r = cli(["export", "crafted.pt"], cwd=tmp_path, check=False)
        assert r.returncode == 2 and "is an interpolation, not a value" in r.stderr, r.stderr
        assert os.environ["HOME"] not in r.stderr and len(r.stderr.strip().splitlines()) == 1
