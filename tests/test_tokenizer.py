"""The reversible tokenizer: round trips (hypothesis), special ids, newline handling, training
determinism and sampling, the incremental decoder, and the `xlab tokenizer` stage."""

from __future__ import annotations

import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xlab.errors import XLabError
from xlab.fsio import sha256_file
from xlab.tokenizer import META, Tokenizer, _prepare, _split_long, _unprepare, reservoir_sample, training_sentences

REPO = Path(__file__).resolve().parent.parent
SAMPLE_SPLITS = REPO / "data" / "splits" / "wiki"
HSETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def make_corpus(n_articles: int = 600, seed: int = 0) -> list[str]:
    """A generated, Wikipedia-like corpus (~300 KB): Zipf-distributed made-up words, sentences,
    numbers, some accented/CJK/emoji words, paragraphs separated by one or two newlines, and a few
    very long paragraphs (longer than the default max_sentence_length)."""
    rng = random.Random(seed)
    syl = ["ka", "lo", "ri", "the", "an", "mus", "ter", "ion", "pa", "ve", "st", "or", "in", "al", "de", "ne"]
    words = sorted({"".join(rng.choices(syl, k=rng.randint(1, 4))) for _ in range(400)})
    words += ["café", "naïve", "東京", "Zürich", "😀", "—", "¼"]
    weights = [1.0 / (r + 1) for r in range(len(words))]

    def sentence() -> str:
        ws = rng.choices(words, weights, k=rng.randint(4, 16))
        if rng.random() < 0.3:
            ws.insert(rng.randrange(len(ws)), str(rng.randint(1000, 2025)))
        s = " ".join(ws)
        return s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!", "?"])

    out = []
    for a in range(n_articles):
        paras = [" ".join(sentence() for _ in range(rng.randint(2, 6))) for _ in range(rng.randint(1, 4))]
        if a % 100 == 7:
            paras.append(" ".join(sentence() for _ in range(80)))  # > 4096 bytes
        out.append(rng.choice(["\n", "\n\n"]).join(paras))
    return out


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="session")
def tok(corpus, tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "t.model"
    return Tokenizer.train(corpus, 600, path, seed=1, num_threads=2)


def roundtrip(tok: Tokenizer, s: str) -> list[int]:
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert tok.unk_id not in ids
    assert not {tok.sos_id, tok.eos_id, tok.pad_id} & set(ids)
    assert all(0 <= i < tok.vocab_size for i in ids)
    return ids


def incremental(tok: Tokenizer, ids: list[int]) -> tuple[str, list[str]]:
    dec = tok.incremental_decoder()
    parts = [dec.push(i) for i in ids]
    parts.append(dec.flush())
    return "".join(parts), parts


# ------------------------------------------------------------------------------------------ basics
def test_special_ids_and_files(tok, tmp_path):
    assert (tok.unk_id, tok.sos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 600
    assert tok.id_to_piece(tok.newline_id) == "\n"
    assert [tok.is_control(i) for i in range(4)] == [False, True, True, True]
    assert tok.is_byte(tok.newline_id + 1) and tok.id_to_piece(tok.newline_id + 1) == "<0x00>"
    # bytes, file, sha256 agree; from_bytes gives the same encoding
    p = tmp_path / "copy.model"
    p.write_bytes(tok.to_bytes())
    again = Tokenizer.load(p)
    assert again.sha256 == tok.sha256 == sha256_file(p)
    text = "Kalo the mus 1999.\nZürich"
    assert Tokenizer.from_bytes(tok.to_bytes()).encode(text) == tok.encode(text)
    assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)  # for worker processes


def test_decode_accepts_arrays(tok):
    import numpy as np

    texts = ["Kalo the\n", "mus 1999 é"]
    ids = tok.encode(texts)
    assert tok.decode(np.array(ids[0], dtype=np.uint16)) == texts[0]
    assert tok.decode([np.int64(i) for i in ids[1]]) == texts[1]
    width = max(map(len, ids))
    padded = np.array([x + [tok.pad_id] * (width - len(x)) for x in ids], dtype=np.int32)  # (2, width)
    assert tok.decode(padded) == texts  # pad ids are skipped


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from([" ", "\n", "a", "\r", META]), max_size=30).map("".join))
def test_codec_spacing_is_exactly_invertible(s):
    t = _prepare(s)
    assert _unprepare(t) == s
    # every newline is followed by a newline, the end, or an inserted space
    assert all(t[k + 1 : k + 2] in ("", "\n", " ") for k, c in enumerate(t) if c == "\n")


def test_special_token_text_is_ordinary_text(tok):
    s = "<s> </s> <pad> <unk> <0x41> ▁"
    ids = roundtrip(tok, s)
    assert len(ids) > 6


@pytest.mark.parametrize(
    "s",
    [
        "",
        " ",
        "  ",
        "   a  ",
        "\n",
        "\n\n\n",
        " \n ",
        "\n a",
        "a\n",
        "a \n b",
        "\t",
        "\r\n",
        "\r",
        "a\r\nb\r\n",
        "\x00",
        "a\x00\x01\x7f\x1b[0m",
        "ﬁ ① Ｆ ½ ℌ e\u0301 \u00a0 \u3000 Å Å",
        "😀🇫🇷👩‍👩‍👧 𝔘",
        "▁",
        "▁▁",
        " ▁",
        "▁ ",
        "\n▁\n",
        "a▁b",
        "▁\n",
        "▁a▁",
        "<0xE2><0x96><0x81>",
        "\ufffd",
        "\ufeffBOM",
        "\u2028\u2029\x85\x0b\x0c",
    ],
)
def test_roundtrip_edge_cases(tok, s):
    ids = roundtrip(tok, s)
    assert incremental(tok, ids)[0] == s


@HSETTINGS
@given(st.text())
def test_roundtrip_any_text(tok, s):
    ids = roundtrip(tok, s)
    assert incremental(tok, ids)[0] == s


TRICKY = [" ", META, "\n", "\r", "\t", "a", "\x00", "\u2580", "\ufffd", "\xe2", "<0xE2>", "é"]


@HSETTINGS
@given(st.lists(st.sampled_from(TRICKY), max_size=40).map("".join))
def test_roundtrip_tricky_alphabet(tok, s):
    roundtrip(tok, s)


@HSETTINGS
@given(st.lists(st.lists(st.sampled_from(TRICKY + ["😀"]), max_size=12).map("".join), max_size=8))
def test_batch_equals_single(tok, texts):
    batch = tok.encode(texts, num_threads=2)
    assert batch == [tok.encode(s) for s in texts]
    assert tok.decode(batch) == (texts if texts else "")  # an empty list is an empty sequence of ids


def test_generated_corpus_roundtrips(tok, corpus):
    ids = tok.encode(corpus)
    assert tok.decode(ids) == corpus
    flat = {i for x in ids for i in x}
    assert not {tok.unk_id, tok.sos_id, tok.eos_id, tok.pad_id} & flat
    assert sum(map(len, ids)) < 0.5 * sum(len(s.encode()) for s in corpus)  # the merges do compress


@pytest.mark.skipif(not SAMPLE_SPLITS.is_dir(), reason="no sample splits (run `xlab data split` to add this check)")
def test_every_sample_article_roundtrips(tok):
    import pyarrow.parquet as pq

    n = 0
    for f in sorted(SAMPLE_SPLITS.glob("*.parquet")):
        texts = pq.read_table(f, columns=["text"]).column(0).to_pylist()
        ids = tok.encode(texts)
        assert tok.decode(ids) == texts, f
        assert all(tok.unk_id not in x for x in ids)
        n += len(texts)
    assert n > 0


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("s,pos", [("\ud800", 0), ("ab\udfffc", 2), ("▁\n\udc80", 2)])
def test_lone_surrogate_is_refused_with_position(tok, s, pos):
    with pytest.raises(ValueError, match=f"position {pos}"):
        tok.encode(s)
    with pytest.raises(ValueError, match=f"text 1, position {pos}"):
        tok.encode(["fine", s])


def test_decode_refuses_ids_out_of_range(tok):
    for bad in ([tok.vocab_size], [5, -1], [[1], [10**9]]):
        with pytest.raises(ValueError, match="outside"):
            tok.decode(bad)
    with pytest.raises(ValueError, match="outside"):
        tok.incremental_decoder().push(tok.vocab_size)
    with pytest.raises(ValueError, match="outside"):
        tok.id_to_piece(-1)


def test_invalid_bytes_decode_to_replacement_char_and_controls_are_skipped(tok):
    byte = {b: tok._sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)}
    a = tok.encode("a")
    assert tok.decode([byte[0xE2]]) == "\ufffd"
    assert tok.decode([byte[0xE2], byte[0x96]] + a) == "\ufffd a"  # "a" alone is "▁a"
    assert tok.decode([byte[0xFF], byte[0xC3], byte[0xA9]]) == "\ufffdé"
    assert tok.decode([tok.unk_id]) == "\ufffd"
    s = "x\ny"
    assert tok.decode([tok.sos_id] + tok.encode(s) + [tok.eos_id, tok.pad_id, tok.pad_id]) == s


def test_encode_type_error(tok):
    with pytest.raises(TypeError):
        tok.encode([b"bytes"])


def test_other_sentencepiece_models_are_refused(tmp_path):
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_corpus(40)), model_writer=buf, vocab_size=300, model_type="bpe", minloglevel=2
    )  # defaults: NFKC, dummy prefix, no bytes
    with pytest.raises(ValueError, match="not an XLab tokenizer"):
        Tokenizer.from_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.from_bytes(b"garbage")


# ------------------------------------------------------------------------------------------ newlines
def test_newline_is_one_token_and_words_after_it_tokenize_as_after_a_space(tok, corpus):
    nl = tok.newline_id
    assert tok.encode("\n") == [nl]
    assert tok.encode("\n\n\n") == [nl] * 3
    words = {w.strip(".!?,") for w in corpus[0].split()} - {""}
    for w in sorted(words)[:30]:
        after_space = tok.encode("x " + w)
        after_nl = tok.encode("x\n" + w)
        x = tok.encode("x")
        assert after_space[len(x) :] == tok.encode(w), w  # start of text == after a space
        assert after_nl == x + [nl] + tok.encode(w), w
        assert tok.encode("x\n\n" + w) == x + [nl, nl] + tok.encode(w), w
        assert tok.encode(w + "\n") == tok.encode(w) + [nl]
    assert tok.id_to_piece(tok.encode("kalo")[0]).startswith(META)


# ------------------------------------------------------------------------------------------ incremental
@HSETTINGS
@given(st.data())
def test_incremental_decoder_matches_decode_on_any_ids(tok, data):
    # random ids, biased toward byte pieces, spaces and newlines, to break characters and spaces
    space = tok.encode(" ")[0]
    pool = st.one_of(
        st.integers(0, tok.vocab_size - 1),
        st.integers(tok.newline_id, tok.newline_id + 256),
        st.sampled_from([space, tok.newline_id, tok.sos_id, tok.pad_id]),
    )
    ids = data.draw(st.lists(pool, max_size=30))
    text, parts = incremental(tok, ids)
    assert text == tok.decode(ids)
    # no part ends inside a character: every part is valid text (no lone surrogates or halves)
    assert all(p.encode("utf-8").decode("utf-8") == p for p in parts)


def test_incremental_decoder_holds_incomplete_characters(tok):
    ids = tok.encode("é😀")
    dec = tok.incremental_decoder()
    outs = [dec.push(i) for i in ids]
    assert "".join(outs) == "é😀" and dec.flush() == ""
    assert all(o in ("", "é", "😀") for o in outs)
    dec.push(tok._sp.piece_to_id("<0xF0>"))
    assert dec.flush() == "\ufffd"
    # a space after a newline that decode keeps is never lost
    ids = tok.encode("a\n b")
    assert incremental(tok, ids)[0] == "a\n b"


# ------------------------------------------------------------------------------------------ training
@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(["a", " ", "é", "😀", "東"]), max_size=80), st.integers(4, 20))
def test_split_long_lines(line, max_bytes):
    parts = _split_long(line, max_bytes)
    assert "".join(parts) == line
    assert all(len(p.encode("utf-8")) <= max_bytes for p in parts)
    assert all(p for p in parts) or parts == [""]


def test_long_lines_are_split_not_dropped(corpus):
    tok = Tokenizer.train(corpus[:60], 400, None, max_sentence_length=200, num_threads=1)
    r = tok.train_report
    assert r["texts"] == 60 and r["lines_split"] > 0 and r["sentences"] > r["lines"]
    assert r["sampled"] == r["sentences"]
    text = "x" * 250 + "東" * 100 + " é" * 100 + "\n\nb" + META + "c"  # no space in the first 550 bytes
    stats: dict = {}
    sents = list(training_sentences([text], 100, stats))
    assert all(len(x.encode()) <= 100 for x in sents)
    assert "".join(sents) == " " + text.replace("\n\n", " ").replace(META, "")
    assert sents[-2:] == [" b", "c"]  # a paragraph after a newline starts with a space; none after U+2581
    assert stats == {"texts": 1, "lines": 3, "lines_split": 1, "sentences": len(sents), "bytes": len(text.encode())}


def test_max_sentences_sampling_is_seeded():
    items = [str(i) for i in range(1000)]
    a = reservoir_sample(items, 50, seed=3)
    assert a == reservoir_sample(items, 50, seed=3) and len(set(a)) == 50
    assert a != reservoir_sample(items, 50, seed=4)
    assert reservoir_sample(items[:10], 50, seed=3) == items[:10]
    tok = Tokenizer.train(make_corpus(60), 400, None, max_sentences=30, num_threads=1)
    assert tok.train_report["sampled"] == 30 < tok.train_report["sentences"]


def test_training_is_deterministic_across_processes(tmp_path):
    corpus_file = tmp_path / "corpus.json"
    corpus_file.write_text(json.dumps(make_corpus(150, seed=5)))
    script = (
        "import json, sys; from xlab.tokenizer import Tokenizer; "
        "Tokenizer.train(json.load(open(sys.argv[1])), 500, sys.argv[2], seed=7, max_sentences=400, num_threads=2)"
    )
    files = []
    for k in range(2):
        out = tmp_path / f"m{k}.model"
        subprocess.run([sys.executable, "-c", script, str(corpus_file), str(out)], check=True, cwd=REPO)
        files.append(out.read_bytes())
    assert files[0] == files[1]
    assert Tokenizer.from_bytes(files[0]).vocab_size == 500


def test_training_refuses_empty_and_surrogates():
    with pytest.raises(ValueError, match="no training text"):
        Tokenizer.train(["", ""], 300, None)
    with pytest.raises(ValueError, match="max_sentence_length"):
        Tokenizer.train(["abc"], 300, None, max_sentence_length=3)
    with pytest.raises(ValueError, match="training text 1.*position 3"):
        Tokenizer.train(["ok", "abc\ud800"], 300, None)


# ------------------------------------------------------------------------------------------ the stage
def _cfg(tmp_path, *extra):
    from xlab.config import load_config

    return load_config(
        overrides=[
            f"paths.data_dir={tmp_path}/data",
            f"paths.tokenizer_dir={tmp_path}/tokenizers",
            "tokenizer.vocab_size=500",
            "tokenizer.num_threads=1",
            *extra,
        ],
        use_defaults_file=False,
    )


def _write_split(path: Path, texts: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(texts)
    pq.write_table(
        pa.table(
            {"id": [str(i) for i in range(n)], "url": [""] * n, "title": [""] * n, "text": texts},
            schema=pa.schema([(c, pa.string()) for c in ("id", "url", "title", "text")]),
        ),
        path,
    )


def test_stage_train_skip_force_and_show(tmp_path, corpus, capsys):
    from pipelines import train_tokenizer

    cfg = _cfg(tmp_path)
    with pytest.raises(XLabError, match="xlab data split"):
        train_tokenizer.run(cfg)
    splits = tmp_path / "data" / "splits" / "wiki"
    _write_split(splits / "train.parquet", corpus[:300])
    _write_split(splits / "val.parquet", corpus[300:330])
    m = train_tokenizer.run(cfg)
    model = tmp_path / "tokenizers" / "wiki.model"
    assert model.is_file() and (tmp_path / "tokenizers" / "wiki.json").is_file()
    assert m["params"] == {"vocab_size": 500, "seed": 42, "max_sentences": 2_000_000, "max_sentence_length": 4096}
    assert m["inputs"] == {"train.parquet": sha256_file(splits / "train.parquet")}
    c = m["counts"]
    assert c["texts"] == 300 and c["lines"] >= 300 and c["sampled_lines"] == c["sentences"] and c["lines_split"] >= 1
    tok = Tokenizer.load(model)
    assert m["tokenizer"]["sha256"] == tok.sha256 == sha256_file(model)
    val_tokens = sum(map(len, tok.encode(corpus[300:330])))
    assert c["val_tokens"] == val_tokens
    assert c["val_bytes_per_token"] == pytest.approx(
        sum(len(s.encode()) for s in corpus[300:330]) / val_tokens, abs=1e-3
    )
    assert train_tokenizer.run(cfg)["created_unix"] == m["created_unix"]  # up to date: skipped
    assert "up to date" in capsys.readouterr().out
    model.write_bytes(model.read_bytes() + b"x")  # a damaged model file is retrained
    again = train_tokenizer.run(cfg)
    assert again["created_unix"] > m["created_unix"] and again["tokenizer"]["sha256"] == sha256_file(model)
    assert train_tokenizer.run(_cfg(tmp_path, "tokenizer.vocab_size=450"))["counts"]["vocab_size"] == 450
    assert (
        train_tokenizer.run(_cfg(tmp_path, "tokenizer.vocab_size=450"), force=True)["created_unix"] > m["created_unix"]
    )

    out = train_tokenizer.show(cfg, "Kalo 😀\nthe")
    assert out["roundtrip"] and out["tokens"] == len(out["ids"])
    shown = capsys.readouterr().out
    assert "byte" in shown and "\\n" in shown and "<0xF0>" in shown
    with pytest.raises(XLabError, match="xlab tokenizer train"):
        train_tokenizer.show(cfg, "x", tokenizer_path=tmp_path / "missing.model")
    from xlab.config import stage_paths

    folder = stage_paths(cfg).tokenizer.parent  # a folder given for the .model file: name the ones it holds
    with pytest.raises(XLabError, match=rf"tokenizer {folder} is a folder, not a \.model file; pass one of"):
        train_tokenizer.show(cfg, "x", tokenizer_path=folder)


def test_stage_reports_too_small_vocabulary(tmp_path, corpus):
    from pipelines import train_tokenizer

    _write_split(tmp_path / "data" / "splits" / "wiki" / "train.parquet", corpus[:20])
    with pytest.raises(XLabError, match="vocab_size"):
        train_tokenizer.run(_cfg(tmp_path, "tokenizer.vocab_size=100"))


def test_stage_names_an_empty_train_split(tmp_path):
    from pipelines import train_tokenizer

    path = tmp_path / "data" / "splits" / "wiki" / "train.parquet"
    _write_split(path, [])
    with pytest.raises(XLabError, match="train split .* is empty") as e:
        train_tokenizer.run(_cfg(tmp_path))
    assert "vocab_size=N" not in str(e.value)
    _write_split(path, ["", ""])
    with pytest.raises(XLabError, match="has no text") as e:
        train_tokenizer.run(_cfg(tmp_path))
    assert "vocab_size=N" not in str(e.value)


@pytest.mark.parametrize("damage", ["empty", "random", "truncated", "proto"])
def test_anything_but_an_xlab_model_is_a_value_error(tok, damage):
    import numpy as np

    good = tok.to_bytes()
    data = {
        "empty": b"",
        "random": np.random.default_rng(0).bytes(3000),
        "truncated": good[: len(good) // 2],
        "proto": b"\n\x03abc",
    }[damage]
    with pytest.raises(ValueError, match="not a SentencePiece model|not an XLab tokenizer"):
        Tokenizer.from_bytes(data)


@pytest.mark.parametrize("content", [b"", b"\x8f\x01random bytes \xff\xfe" * 50])
def test_cli_bad_model_is_one_line(tmp_path, cli, content):
    model = tmp_path / "tokenizers" / "wiki.model"
    model.parent.mkdir()
    model.write_bytes(content)
    _write_split(tmp_path / "data" / "splits" / "wiki" / "train.parquet", ["a b"])
    for s in ("val", "test", "predict"):
        _write_split(tmp_path / "data" / "splits" / "wiki" / f"{s}.parquet", ["a b"])
    o = [
        "-o",
        f"paths.data_dir={tmp_path}/data",
        "-o",
        f"paths.tokenizer_dir={tmp_path}/tokenizers",
        "-o",
        f"paths.shards_dir={tmp_path}/shards",
    ]
    for args in (["tokenizer", "show", "Hello"], ["data", "encode"]):
        r = cli([*args, *o], cwd=tmp_path, check=False)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr and "xlab tokenizer train --force" in r.stderr


def test_stage_names_a_damaged_train_split(tmp_path):
    from pipelines import train_tokenizer

    path = tmp_path / "data" / "splits" / "wiki" / "train.parquet"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(XLabError, match=r"train\.parquet.*xlab data split --force"):
        train_tokenizer.run(_cfg(tmp_path))


@pytest.mark.parametrize("first", [0x4E00, 0x0E01])  # CJK ideographs, Thai: text with few or no spaces
def test_space_free_training_text_still_round_trips_spaces_and_newlines(tmp_path, first):
    """The space symbol is under character_coverage in such text; it is required in the vocabulary."""
    rng = random.Random(0)
    chars = [chr(c) for c in range(first, first + 30)]
    texts = ["".join(rng.choice(chars) for _ in range(4000)) for _ in range(3)]
    tok = Tokenizer.train(texts, 300, tmp_path / "t.model", seed=1, num_threads=1)
    for s in ["a b  c", texts[0][:50] + " " + texts[1][:50], "x\n\n y ", " "]:
        assert tok.decode(tok.encode(s)) == s


def test_a_refused_training_result_leaves_the_earlier_model_in_place(tmp_path, monkeypatch):
    path = tmp_path / "t.model"
    path.write_bytes(b"the earlier, good model")

    def refuse(self, data):
        raise ValueError("not an XLab tokenizer model: it rewrites text")

    monkeypatch.setattr(Tokenizer, "__init__", refuse)
    with pytest.raises(ValueError, match="rewrites text"):
        Tokenizer.train(["some text here, and more of it. " * 50], 280, path, seed=1, num_threads=1)
    assert path.read_bytes() == b"the earlier, good model"


def test_a_null_text_is_an_empty_article_for_tokenizer_training(tmp_path, corpus):
    from pipelines import train_tokenizer

    _write_split(tmp_path / "data" / "splits" / "wiki" / "train.parquet", [None, *corpus[:200], None])
    m = train_tokenizer.run(_cfg(tmp_path))  # was: AttributeError: 'NoneType' object has no attribute 'encode'
    assert Tokenizer.load(tmp_path / "tokenizers" / "wiki.model").vocab_size == m["params"]["vocab_size"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(TRICKY + ["ab", "😀", "\n\n", " the", "Zürich"]), max_size=120).map("".join),
       st.integers(1, 12))  # fmt: skip
def test_long_texts_encoded_in_line_chunks_give_the_same_ids(tok, monkeypatch, s, size):
    """Texts over LONG_TEXT characters are encoded chunk by chunk (bounded memory); the ids and the
    round trip are those of encoding the whole text at once."""
    import xlab.tokenizer as xt

    whole = tok.encode(s)
    monkeypatch.setattr(xt, "LONG_TEXT", size)
    assert tok.encode(s) == whole and tok.encode([s, "x", s]) == [whole, tok.encode("x"), whole]
    assert tok.decode(whole) == s


def test_a_long_article_keeps_its_ids_and_a_surrogate_its_position(tok, corpus, monkeypatch):
    import xlab.tokenizer as xt

    art = "\n\n".join(corpus[:300])
    whole = tok.encode(art)
    monkeypatch.setattr(xt, "LONG_TEXT", 1000)
    assert tok.encode(art) == whole
    bad = art[:5000] + "\ud800" + art[5000:]
    with pytest.raises(ValueError, match="5000"):
        tok.encode(bad)


def test_encode_array_and_the_encode_stage_keep_the_ids_of_a_long_article(tok, corpus, monkeypatch):
    """A 52 MB article cost 2.3 GB to encode (SentencePiece over the whole text, then a Python list);
    chunked into int32 arrays it costs about 85 MB, with the same ids."""
    import numpy as np

    import xlab.tokenizer as xt
    from pipelines import encode as enc

    art = "\n\n".join(corpus[:300])
    whole = tok.encode(art)
    monkeypatch.setattr(xt, "LONG_TEXT", 1000)
    monkeypatch.setattr(enc, "LONG_TEXT", 1000)
    a = tok.encode_array(art)
    assert a.dtype == np.int32 and a.tolist() == whole
    got = enc._encode_texts(tok, [art, "short text", art[:10] + "\ud800"], 1)
    assert [list(g) for g in got[:2]] == [whole, tok.encode("short text")] and "surrogate" in got[2]
