"""``xlab predict``: continue the first K tokens of N articles of the predict split and compare the
continuation with the article's own text (the reference), scored by the model's mean per-token loss
on the reference (teacher-forced).

Generation itself is :mod:`xlab.generate`; this module picks the prompts from the shard store and
writes the JSONL report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from xlab.device import resolve_device
from xlab.errors import XLabError
from xlab.generate import (Model, _check_cli_options, _check_seed, _continuations, _load, reference_nll)

def predict_articles(store: Any, num_articles: int, min_tokens: int, *, split: str = "predict",
                     chunk_rows: int = 1024) -> tuple[list[dict], int]:
    """The first ``num_articles`` articles of ``split`` with at least ``min_tokens`` text tokens.

    Reads rows in store order, ``chunk_rows`` at a time, and stops as soon as it has enough. An
    article starts at a row whose first token is ``<sos>``; consecutive rows of one article overlap
    by one token (the store's window rule), and the article ends at its ``<eos>``.

    Returns:
        (articles, skipped): each article ``{"index": ordinal in the split, "row": first row,
        "tokens": list[int] text ids (no <sos>/<eos>)}``; ``skipped``: shorter articles passed over.
    """
    import numpy as np

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


def predict(model: Model, tokenizer: Any, store: Any, *, num_articles: int, prompt_tokens: int,
            max_new_tokens: int, greedy: bool = False, seed: int = 42, temperature: float = 1.0,
            top_k: Optional[int] = None, top_p: float = 1.0, split: str = "predict") -> tuple[list[dict], int]:
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
        new = _continuations(model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, greedy=greedy, beam_width=1, length_penalty=1.0,
                             num_samples=1, seed=seed + i, eos_id=eos)[0]
        nll = reference_nll(model, prompt_ids, ref_targets)  # never empty: the article has > K tokens
        prompt_text, ref_text = _split_decode(tokenizer, text_prompt, ref)
        _, gen_text = _split_decode(tokenizer, text_prompt, new)
        records.append({
            "index": art["index"], "row": art["row"], "prompt": prompt_text, "reference": ref_text,
            "generated": gen_text, "prompt_tokens": len(text_prompt), "reference_tokens": len(ref_targets),
            "generated_tokens": len(new), "reference_loss": sum(nll) / len(nll),
        })
    return records, skipped


def _split_decode(tokenizer: Any, head: list[int], tail: list[int]) -> tuple[str, str]:
    """Texts of ``head`` and ``tail`` whose concatenation is ``decode(head + tail)`` (through the
    incremental decoder, so a character split across the boundary lands in the tail)."""
    dec = tokenizer.incremental_decoder()
    a = "".join(dec.push(t) for t in head)
    b = "".join(dec.push(t) for t in tail) + dec.flush()
    return a, b


def _store_path(cfg: Any, meta: dict, shards_dir: Optional[Path]) -> Path:
    """The shard store of ``xlab predict``: ``--shards``, else the store the checkpoint recorded,
    else ``shards/<data.name>`` of the checkpoint's configuration."""
    if shards_dir is not None:
        return Path(shards_dir)
    if meta.get("shards"):
        return Path(meta["shards"])
    from xlab.config import stage_paths

    try:
        return stage_paths(cfg).shards
    except Exception:
        raise XLabError("cannot tell which shard store the model was trained on; pass --shards") from None


def cli_predict(checkpoint: Path, *, out: Path, num_articles: int, prompt_tokens: int, max_new_tokens: int,
                shards_dir: Optional[Path], greedy: bool, seed: int, device: str) -> dict:
    """``xlab predict``: write one JSON line per article (see :func:`predict`) to ``out`` atomically
    and print a summary; sampling uses the checkpoint configuration's ``generate`` settings.

    Returns:
        Summary dict: articles, skipped, reference_loss (token-weighted mean, nats), out.

    Raises:
        XLabError: bad option values, a missing checkpoint or store, a store encoded with another
        tokenizer, no article long enough.
    """
    from xlab.io import atomic_write_text
    from xlab.shards import ShardStore

    if num_articles < 1:
        raise XLabError(f"--num-articles must be >= 1, got {num_articles}")
    if prompt_tokens < 1:
        raise XLabError(f"--prompt-tokens must be >= 1, got {prompt_tokens}")
    if max_new_tokens < 1:
        raise XLabError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    _check_seed(seed, num_articles)
    model, cfg, tok, meta = _load(checkpoint, resolve_device(device))
    gen_cfg = _get(cfg, "generate")
    temperature = float(_get(gen_cfg, "temperature", 1.0))
    top_k = _get(gen_cfg, "top_k", None)
    top_p = float(_get(gen_cfg, "top_p", 1.0))
    _check_cli_options(max_new_tokens, temperature, top_k, top_p)
    store = ShardStore(_store_path(cfg, meta, shards_dir))
    if store.tokenizer_sha256 != tok.sha256:
        raise XLabError(f"the shard store {store.path} was encoded with another tokenizer than the model's; "
                        "pass the model's store with --shards")
    if "predict" not in store.splits:
        raise XLabError(f"the shard store {store.path} has no predict split; run `xlab data encode`")
    records, skipped = predict(model, tok, store, num_articles=num_articles, prompt_tokens=prompt_tokens,
                               max_new_tokens=max_new_tokens, greedy=greedy, seed=seed, temperature=temperature,
                               top_k=top_k, top_p=top_p)
    if not records:
        raise XLabError(f"no predict-split article has more than {prompt_tokens} tokens; lower --prompt-tokens")
    n_tokens = sum(r["reference_tokens"] for r in records)
    mean_loss = sum(r["reference_loss"] * r["reference_tokens"] for r in records) / n_tokens
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    summary = {"articles": len(records), "skipped": skipped, "reference_tokens": n_tokens,
               "reference_loss": mean_loss, "reference_perplexity": math.exp(mean_loss), "out": str(out)}
    _print_summary(summary, greedy)
    return summary


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _print_summary(summary: dict, greedy: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="xlab predict", show_header=False)
    table.add_row("articles", f"{summary['articles']} ({summary['skipped']} shorter ones skipped)")
    table.add_row("decoding", "greedy" if greedy else "sampling")
    table.add_row("reference tokens", str(summary["reference_tokens"]))
    table.add_row("reference loss", f"{summary['reference_loss']:.4f} nats/token "
                                    f"(perplexity {summary['reference_perplexity']:.2f})")
    table.add_row("written", summary["out"])
    Console(highlight=False).print(table)
