"""``xlab predict``: continue the first K tokens of N articles of the predict split and compare the
continuation with the article's own text (the reference), scored by the model's mean per-token loss
on the reference (teacher-forced).

Generation itself is :mod:`xlab.generate.search`; this module picks the prompts from the shard store.
The command (options, the JSONL report, the summary) is :mod:`xlab.commands.predict`.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from xlab.generate.search import Model, continuations, reference_nll
from xlab.store import ShardStore


def predict_articles(
    store: ShardStore, num_articles: int, min_tokens: int, *, split: str = "predict", chunk_rows: int = 1024
) -> tuple[list[dict], int]:
    """The first ``num_articles`` articles of ``split`` with at least ``min_tokens`` text tokens.

    Reads rows in store order, ``chunk_rows`` at a time, and stops as soon as it has enough. An
    article starts at a row whose first token is ``<sos>``; consecutive rows of one article overlap
    by one token (the store's window rule), and the article ends at its ``<eos>``.

    Returns:
        (articles, skipped): each article ``{"index": ordinal in the split, "row": first row,
        "tokens": list[int] text ids (no <sos>/<eos>)}``; ``skipped``: shorter articles passed over.
    """
    total = store.rows(split)
    sos, eos, pad = store.sos_id, store.eos_id, store.pad_id
    found: list[dict] = []
    skipped = 0
    ordinal = -1
    current: dict | None = None
    is_open = False  # the current article has not reached its <eos> yet

    def close(article: dict | None) -> None:
        nonlocal skipped
        if article is None:
            return
        if len(article["tokens"]) >= min_tokens:
            found.append(article)
        else:
            skipped += 1

    for lo in range(0, total, chunk_rows):
        rows = store.read_rows(split, np.arange(lo, min(lo + chunk_rows, total)))
        for r, row in enumerate(rows.tolist()):
            if row[0] == sos:
                close(current)
                if len(found) >= num_articles:
                    return found, skipped
                ordinal += 1
                current = {"index": ordinal, "row": lo + r, "tokens": []}
                is_open = True
                body = row[1:]
            elif not is_open:
                continue  # a row of an article whose start we did not see (cannot happen in a valid store)
            else:
                body = row[1:]  # row[0] repeats the previous row's last token
            for t in body:
                if t == eos or t == pad:
                    is_open = False
                    break
                current["tokens"].append(t)
    close(current)
    return found[:num_articles], skipped


def predict(
    model: Model,
    tokenizer: Any,
    store: ShardStore,
    *,
    num_articles: int,
    prompt_tokens: int,
    max_new_tokens: int,
    greedy: bool = False,
    seed: int = 42,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    split: str = "predict",
) -> tuple[list[dict], int]:
    """Continue the first ``prompt_tokens`` tokens of the first ``num_articles`` articles of ``split``.

    Each prompt is ``<sos>`` + the article's first K text tokens. The reference is the article's next
    ``max_new_tokens`` tokens (with ``<eos>`` when the article ends within them); its mean per-token
    loss is the teacher-forced negative log-likelihood (nats) under the model. Article ``i`` is
    sampled with seed ``seed + i``. Articles with K tokens or fewer are skipped.

    Returns:
        (records, skipped). Each record: ``index``, ``row``, ``prompt``, ``reference``,
        ``generated`` (texts; ``prompt + reference`` and ``prompt + generated`` each equal the decode of
        the whole token sequence), ``prompt_tokens``, ``reference_tokens`` (``<eos>`` counted),
        ``generated_tokens``, ``reference_loss`` (mean nats per reference token).
    """
    articles, skipped = predict_articles(store, num_articles, prompt_tokens + 1, split=split)
    eos = tokenizer.eos_id
    records = []
    for i, art in enumerate(articles):
        text_prompt = art["tokens"][:prompt_tokens]
        rest = art["tokens"][prompt_tokens:]
        ref = rest[:max_new_tokens]
        ref_targets = ref + ([eos] if len(rest) < max_new_tokens else [])
        prompt_ids = [tokenizer.sos_id] + text_prompt
        new = continuations(
            model,
            prompt_ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            greedy=greedy,
            seed=seed + i,
            eos_id=eos,
        )[0]
        nll = reference_nll(model, prompt_ids, ref_targets)  # never empty: the article has > K tokens
        prompt_text, ref_text = _split_decode(tokenizer, text_prompt, ref)
        _, gen_text = _split_decode(tokenizer, text_prompt, new)
        records.append(
            {
                "index": art["index"],
                "row": art["row"],
                "prompt": prompt_text,
                "reference": ref_text,
                "generated": gen_text,
                "prompt_tokens": len(text_prompt),
                "reference_tokens": len(ref_targets),
                "generated_tokens": len(new),
                "reference_loss": sum(nll) / len(nll),
            }
        )
    return records, skipped


def _split_decode(tokenizer: Any, head: list[int], tail: list[int]) -> tuple[str, str]:
    """Texts of ``head`` and ``tail`` whose concatenation is ``decode(head + tail)`` (through the
    incremental decoder, so a character split across the boundary lands in the tail)."""
    dec = tokenizer.incremental_decoder()
    a = "".join(dec.push(t) for t in head)
    b = "".join(dec.push(t) for t in tail) + dec.flush()
    return a, b
