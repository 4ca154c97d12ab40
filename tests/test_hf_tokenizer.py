"""The tokenizer of the Hugging Face export: ``AutoTokenizer`` gives XLab's ids for XLab's text and
decodes them back, on real Wikipedia text and on the codec's tricky alphabet."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("transformers", reason="the HF tokenizer tests need transformers: pip install -e '.[hf]'")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_tokenizer import HSETTINGS, TRICKY, make_corpus  # noqa: E402

from xlab.errors import XLabError  # noqa: E402
from xlab.hf.tokenizer import write_tokenizer  # noqa: E402
from xlab.tokenizer import Tokenizer  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
# Measured share of texts whose HF ids differ from XLab's (docs/export.md): none, on the sample's
# 10,033 Vital Article summaries and on the demo's val and test splits.
MAX_MISMATCH = 0.0
ALPHABET = TRICKY + ["😀", "\U0001d11e", "\x85", "\u2028", "\x1b", "<s>", "</s>", "<pad>", "<unk>", "<0x0A>", "  "]


def hf_pair(tok: Tokenizer, tmp_path):
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path, tok, 128)
    return AutoTokenizer.from_pretrained(str(tmp_path))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tok = Tokenizer.train(make_corpus(300, seed=5), 500, None, seed=1, num_threads=1)
    return tok, hf_pair(tok, tmp_path_factory.mktemp("hf-tok"))


@pytest.fixture(scope="module")
def summaries() -> list[str]:
    from pipelines.sources.sample import SAMPLE_SUMMARIES, locate_sample_file

    try:
        path = locate_sample_file(SAMPLE_SUMMARIES)
    except XLabError as e:
        pytest.skip(f"no Wikipedia sample: {e}")
    entries = json.loads(path.read_text(encoding="utf-8"))
    return [t for e in entries.values() if (t := (e.get("extract") or "").strip())]


def test_real_text_gives_xlab_ids_and_decodes_back(summaries, tmp_path):
    """A tokenizer trained on 3,000 Wikipedia summaries; every third of the 10,033 encoded."""
    tok = Tokenizer.train(summaries[:3000], 2000, None, seed=1, num_threads=1)
    hf = hf_pair(tok, tmp_path)
    texts = summaries[::3]
    ours, theirs = tok.encode(texts), hf(texts, add_special_tokens=False).input_ids
    mismatch = sum(a != b for a, b in zip(ours, theirs)) / len(texts)
    assert mismatch <= MAX_MISMATCH, f"{mismatch:.4%} of the texts get other ids"
    assert hf.batch_decode(theirs, skip_special_tokens=True) == texts
    assert sum(map(len, ours)) < 0.4 * sum(map(len, texts))  # merges are used, not bytes


@HSETTINGS
@given(st.lists(st.sampled_from(ALPHABET), max_size=40).map("".join))
def test_tricky_alphabet(pair, s):
    tok, hf = pair
    ids = hf(s, add_special_tokens=False).input_ids
    assert ids == tok.encode(s)
    assert hf.decode(ids, skip_special_tokens=True) == s == tok.decode(ids)


@HSETTINGS
@given(st.text())
def test_any_text(pair, s):
    tok, hf = pair
    ids = hf(s, add_special_tokens=False).input_ids
    assert ids == tok.encode(s) and hf.decode(ids, skip_special_tokens=True) == s


def test_sos_first_and_control_tokens_never_matched_from_text(pair):
    """Like ``xlab generate``, the tokenizer puts <sos> first; a literal "<s>" is text, as in XLab."""
    tok, hf = pair
    text = "<s>Hello</s> <pad>\nworld"
    ids = tok.encode(text)
    assert hf(text).input_ids == [tok.sos_id, *ids]
    assert tok.sos_id not in ids and tok.eos_id not in ids
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.sos_id, tok.eos_id, tok.pad_id)
    assert hf.decode([tok.sos_id, *ids, tok.eos_id], skip_special_tokens=True) == text
