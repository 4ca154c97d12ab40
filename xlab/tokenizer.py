"""XLab's tokenizer: SentencePiece BPE with byte fallback, wrapped in a codec that loses nothing.

For every ``str`` that UTF-8 can encode, ``decode(encode(s)) == s`` and ``encode`` never emits
``unk_id``. Plain SentencePiece cannot promise that: by default it NFKC-normalizes and collapses
whitespace (turned off here: ``identity`` normalization, ``remove_extra_whitespaces=False``), and
even then it writes a space as its meta symbol U+2581 (``▁``), so a literal U+2581 in the text comes
back as a space. This module adds a thin, exactly invertible codec around SentencePiece.

The codec (``encode``)
  1. Spaces after newlines. Every ``"\\n"`` that is followed by a character other than ``"\\n"``
     gets one extra space after it, and a non-empty text that does not start with ``"\\n"`` gets one
     leading space (the start of a text counts as "after a newline"). The word after a newline, and
     the first word of a text, are thus tokenized exactly like a word after a space (``▁word``),
     while ``"\\n"`` itself is one vocabulary piece (a user-defined symbol), so a newline costs one
     token. Inverse: remove every space that follows a ``"\\n"`` or starts the text. This is exact
     because after step 1 every ``"\\n"`` is followed by ``"\\n"``, the end, or an inserted space.
  2. Literal U+2581. The prepared text is cut at each ``▁``; the pieces are encoded by SentencePiece
     (never seeing a literal ``▁``) and joined with the three byte-fallback ids of ``▁``'s UTF-8
     bytes (E2 96 81). Decoding reads byte pieces as bytes, so they come back as ``▁``, never as a
     space. No escape character is needed, so no text can collide with one.

Decoding does not call SentencePiece: every id maps to the UTF-8 bytes of its surface (a normal
piece with ``▁`` read as a space, a byte piece as its byte), the bytes are joined and decoded with
``errors="replace"``, and step 1 is undone. Consequences, by design:
  - byte-fallback ids that do not form valid UTF-8 decode to U+FFFD (one per maximal invalid
    subsequence, Python's ``"replace"`` policy), never raise;
  - the control ids ``sos_id``, ``eos_id`` and ``pad_id`` decode to nothing (they are skipped);
  - ``unk_id`` (never produced by ``encode``) decodes to U+FFFD;
  - an id outside ``[0, vocab_size)`` raises ``ValueError``.

Training: SentencePiece sees one sentence per paragraph, prepared as in step 1 and cut at U+2581;
sentences longer than ``max_sentence_length`` bytes (which SentencePiece would silently skip) are
cut at spaces (or, without spaces, at character boundaries) and counted; at most ``max_sentences``
of them are kept by seeded reservoir sampling of our own (SentencePiece's sampler ignores its
seed). The same texts, arguments and seed give a byte-identical model file.

Following: SentencePiece (Kudo & Richardson, 2018, https://github.com/google/sentencepiece), BPE
(Sennrich et al., 2016), byte fallback as in LLaMA's tokenizer.
"""

from __future__ import annotations

import codecs
import io
import itertools
import os
import random
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xlab.errors import first_line
from xlab.fsio import atomic_write_bytes, sha256_bytes

META = "\u2581"  # SentencePiece's whitespace symbol; a literal one in text is encoded as bytes
NEWLINE = "\n"
_META_UTF8 = META.encode("utf-8")  # b"\xe2\x96\x81"
_SURROGATE = re.compile("[\ud800-\udfff]")
# A probe that only an XLab-style model (identity normalization, no whitespace collapsing, no dummy
# prefix, byte fallback, a "\n" piece) encodes back to itself; used to refuse other models on load.
if TYPE_CHECKING:
    import numpy as np

LONG_TEXT = 1 << 20  # characters: longer texts are encoded in line-aligned chunks
_PROBE = " a  b\u00a0\ufb01\uff26\n\n c\t\x00\U0001f600 "


def _default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 16))


def _prepare(s: str) -> str:
    """Step 1 of the codec: one space after every newline not followed by a newline or the end,
    and one leading space unless the text is empty or starts with a newline."""
    if not s:
        return s
    if NEWLINE in s:
        t = s.replace("\n", "\n ")
        # Every space right after a "\n" here is an inserted one; drop those before another "\n".
        # Each pass fixes every other newline of a run, so a run of k newlines takes ~log2(k) passes.
        while "\n \n" in t:
            t = t.replace("\n \n", "\n\n")
        if t[-1] == " " and t[-2] == "\n":
            t = t[:-1]
    else:
        t = s
    return t if t[0] == "\n" else " " + t


def _line_chunks(s: str, size: int) -> Iterator[str]:
    """``s`` cut into pieces of about ``size`` characters or more, each cut right after a run of
    newlines that a non-newline character follows. There the codec's encoding splits anyway: the
    newline is its own piece (SentencePiece never merges across it), :func:`_prepare` of the next
    piece adds the very space it inserts after a newline, and that of the previous piece drops its
    trailing one, so the pieces' ids concatenated equal the ids of ``s``. A text without such a cut
    after ``size`` is one piece."""
    i, n = 0, len(s)
    while i < n:
        k = s.find(NEWLINE, i + size)
        while k != -1 and k + 1 < n and s[k + 1] == NEWLINE:
            k += 1
        if k == -1 or k + 1 >= n:
            yield s[i:]
            return
        yield s[i : k + 1]
        i = k + 1


def _unprepare(t: str) -> str:
    """Inverse of :func:`_prepare`: drop every space that starts the text or follows a newline."""
    if t[:1] == " ":
        t = t[1:]
    return t.replace("\n ", "\n") if "\n " in t else t


def _surrogate_error(texts: Sequence[str]) -> ValueError | None:
    for k, s in enumerate(texts):
        if isinstance(s, str) and (m := _SURROGATE.search(s)):
            where = f"text {k}, " if len(texts) > 1 else ""
            return ValueError(
                f"cannot encode a lone surrogate U+{ord(m.group()):04X} at {where}position {m.start()}: "
                "it is not a Unicode scalar value and UTF-8 cannot encode it"
            )
    return None


def _split_long(line: str, max_bytes: int) -> list[str]:
    """Cut ``line`` into pieces of at most ``max_bytes`` UTF-8 bytes, each cut just before a space
    (so the next piece starts with ``▁word``) or, in a run without spaces, at a character boundary."""
    b = line.encode("utf-8")
    out, pos, n = [], 0, len(b)
    while n - pos > max_bytes:
        cut = b.rfind(b" ", pos + 1, pos + max_bytes + 1)
        if cut <= pos:
            cut = pos + max_bytes
            while b[cut] & 0xC0 == 0x80:  # never cut inside a UTF-8 character
                cut -= 1
        out.append(b[pos:cut].decode("utf-8"))
        pos = cut
    out.append(b[pos:].decode("utf-8"))
    return out


def training_sentences(texts: Iterable[str], max_sentence_length: int, stats: dict) -> Iterator[str]:
    """The sentences SentencePiece trains on: paragraphs of each text, prepared like ``encode``
    prepares them, cut at literal U+2581, long ones cut to ``max_sentence_length`` UTF-8 bytes.

    ``stats`` is updated in place: texts, lines (sentences before cutting), lines_split (lines longer
    than the limit), sentences (after cutting), bytes (UTF-8 bytes of the texts).

    Raises:
        ValueError: a text holds a lone surrogate (its position is named).
    """
    for key in ("texts", "lines", "lines_split", "sentences", "bytes"):
        stats.setdefault(key, 0)
    limit = max_sentence_length
    for s in texts:
        stats["texts"] += 1
        try:
            stats["bytes"] += len(s.encode("utf-8"))
        except UnicodeEncodeError:
            err = _surrogate_error([s])
            raise ValueError(f"training text {stats['texts'] - 1}: {err}") from None
        if META in s:  # rare: cut at U+2581 too; only a paragraph's first segment gets the space
            lines = [
                " " + seg if k == 0 else seg
                for para in s.split("\n")
                if para
                for k, seg in enumerate(para.split(META))
                if k == 0 or seg
            ]
        else:  # the common case, done by C string methods: every paragraph gets its leading space
            lines = (" " + s.replace("\n", "\n ")).split("\n")
            lines = [line for line in lines if line != " "]  # " " was an empty paragraph
        stats["lines"] += len(lines)
        # A line of n characters has at most 4n UTF-8 bytes: measure bytes only when that may exceed.
        if lines and max(map(len, lines)) * 4 > limit:
            cut: list[str] = []
            for line in lines:
                if len(line) * 4 > limit and len(line.encode("utf-8")) > limit:
                    stats["lines_split"] += 1
                    cut.extend(_split_long(line, limit))
                else:
                    cut.append(line)
            lines = cut
        stats["sentences"] += len(lines)
        yield from lines


def reservoir_sample(items: Iterable[str], k: int, seed: int) -> list[str]:
    """A uniform sample of at most ``k`` items (Vitter's algorithm R) with ``random.Random(seed)``;
    all items, in order, when there are at most ``k``. Memory: O(k) items."""
    rng = random.Random(seed)
    it = iter(items)
    out = list(itertools.islice(it, k))
    for i, x in enumerate(it, start=k):
        j = rng.randrange(i + 1)
        if j < k:
            out[j] = x
    return out


def _quiet_sentencepiece(spm) -> None:
    """Keep SentencePiece's C++ log lines (absl INFO/WARNING) off stderr; its errors reach Python
    as exceptions anyway."""
    setter = getattr(spm, "set_min_log_level", None)
    if setter is not None:
        try:
            setter(2)
        except Exception:  # noqa: BLE001 - older builds
            pass


class Tokenizer:
    """A reversible SentencePiece BPE tokenizer (see the module docstring for the codec).

    Ids: ``unk_id`` 0, ``sos_id`` 1, ``eos_id`` 2, ``pad_id`` 3 (control ids, never produced by
    ``encode`` and never matched from text, so a literal ``"<s>"`` is ordinary text), ``"\\n"`` 4,
    then 256 byte-fallback pieces, then the learned merges.
    """

    def __init__(self, model_bytes: bytes):
        import sentencepiece as spm

        self._bytes = bytes(model_bytes)
        if not self._bytes:  # SentencePiece would keep an uninitialized model and log on every call
            raise ValueError("not a SentencePiece model: the model is empty (0 bytes)")
        _quiet_sentencepiece(spm)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._bytes)
        except Exception as e:  # noqa: BLE001 - SentencePiece raises RuntimeError/OSError on a bad proto
            why = "the bytes do not parse as a model" if "ParseFromArray" in str(e) else first_line(e)
            raise ValueError(f"not a SentencePiece model: {why}") from None
        try:
            self._setup()
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - a proto that parses but is no usable model (IndexError, ...)
            raise ValueError(f"not an XLab tokenizer model: {type(e).__name__}: {first_line(e)}") from None

    def _setup(self) -> None:
        sp = self._sp
        if sp.get_piece_size() == 0:
            raise ValueError("not an XLab tokenizer model: it has no pieces")
        self.vocab_size: int = sp.get_piece_size()
        self.unk_id: int = sp.unk_id()
        self.sos_id: int = sp.bos_id()
        self.eos_id: int = sp.eos_id()
        self.pad_id: int = sp.pad_id()
        self.newline_id: int = sp.piece_to_id(NEWLINE)
        self.sha256: str = sha256_bytes(self._bytes)
        self._check_compatible()
        self._meta_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in _META_UTF8]
        # id -> UTF-8 bytes of its surface, for decoding without SentencePiece (see module docstring)
        surf: list[bytes] = []
        for i in range(self.vocab_size):
            if sp.is_byte(i):
                surf.append(bytes([int(sp.id_to_piece(i)[3:5], 16)]))
            elif sp.is_control(i):
                surf.append(b"")
            elif sp.is_unknown(i):
                surf.append("\ufffd".encode("utf-8"))
            else:
                surf.append(sp.id_to_piece(i).replace(META, " ").encode("utf-8"))
        self._surface = surf
        self.num_threads = _default_threads()  # default for batched encode
        self.train_report: dict | None = None  # set by :meth:`train`

    def _check_compatible(self) -> None:
        sp = self._sp
        ids = {self.unk_id, self.sos_id, self.eos_id, self.pad_id}
        problems = []
        if len(ids) != 4 or min(ids) < 0:
            problems.append("unk/sos/eos/pad ids are not four distinct ids")
        if self.newline_id == self.unk_id or sp.is_byte(self.newline_id):
            problems.append('no "\\n" piece')
        if sp.piece_to_id("<0x00>") == self.unk_id or not sp.is_byte(sp.piece_to_id("<0x00>")):
            problems.append("no byte fallback")
        elif sp.decode(sp.encode(_PROBE)) != _PROBE or sp.id_to_piece(sp.encode("a")[0]).startswith(META):
            problems.append("it rewrites text (normalization, whitespace collapsing or a dummy prefix)")
        if problems:
            raise ValueError("not an XLab tokenizer model: " + "; ".join(problems))

    # ------------------------------------------------------------------------------------ creation
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        path: str | os.PathLike | None,
        *,
        seed: int = 42,
        max_sentences: int = 2_000_000,
        max_sentence_length: int = 4096,
        num_threads: int | None = None,
        character_coverage: float = 0.9995,
        split_digits: bool = True,
    ) -> Tokenizer:
        """Train a BPE model on ``texts`` and write it to ``path`` atomically.

        Args:
            texts: documents (e.g. articles); split into paragraphs here.
            vocab_size: total ids, including the 4 special ids, ``"\\n"`` and 256 byte pieces.
            path: where the ``.model`` file goes (written atomically); None writes nothing.
            seed: seeds the reservoir sampling of training sentences.
            max_sentences: at most this many sentences are trained on (seeded uniform sample).
            max_sentence_length: longest sentence in UTF-8 bytes; longer paragraphs are cut.
            num_threads: SentencePiece trainer threads (None: 1). Its BPE trainer gains nothing
                from threads (measured on the sample: 1 thread is as fast as 2), and the count is
                recorded in the model file, so a fixed default gives the same file on every machine.
            character_coverage: share of characters that get their own piece; rarer ones are
                encoded as UTF-8 bytes.
            split_digits: every digit is its own piece (regular numbers, as in LLaMA).

        Returns:
            The tokenizer, with ``.train_report``: texts, lines, lines_split, sentences, sampled,
            bytes (UTF-8 bytes of the texts), seconds (wall time of the whole call).

        Raises:
            ValueError: no training text, a lone surrogate, or SentencePiece refused the settings
                (e.g. a vocabulary too small for the characters or too large for the corpus).
        """
        import sentencepiece as spm

        if max_sentence_length < 16 or max_sentences < 1:
            raise ValueError("max_sentence_length must be at least 16 (bytes) and max_sentences at least 1")
        t0 = time.perf_counter()
        stats: dict[str, Any] = {}
        sentences = reservoir_sample(training_sentences(texts, max_sentence_length, stats), max_sentences, seed)
        if not sentences:
            raise ValueError("no training text: every text is empty")
        stats["sampled"] = len(sentences)
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=model,
                model_type="bpe",
                vocab_size=vocab_size,
                byte_fallback=True,
                character_coverage=character_coverage,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                split_digits=split_digits,
                user_defined_symbols=[NEWLINE],
                required_chars=META,  # the space symbol, however rare spaces are (CJK, Thai)
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=3,
                unk_piece="<unk>",
                bos_piece="<s>",
                eos_piece="</s>",
                pad_piece="<pad>",
                max_sentence_length=max_sentence_length,
                input_sentence_size=0,  # use every sentence given: the sampling is ours
                shuffle_input_sentence=False,
                num_threads=num_threads or 1,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise ValueError(f"SentencePiece could not train: {str(e).strip().splitlines()[-1]}") from None
        data = model.getvalue()
        tok = cls(data)  # checked (it must round-trip text) before it replaces anything at `path`
        if path is not None:
            atomic_write_bytes(path, data)
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        tok.train_report = stats
        return tok

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a ``.model`` file. Raises FileNotFoundError, or ValueError for anything that is not
        an XLab SentencePiece model: an empty or foreign file, a damaged model, or a model that
        would not round-trip text."""
        return cls(Path(path).read_bytes())

    @classmethod
    def from_bytes(cls, model_bytes: bytes) -> Tokenizer:
        """A tokenizer from the bytes of a ``.model`` file (e.g. stored in a checkpoint); raises
        ValueError as :meth:`load` does."""
        return cls(model_bytes)

    def to_bytes(self) -> bytes:
        """The ``.model`` file's bytes; ``sha256`` is their hash."""
        return self._bytes

    # ------------------------------------------------------------------------------------ pieces
    def id_to_piece(self, i: int) -> str:
        """The SentencePiece piece of id ``i`` (``▁`` stands for a space, ``<0xNN>`` for a byte)."""
        self._check_id(i)
        return self._sp.id_to_piece(int(i))

    def is_byte(self, i: int) -> bool:
        """True when id ``i`` is a byte-fallback piece."""
        self._check_id(i)
        return self._sp.is_byte(int(i))

    def is_control(self, i: int) -> bool:
        """True for the sos, eos and pad ids."""
        self._check_id(i)
        return self._sp.is_control(int(i))

    def _check_id(self, i: int) -> None:
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside [0, {self.vocab_size})")

    # ------------------------------------------------------------------------------------ encode
    def encode(self, text: str | Sequence[str], num_threads: int | None = None) -> list[int] | list[list[int]]:
        """Token ids of a text, or of each text of a list (batched, ``num_threads`` C++ threads).

        Returns:
            ``list[int]`` for a ``str``, ``list[list[int]]`` for a list; never sos/eos/pad/unk ids.

        Raises:
            ValueError: a text holds a lone surrogate (the message names its position).
            TypeError: not a str or a sequence of str.
        """
        if isinstance(text, str):
            return self._encode_batch([text], 1)[0]
        texts = list(text)
        return self._encode_batch(texts, num_threads or self.num_threads)

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of one text as an ``int32`` array, encoded in line-aligned chunks of
        ``LONG_TEXT`` characters, so a very long article costs 4 bytes per token instead of a
        Python list's ~36 (the ids equal :meth:`encode`'s).

        Raises:
            ValueError: a lone surrogate, as :meth:`encode`.
        """
        import numpy as np

        if len(text) <= LONG_TEXT:
            return np.asarray(self._encode_batch([text], 1)[0], dtype=np.int32)
        parts = []
        for chunk in _line_chunks(text, LONG_TEXT):
            try:
                parts.append(np.asarray(self._encode_exact([chunk], 1)[0], dtype=np.int32))
            except ValueError:
                err = _surrogate_error([text])
                raise (err or ValueError("text the tokenizer cannot encode")) from None
        return np.concatenate(parts)

    def _encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        if not any(isinstance(t, str) and len(t) > LONG_TEXT for t in texts):
            return self._encode_exact(texts, num_threads)
        # A long text is encoded in line-aligned chunks (see _line_chunks): the same ids, at the
        # memory of one chunk instead of SentencePiece's ~170 bytes per character of the whole.
        flat, spans = [], []
        for t in texts:
            chunks = list(_line_chunks(t, LONG_TEXT)) if isinstance(t, str) and len(t) > LONG_TEXT else [t]
            spans.append(len(chunks))
            flat.extend(chunks)
        try:
            ids = self._encode_exact(flat, num_threads)
        except ValueError:
            err = _surrogate_error(texts)  # the position in the whole text, not in a chunk
            if err is not None:
                raise err from None
            raise
        out, i = [], 0
        for n in spans:
            out.append(ids[i] if n == 1 else [x for part in ids[i : i + n] for x in part])
            i += n
        return out

    def _encode_exact(self, texts: list[str], num_threads: int) -> list[list[int]]:
        try:
            prepared = [_prepare(s) for s in texts]
        except (TypeError, AttributeError):
            raise TypeError("encode takes a str or a sequence of str") from None
        # Texts with a literal U+2581 (rare) are cut there; their pieces are appended to the batch.
        special = [k for k, t in enumerate(prepared) if META in t]
        pieces: list[list[str]] = []
        if special:
            for k in special:
                parts = prepared[k].split(META)
                pieces.append(parts)
                prepared.extend(parts)
        try:
            ids = self._sp.encode(prepared, num_threads=num_threads)
        except (RuntimeError, TypeError):
            err = _surrogate_error(texts)
            if err is not None:
                raise err from None
            raise
        if special:
            n = len(texts)
            pos = n
            for k, parts in zip(special, pieces):
                out: list[int] = []
                for j in range(len(parts)):
                    if j:
                        out.extend(self._meta_ids)
                    out.extend(ids[pos + j])
                pos += len(parts)
                ids[k] = out
            del ids[n:]
        return ids

    # ------------------------------------------------------------------------------------ decode
    def decode(self, ids: Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
        """Text of a sequence of ids, or of each sequence of a batch (list of lists, 2-D array).

        An empty list is read as an empty sequence of ids (``""``). Control ids (sos, eos, pad) are skipped; ``unk_id`` and byte pieces that do not form valid
        UTF-8 give U+FFFD.

        Raises:
            ValueError: an id outside ``[0, vocab_size)``.
        """
        if hasattr(ids, "tolist"):  # numpy array or torch tensor
            ids = ids.tolist()
        if len(ids) and (isinstance(ids[0], (list, tuple)) or getattr(ids[0], "ndim", 0) >= 1):
            return [self._decode_one(x.tolist() if hasattr(x, "tolist") else x) for x in ids]
        return self._decode_one(ids)

    def _decode_bytes(self, ids: Sequence[int]) -> bytes:
        if not ids:
            return b""
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside [0, {self.vocab_size})")
        return b"".join(map(self._surface.__getitem__, ids))

    def _decode_one(self, ids: Sequence[int]) -> str:
        return _unprepare(self._decode_bytes(ids).decode("utf-8", errors="replace"))

    def incremental_decoder(self) -> IncrementalDecoder:
        """A decoder for generation: feed ids one at a time (see :class:`IncrementalDecoder`)."""
        return IncrementalDecoder(self)

    def __getstate__(self) -> dict:  # pickles as the model bytes (for worker processes)
        return {"model": self._bytes, "num_threads": self.num_threads}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model"])
        self.num_threads = state["num_threads"]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]}…)"


class IncrementalDecoder:
    """Decodes ids one at a time for streaming generation.

    ``push(id)`` returns the text that is certain so far (possibly ``""``): a UTF-8 character split
    over several byte pieces is held back until complete, and the codec's inserted spaces are
    dropped exactly as ``decode`` drops them. ``flush()`` returns what is held back (U+FFFD for an
    incomplete character) and resets the decoder. The concatenation of every ``push`` and the final
    ``flush`` equals ``tokenizer.decode(ids)``.

    Raises (push): ValueError for an id outside ``[0, vocab_size)``.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self.reset()

    def reset(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._after_newline = True  # the start of the text counts as "after a newline"

    def _emit(self, t: str) -> str:
        if not t:
            return t
        # Drop each space whose predecessor (before dropping) is a newline or the start of text;
        # only one character of state crosses pushes.
        if self._after_newline and t[0] == " ":
            out = t[1:]
        else:
            out = t
        if "\n " in out:
            out = out.replace("\n ", "\n")
        self._after_newline = t[-1] == "\n"
        return out

    def push(self, token_id: int) -> str:
        return self._emit(self._utf8.decode(self._tok._decode_bytes([int(token_id)])))

    def flush(self) -> str:
        out = self._emit(self._utf8.decode(b"", final=True))
        self.reset()
        return out
