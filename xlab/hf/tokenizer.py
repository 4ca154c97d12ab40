"""XLab's tokenizer as a Hugging Face ``tokenizer.json``: the same ids for the same text.

XLab's codec (:mod:`xlab.tokenizer`) is SentencePiece BPE with identity normalization, every space
kept, ``"\\n"`` as one piece, a space added before the first word of every line, and a literal U+2581
written as its three UTF-8 bytes. Each rule, in HF tokenizers' terms:

- ``"\\n"`` is an added (non-special) token, matched before anything else, so the text between two
  newlines is normalized and encoded on its own, as SentencePiece never merges across it.
- Step 1 of the codec gives every non-empty line exactly one leading space: a ``Prepend(" ")``
  normalizer, which leaves empty strings alone, applied to each stretch between newlines.
- The vocabulary spells a space as a space, not as U+2581. A literal U+2581 is then a character no
  piece contains, so byte fallback writes it as E2 96 81, as the codec does, and no piece merges
  across it. There is no pre-tokenizer: like SentencePiece, the merges see the whole line.
- BPE merges are derived from the SentencePiece scores (every split of a piece into two pieces,
  ranked by the piece's score), ``byte_fallback`` on, no unknown-token fusion.
- Decoding: byte pieces to bytes, then drop the leading space and each space after a newline.

Where SentencePiece and the merges could part (two merges of equal score overlapping), the ids can
differ while the text decodes the same; the tests pin the measured rate on real text. The control
tokens ``<s>``, ``</s>``, ``<pad>``, ``<unk>`` are special tokens that are never matched from text
(``split_special_tokens``), as in XLab, where a literal ``"<s>"`` is ordinary text.
"""

from __future__ import annotations

import json

from xlab.tokenizer import META, NEWLINE, Tokenizer


def _vocab_and_merges(tok: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    sp = tok._sp
    vocab: dict[str, int] = {}
    normal: dict[str, tuple[int, float]] = {}
    for i in range(tok.vocab_size):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or piece == NEWLINE:
            vocab[piece] = i
            continue
        piece = piece.replace(META, " ")
        vocab[piece] = i
        normal[piece] = (i, sp.get_score(i))
    ranked = []
    for piece, (i, score) in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-score, i, normal[left][0], normal[right][0], left, right))
    ranked.sort()
    return vocab, [(r[4], r[5]) for r in ranked]


def tokenizer_json(tok: Tokenizer) -> str:
    """The ``tokenizer.json`` text of ``tok`` (HF tokenizers' format; merges as pairs, since
    pieces hold spaces)."""
    from tokenizers import AddedToken, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    vocab, merges = _vocab_and_merges(tok)
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=False)
    hf = HFTokenizer(bpe)
    hf.normalizer = normalizers.Prepend(" ")
    hf.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0), decoders.Replace("\n ", "\n")]
    )
    specials = [tok.id_to_piece(i) for i in (tok.unk_id, tok.sos_id, tok.eos_id, tok.pad_id)]
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    hf.add_tokens([AddedToken(NEWLINE, special=False, normalized=False)])
    sos = tok.id_to_piece(tok.sos_id)
    hf.post_processor = processors.TemplateProcessing(
        single=f"{sos} $A", pair=f"{sos} $A {sos} $B", special_tokens=[(sos, tok.sos_id)]
    )
    return hf.to_str(pretty=True)


def tokenizer_config(tok: Tokenizer, max_len: int) -> dict:
    """``tokenizer_config.json``: the special tokens, and no text clean-up on decoding."""
    unk, sos, eos, pad = (tok.id_to_piece(i) for i in (tok.unk_id, tok.sos_id, tok.eos_id, tok.pad_id))
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": sos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "add_bos_token": True,
        "add_eos_token": False,
        "split_special_tokens": True,  # a literal "<s>" in text is text, as in XLab
        "clean_up_tokenization_spaces": False,  # XLab's decode keeps every space
        "model_max_length": max_len,
        "padding_side": "left",  # generation pads on the left; positions follow the attention mask
    }


def write_tokenizer(folder, tok: Tokenizer, max_len: int) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``folder``."""
    cfg = tokenizer_config(tok, max_len)
    (folder / "tokenizer.json").write_text(tokenizer_json(tok), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    specials = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
