"""``xlab data validate`` on an edited manifest: a readable but wrong manifest is listed with the
store's other problems (exit 1); only a store it cannot read at all is one line, exit 2."""

import json

import pytest
from test_encode import config, encode, write_corpus


def _edit(m, edit):
    sh = m["splits"]["val"]["shards"][0]
    if edit == "rows+1":
        m["splits"]["val"]["rows"] += 1
        sh["rows"] += 1
    elif edit == "split-rows+1":
        m["splits"]["val"]["rows"] += 1
    elif edit == "seq_len":
        m["seq_len"] = 8
    elif edit == "outside":
        sh["file"] = "../../outside.npy"
    elif edit == "rows-type":
        sh["rows"] = "many"
    elif edit == "count-type":
        m["splits"]["val"]["articles"] = [1]
    return m


@pytest.mark.parametrize(
    "edit, listed",
    [
        ("rows+1", ["val/000000.npy: ", "rows, the manifest says"]),
        ("split-rows+1", ["manifest: split val rows"]),
        ("seq_len", ["manifest: row_len 17 != seq_len + 1 (9)"]),
        ("outside", ["manifest: shard 0 of split val is '../../outside.npy'"]),
        ("rows-type", ["manifest: split val shard 0 rows is 'many', not a whole number"]),
        ("count-type", ["manifest: split val articles is [1], not a whole number"]),
    ],
)
def test_a_readable_but_wrong_manifest_is_listed_exit_1(tmp_path, cli, edit, listed):
    write_corpus(tmp_path, n=10)
    encode(config(tmp_path))
    store = tmp_path / "shards" / "wiki"
    (tmp_path / "outside.npy").write_bytes(b"never read")
    mpath = store / "manifest.json"
    mpath.write_text(json.dumps(_edit(json.loads(mpath.read_text()), edit)))
    args = ["data", "validate", "--shards", store, "-o", f"paths.tokenizer_dir={tmp_path / 'tokenizers'}"]
    r = cli(args, cwd=tmp_path, check=False)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "problem(s)" in r.stdout
    out = " ".join(r.stdout.split())  # rich may wrap long lines
    for text in listed:
        assert text in out, (text, r.stdout)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: {**m, "format_version": 2},
        lambda m: {**m, "seq_len": "long"},
        lambda m: {**m, "splits": [1]},
        lambda m: "not a store",
    ],
    ids=["format_version-2", "seq_len-type", "splits-type", "not-an-object"],
)
def test_a_store_validate_cannot_read_is_one_line_exit_2(tmp_path, cli, edit):
    write_corpus(tmp_path, n=10)
    encode(config(tmp_path))
    store = tmp_path / "shards" / "wiki"
    mpath = store / "manifest.json"
    mpath.write_text(json.dumps(edit(json.loads(mpath.read_text()))))
    r = cli(["data", "validate", "--shards", store], cwd=tmp_path, check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (r.returncode, r.stderr)
    assert "manifest" in r.stderr and "Traceback" not in r.stderr
    mpath.write_text("{not json")
    r = cli(["data", "validate", "--shards", store], cwd=tmp_path, check=False)
    assert r.returncode == 2 and "unreadable shard manifest" in r.stderr


def test_readers_still_refuse_a_wrong_manifest(tmp_path):
    from xlab.errors import XLabError
    from xlab.store import ShardStore

    write_corpus(tmp_path, n=10)
    encode(config(tmp_path))
    store = tmp_path / "shards" / "wiki"
    mpath = store / "manifest.json"
    mpath.write_text(json.dumps(_edit(json.loads(mpath.read_text()), "outside")))
    with pytest.raises(XLabError, match="outside the store"):
        ShardStore(store)
    assert ShardStore(store, lenient=True).manifest_problems
