"""The text layer of generation: a prompt in, text out, optionally streamed as it is generated.
The searches over ids are :mod:`xlab.generate.search`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from xlab.errors import XLabError
from xlab.generate.search import Model, continuations


def generate(
    model: Model,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    greedy: bool = False,
    beam_width: int = 1,
    length_penalty: float = 1.0,
    seed: int = 42,
    add_sos: bool = True,
    on_text: Optional[Callable[[str], None]] = None,
) -> str:
    """Continue ``prompt`` and return the decoded text of the whole sequence (prompt + continuation).

    Decoding the whole sequence at once means no space is inserted or lost where the prompt ends.
    ``<sos>`` (when ``add_sos``) and ``<eos>`` are not part of the text.

    Args:
        model: as in :func:`greedy_search`.
        tokenizer: XLab :class:`~xlab.tokenizer.Tokenizer` (encode, decode, sos_id, eos_id,
            incremental_decoder).
        prompt: the prompt text (may be empty when ``add_sos``).
        beam_width: > 1 runs :func:`beam_search` (the sampling options are then ignored).
        greedy: greedy search (same as ``temperature=0``).
        seed: seed of the sampling generator.
        add_sos: prepend ``<sos>``, as at the start of every training article.
        on_text: streaming: called with successive pieces of text whose concatenation is the
            returned text (through ``tokenizer.incremental_decoder()``); beam search, which knows its
            result only at the end, calls it once with the whole text.
        max_new_tokens, temperature, top_k, top_p, length_penalty: see :func:`sample` and
            :func:`beam_search`.

    Raises:
        ValueError: bad option values, or an empty prompt without ``<sos>``.
        XLabError: the prompt is not valid text (e.g. lone surrogates from bytes that are not UTF-8).
    """
    prompt_ids = ([tokenizer.sos_id] if add_sos else []) + encode_prompt(tokenizer, prompt)
    if not prompt_ids:
        raise ValueError("the prompt is empty and add_sos is off: nothing to continue")
    text_ids = prompt_ids[1:] if add_sos else prompt_ids
    streamer = Streamer(tokenizer, text_ids, on_text) if on_text is not None and beam_width <= 1 else None
    new = continuations(
        model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        greedy=greedy,
        beam_width=beam_width,
        length_penalty=length_penalty,
        num_samples=1,
        seed=seed,
        eos_id=tokenizer.eos_id,
        on_token=None if streamer is None else streamer.push,
    )[0]
    text = tokenizer.decode(text_ids + new)
    if streamer is not None:
        streamer.flush()
    elif on_text is not None:
        on_text(text)
    return text


class Streamer:
    """Streaming text: feeds the prompt's ids and then each new id (:meth:`push`, the ``on_token``
    callback of the searches) through the tokenizer's incremental decoder, calling ``on_text`` with
    each piece of text that is complete."""

    def __init__(self, tokenizer: Any, text_ids: list[int], on_text: Callable[[str], None]):
        self.dec = tokenizer.incremental_decoder()
        self.on_text = on_text
        for t in text_ids:
            self._emit(self.dec.push(t))

    def _emit(self, s: str) -> None:
        if s:
            self.on_text(s)

    def push(self, row: int, token: int) -> None:
        self._emit(self.dec.push(token))

    def flush(self) -> None:
        self._emit(self.dec.flush())


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """``tokenizer.encode(prompt)`` for a prompt typed by a user.

    Raises:
        XLabError: the prompt is not valid text, e.g. bytes that are not UTF-8 on the command line
            (Python hands them over as lone surrogates, which no tokenizer can encode).
    """
    try:
        return list(tokenizer.encode(prompt))
    except ValueError as e:
        raise XLabError(f"the prompt is not valid UTF-8 text: {str(e).splitlines()[0]}") from None
