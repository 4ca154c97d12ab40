"""Stage versions: a release that leaves a stage alone leaves its output up to date; a stage whose
``STAGE_VERSION`` changed is redone, and the later stages only when its output changed.

The four data stages run in this process on a slice of the built-in Wikipedia sample with a small
vocabulary, one process each.
"""

import json
from pathlib import Path

import pytest

from pipelines import download, encode, split, train_tokenizer
from pipelines.stage import FIRST_STAGE_VERSION, is_up_to_date, write_manifest
from xlab.config import load_config
from xlab.store import ShardStore

STAGES = ("download", "split", "tokenizer", "encode")


def make_cfg(root: Path):
    return load_config(
        overrides=[
            f"paths.data_dir={root / 'data'}",
            f"paths.tokenizer_dir={root / 'tokenizers'}",
            f"paths.shards_dir={root / 'shards'}",
            "data.max_articles=150",
            "data.num_proc=1",
            "tokenizer.vocab_size=512",
            "shards.seq_len=32",
            "shards.articles_per_shard=40",
            "shards.num_proc=1",
        ],
        use_defaults_file=False,
    )


def manifests(root: Path) -> dict[str, Path]:
    return {
        "download": root / "data/raw/wiki/manifest.json",
        "split": root / "data/splits/wiki/manifest.json",
        "tokenizer": root / "tokenizers/wiki.json",
        "encode": root / "shards/wiki/manifest.json",
    }


def outputs(root: Path) -> dict[str, list[Path]]:
    return {
        "download": [root / "data/raw/wiki/articles.parquet"],
        "split": sorted((root / "data/splits/wiki").glob("*.parquet")),
        "tokenizer": [root / "tokenizers/wiki.model"],
        "encode": sorted((root / "shards/wiki").rglob("*.npy")),
    }


def run_all(cfg, capsys) -> set[str]:
    """Run the four stages in order; return the stages that said they were up to date."""
    download.run(cfg)
    split.run(cfg)
    train_tokenizer.run(cfg)
    encode.run(cfg)
    out = capsys.readouterr().out
    said = {"download": "download: up to date", "split": "split: up to date",
            "tokenizer": "tokenizer train (wiki): up to date", "encode": "encode: up to date"}  # fmt: skip
    return {s for s, line in said.items() if line in out}


def snapshot(root: Path) -> dict[str, tuple]:
    """Per stage: its manifest's bytes and its outputs' (path, mtime_ns, size)."""
    m, o = manifests(root), outputs(root)
    return {s: (m[s].read_bytes(), [(p, p.stat().st_mtime_ns, p.stat().st_size) for p in o[s]]) for s in STAGES}


def rewrite(path: Path, **changes) -> None:
    """Edit a manifest as another release would have written it (None removes a key)."""
    m = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            m.pop(k, None)
        else:
            m[k] = v
    path.write_text(json.dumps(m, indent=2))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The four stages run once; each test copies the result."""
    root = tmp_path_factory.mktemp("stages")
    cfg = make_cfg(root)
    download.run(cfg)
    split.run(cfg)
    train_tokenizer.run(cfg)
    encode.run(cfg)
    return root


@pytest.fixture
def root(built, tmp_path):
    import shutil

    shutil.copytree(built, tmp_path / "w", symlinks=True)
    return tmp_path / "w"


def test_every_stage_records_its_stage_version(root):
    m = {s: json.loads(p.read_text()) for s, p in manifests(root).items()}
    assert m["download"]["stage_version"] == download.STAGE_VERSION
    assert m["split"]["stage_version"] == split.STAGE_VERSION
    assert m["tokenizer"]["stage_version"] == train_tokenizer.STAGE_VERSION
    assert m["encode"]["stage_version"] == encode.STAGE_VERSION
    assert ShardStore(root / "shards/wiki").manifest["stage_version"] == encode.STAGE_VERSION
    assert all("xlab_version" in x for x in m.values())  # still recorded, for information


@pytest.mark.parametrize("release", ["9.9.9", "0.6.0"])
def test_manifests_of_another_release_with_the_same_stage_versions_are_up_to_date(root, capsys, release):
    """Another release (9.9.9: same stage versions recorded; 0.6.0: none recorded, i.e. version 1)
    leaves every stage up to date: each says so and rewrites nothing."""
    for path in manifests(root).values():
        if release == "0.6.0":
            rewrite(path, xlab_version=release, stage_version=None)
        else:
            rewrite(path, xlab_version=release)
    before = snapshot(root)
    assert run_all(make_cfg(root), capsys) == set(STAGES)
    assert snapshot(root) == before


def test_a_changed_stage_version_redoes_that_stage_only_when_its_output_is_the_same(root, capsys, monkeypatch):
    """The tokenizer's STAGE_VERSION bumped: download and split stay up to date, the tokenizer is
    trained again (and records the new version); it comes out byte-identical (seeded training), so
    encode's input hashes are unchanged and the store stays up to date."""
    before = snapshot(root)
    monkeypatch.setattr(train_tokenizer, "STAGE_VERSION", 2)
    assert run_all(make_cfg(root), capsys) == {"download", "split", "encode"}
    after = snapshot(root)
    assert after["download"] == before["download"] and after["split"] == before["split"]
    assert after["encode"] == before["encode"]
    m = json.loads(manifests(root)["tokenizer"].read_text())
    assert m["stage_version"] == 2 and after["tokenizer"][0] != before["tokenizer"][0]
    assert run_all(make_cfg(root), capsys) == set(STAGES)  # and now up to date at version 2


def test_a_changed_stage_version_whose_output_changes_redoes_the_later_stages(root, capsys, monkeypatch):
    """The split's STAGE_VERSION bumped and its output different (here: other bytes in the train
    split): download stays up to date, split is redone, and the tokenizer and encode are redone
    because the sha256 of their inputs changed."""
    before = snapshot(root)
    real = split.write_manifest

    def and_change_the_output(path, **kw):  # stands in for a split whose new code writes other bytes
        import pyarrow.parquet as pq

        train = Path(path).parent / "train.parquet"
        pq.write_table(pq.read_table(train), train, row_group_size=7)
        return real(path, **kw)

    monkeypatch.setattr(split, "STAGE_VERSION", 2)
    monkeypatch.setattr(split, "write_manifest", and_change_the_output)
    assert run_all(make_cfg(root), capsys) == {"download"}
    after = snapshot(root)
    assert after["download"] == before["download"]
    assert all(after[s][0] != before[s][0] for s in ("split", "tokenizer", "encode"))
    assert json.loads(manifests(root)["split"].read_text())["stage_version"] == 2


def test_a_changed_encode_stage_version_redoes_the_store(root, capsys, monkeypatch):
    monkeypatch.setattr(encode, "STAGE_VERSION", 2)
    assert run_all(make_cfg(root), capsys) == {"download", "split", "tokenizer"}
    assert ShardStore(root / "shards/wiki").manifest["stage_version"] == 2
    assert run_all(make_cfg(root), capsys) == set(STAGES)


def test_is_up_to_date_compares_the_stage_version_not_the_release(tmp_path, monkeypatch):
    m = tmp_path / "manifest.json"
    write_manifest(m, stage="x", params={"a": 1}, inputs={"f": "ab"}, counts={}, stage_version=3)
    assert is_up_to_date(m, {"a": 1}, {"f": "ab"}, stage_version=3)
    assert not is_up_to_date(m, {"a": 1}, {"f": "ab"}, stage_version=4)
    rewrite(m, xlab_version="9.9.9")
    assert is_up_to_date(m, {"a": 1}, {"f": "ab"}, stage_version=3)
    rewrite(m, stage_version=None)  # a manifest of XLab 0.6: version 1
    assert is_up_to_date(m, {"a": 1}, {"f": "ab"}, stage_version=FIRST_STAGE_VERSION)
    assert not is_up_to_date(m, {"a": 1}, {"f": "ab"}, stage_version=2)


def test_the_store_manifest_round_trips_its_stage_version():
    from xlab.store import StoreManifest, TokenizerEntry

    tok = TokenizerEntry(vocab_size=300, pad_id=0, sos_id=1, eos_id=2, unk_id=3)
    m = StoreManifest(seq_len=16, dtype="uint16", tokenizer=tok, splits={}, stage_version=2).to_json()
    assert m["stage_version"] == 2 and StoreManifest.from_json(m).stage_version == 2
    del m["stage_version"]  # a store of XLab 0.6
    assert StoreManifest.from_json(m).stage_version == 1
