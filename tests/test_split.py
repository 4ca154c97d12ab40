"""The split stage: exact seeded counts, determinism across processes, disjointness, skip logic."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import split
from pipelines.stage import write_manifest
from xlab.config import SPLITS, load_config
from xlab.errors import XLabError

ROOT = Path(__file__).resolve().parent.parent
FRACTIONS = (0.9, 0.05, 0.025, 0.025)


def write_raw(root: Path, n: int, name: str = "wiki") -> list[str]:
    """A stand-in for the download stage's output: ``n`` articles with ids ``a0..a{n-1}``."""
    ids = [f"a{i}" for i in range(n)]
    table = pa.table(
        {
            "id": ids,
            "url": [f"https://en.wikipedia.org/wiki/T{i}" for i in ids],
            "title": [f"T{i}" for i in ids],
            "text": [f"text of {i} " * (1 + len(i)) for i in ids],
        },
        schema=pa.schema([(c, pa.string()) for c in ("id", "url", "title", "text")]),
    )
    raw = root / "data" / "raw" / name
    raw.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, raw / "articles.parquet")
    write_manifest(raw / "manifest.json", stage="download", params={}, inputs={}, counts={"articles": n})
    return ids


def make_cfg(root, *overrides):
    return load_config(overrides=[f"paths.data_dir={root / 'data'}", *overrides], use_defaults_file=False)


def read_splits(root, name="wiki"):
    return {s: pq.read_table(root / "data" / "splits" / name / f"{s}.parquet").to_pylist() for s in SPLITS}


# --------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize(
    "n, expected",
    [
        (0, [0, 0, 0, 0]),
        (3, [3, 0, 0, 0]),
        (4, [1, 1, 1, 1]),
        (10, [7, 1, 1, 1]),
        (40, [36, 2, 1, 1]),
        (100, [90, 5, 3, 2]),
        (10_093, [9084, 505, 252, 252]),
    ],
)
def test_split_counts(n, expected):
    assert split.split_counts(n, FRACTIONS) == expected


def test_split_counts_zero_fraction_and_sum():
    assert split.split_counts(7, (0.5, 0.5, 0.0, 0.0)) == [4, 3, 0, 0]
    for n in range(4, 300):
        c = split.split_counts(n, FRACTIONS)
        assert sum(c) == n and min(c) >= 1
        if n >= 40:  # from here on no split needs topping up to one article
            assert all(abs(ci - f * n) < 1 for ci, f in zip(c, FRACTIONS))


# ----------------------------------------------------------------------------------- assignment
def test_assignment_depends_on_seed_and_ids_not_order():
    ids = [f"id{i}" for i in range(2000)]
    a = split.assign_splits(ids, 42, FRACTIONS)
    rev = split.assign_splits(ids[::-1], 42, FRACTIONS)[::-1]
    assert (a == rev).all()  # the input order does not matter
    assert [int((a == k).sum()) for k in range(4)] == split.split_counts(2000, FRACTIONS)
    assert (split.assign_splits(ids, 43, FRACTIONS) != a).mean() > 0.05  # another seed, another split
    # Growing the corpus by 10% leaves almost every earlier article where it was.
    grown = split.assign_splits(ids + [f"new{i}" for i in range(200)], 42, FRACTIONS)[:2000]
    assert (grown == a).mean() > 0.97


# -------------------------------------------------------------------------------------- the stage
def test_run_disjoint_complete_and_counted(tmp_path):
    ids = write_raw(tmp_path, 1000)
    out = split.run(make_cfg(tmp_path))
    parts = read_splits(tmp_path)
    got = {s: [r["id"] for r in rows] for s, rows in parts.items()}
    assert [len(got[s]) for s in SPLITS] == split.split_counts(1000, FRACTIONS) == [900, 50, 25, 25]
    assert sorted(sum(got.values(), [])) == sorted(ids)  # every article once: disjoint and complete
    for s in SPLITS:  # articles keep the raw order inside a split
        assert got[s] == sorted(got[s], key=lambda i: int(i[1:]))
    assert parts["val"][0]["text"] == f"text of {got['val'][0]} " * (1 + len(got["val"][0]))
    m = json.loads((tmp_path / "data/splits/wiki/manifest.json").read_text())
    assert {s: m["counts"][s] for s in SPLITS} == {"train": 900, "val": 50, "test": 25, "predict": 25}
    assert m["counts"]["characters"]["val"] == sum(len(r["text"]) for r in parts["val"])
    assert m["params"] == {"seed": 42, "fractions": dict(zip(SPLITS, FRACTIONS))}
    assert m["inputs"]["articles.parquet"] == split.sha256_file(tmp_path / "data/raw/wiki/articles.parquet")
    assert out["counts"]["articles"] == 1000


def test_every_split_gets_an_article_from_four(tmp_path):
    write_raw(tmp_path, 4)
    split.run(make_cfg(tmp_path))
    assert [len(v) for v in read_splits(tmp_path).values()] == [1, 1, 1, 1]


def test_skip_force_and_new_seed(tmp_path):
    write_raw(tmp_path, 200)
    cfg = make_cfg(tmp_path)
    assert split.run(cfg)["skipped"] is False
    first = read_splits(tmp_path)
    assert split.run(cfg)["skipped"] is True
    assert split.run(cfg, force=True)["skipped"] is False and read_splits(tmp_path) == first
    assert split.run(make_cfg(tmp_path, "data.split_seed=7"))["skipped"] is False
    assert read_splits(tmp_path) != first
    write_raw(tmp_path, 201)  # new input: redone
    assert split.run(make_cfg(tmp_path, "data.split_seed=7"))["skipped"] is False


def test_duplicate_ids_refused(tmp_path):
    raw = tmp_path / "data/raw/wiki"
    write_raw(tmp_path, 3)
    t = pq.read_table(raw / "articles.parquet")
    pq.write_table(pa.concat_tables([t, t]), raw / "articles.parquet")
    with pytest.raises(XLabError, match="duplicate article ids"):
        split.run(make_cfg(tmp_path))


def test_same_split_in_two_processes(tmp_path):
    """Two interpreters with different hash salts write byte-identical splits."""
    results = []
    for salt in ("1", "2"):
        work = tmp_path / f"w{salt}"
        write_raw(work, 300)
        env = dict(os.environ, PYTHONHASHSEED=salt, PYTHONPATH=str(ROOT))
        p = subprocess.run(
            [sys.executable, "-m", "xlab", "data", "split"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 0, p.stderr
        results.append({s: (work / f"data/splits/wiki/{s}.parquet").read_bytes() for s in SPLITS})
    assert results[0] == results[1]


def test_missing_raw_is_one_line_exit_2(tmp_path, cli):
    p = cli(["data", "split"], cwd=tmp_path, check=False)
    err = p.stderr.strip()
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(err.splitlines()) == 1
    assert err.startswith("error: raw articles not found") and "`xlab data download`" in err
    assert not (tmp_path / "data" / "splits").exists()


def test_no_articles_is_refused_and_keeps_the_earlier_splits(tmp_path):
    write_raw(tmp_path, 20)
    split.run(make_cfg(tmp_path))
    before = read_splits(tmp_path)
    write_raw(tmp_path, 0)
    with pytest.raises(XLabError, match="holds no articles.*xlab data download"):
        split.run(make_cfg(tmp_path))
    assert read_splits(tmp_path) == before


@pytest.mark.parametrize("damage", ["empty", "random", "truncated", "int_text"])
def test_damaged_raw_file_is_one_clear_error(tmp_path, damage):
    write_raw(tmp_path, 20)
    split.run(make_cfg(tmp_path))
    before = read_splits(tmp_path)
    p = tmp_path / "data/raw/wiki/articles.parquet"
    data = p.read_bytes()
    if damage == "int_text":
        pq.write_table(pa.table({"id": ["a", "b"], "url": ["u", "v"], "title": ["t", "s"], "text": [1, 2]}), p)
    else:
        p.write_bytes({"empty": b"", "random": os.urandom(5000), "truncated": data[: len(data) // 2]}[damage])
    with pytest.raises(XLabError, match=r"articles\.parquet.*xlab data download --force"):
        split.run(make_cfg(tmp_path))
    assert read_splits(tmp_path) == before


@pytest.mark.parametrize("manifest", ["[1]", "[]", '"x"'])
def test_raw_manifest_of_the_wrong_shape(tmp_path, manifest):
    from pipelines.stage import is_up_to_date, read_manifest

    write_raw(tmp_path, 10)
    m = tmp_path / "data/raw/wiki/manifest.json"
    m.write_text(manifest)
    assert read_manifest(m) is None and not is_up_to_date(m, {}, {})
    with pytest.raises(XLabError, match="not a manifest; run `xlab data download --force`"):
        split.run(make_cfg(tmp_path))


def test_summary_warns_of_empty_splits(tmp_path, capsys):
    write_raw(tmp_path, 3)
    split.run(make_cfg(tmp_path))
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: the val, test, predict splits are empty (3 articles in all)" in out
    write_raw(tmp_path, 10)
    split.run(make_cfg(tmp_path))
    assert "warning" not in capsys.readouterr().out


def test_a_full_disk_while_splitting_is_not_blamed_on_the_raw_file(tmp_path):
    """split --force on a full disk said "cannot read data/raw/...; run `xlab data download --force`"."""
    import errno

    from pipelines.stage import reading_parquet
    from xlab.errors import XLabError

    with pytest.raises(OSError) as e:
        with reading_parquet(tmp_path / "articles.parquet", "xlab data download --force"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not isinstance(e.value, XLabError) and e.value.errno == errno.ENOSPC
    with pytest.raises(XLabError, match="cannot read .*articles.parquet.*download --force"):
        with reading_parquet(tmp_path / "articles.parquet", "xlab data download --force"):
            raise OSError("Couldn't deserialize thrift: a damaged page")  # pyarrow's, without errno


@pytest.mark.parametrize("stage", ["download", "split", "train_tokenizer"])
def test_a_second_writer_of_a_stage_output_is_refused_naming_the_holder(tmp_path, stage):
    """Download, split and tokenizer training hold their output's lock (train and encode: their tests)."""
    import importlib

    from xlab.config import stage_paths
    from xlab.errors import XLabError
    from xlab.fsio import exclusive_lock, lock_path

    write_raw(tmp_path, 40)
    cfg = make_cfg(tmp_path, f"paths.tokenizer_dir={tmp_path / 'tokenizers'}", "data.max_articles=40")
    out = {"download": "raw", "split": "splits", "train_tokenizer": "tokenizer"}[stage]
    target = getattr(stage_paths(cfg), out)
    with exclusive_lock(lock_path(target), "a running stage"):
        with pytest.raises(XLabError, match=rf"in use by pid {os.getpid()} on "):
            importlib.import_module(f"pipelines.{stage}").run(cfg)


# --------------------------------------------------------------------------------------- memory
def test_streaming_a_split_holds_the_batches_in_flight_not_the_file(tmp_path):
    """Reading a parquet file batch by batch (split, tokenizer training and encode all do) keeps
    Arrow's memory at a few row groups: with pyarrow's default ``pre_buffer=True`` every chunk read
    stayed allocated until the file closed, so the peak reached about the file's size."""
    from pipelines.stage import parquet_file
    from pipelines.train_tokenizer import iter_texts

    path = tmp_path / "train.parquet"
    schema = pa.schema([("id", pa.string()), ("text", pa.string())])
    with pq.ParquetWriter(path, schema, compression="none") as w:
        for g in range(60):  # 60 row groups of 50 texts of 2,000 random hex characters: ~6 MB
            w.write_batch(
                pa.record_batch([[f"{g}-{i}" for i in range(50)], [os.urandom(1000).hex() for _ in range(50)]], schema)
            )
    size = path.stat().st_size
    assert pq.ParquetFile(path).metadata.num_row_groups == 60

    def peak_while(read) -> int:
        base = pa.total_allocated_bytes()
        peak = 0
        for _ in read():
            peak = max(peak, pa.total_allocated_bytes() - base)
        return peak

    pf = parquet_file(path, "xlab data split --force")
    by_batches = peak_while(lambda: pf.iter_batches(batch_size=50, columns=["id", "text"]))
    by_texts = peak_while(lambda: iter_texts(path, batch_rows=50))
    assert by_batches < size / 6, (by_batches, size)  # a row group is 1/60 of the file
    assert by_texts < size / 6, (by_texts, size)
    # The same pass with pyarrow's default holds about the whole file: the measure can tell them apart.
    default = pq.ParquetFile(path)
    assert peak_while(lambda: default.iter_batches(batch_size=50, columns=["id", "text"])) > size / 2
