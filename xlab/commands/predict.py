"""``xlab predict``: options, the JSONL report written atomically and the summary table; the work is
:func:`xlab.generate.predict.predict`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from rich.console import Console
from rich.table import Table

from xlab.checkpoint import trained_store
from xlab.commands.generate import check_options, load_for_cli, note_prompt_cut
from xlab.device import resolve_device
from xlab.errors import XLabError
from xlab.fsio import atomic_write_text
from xlab.generate.predict import predict
from xlab.store import ShardStore

if TYPE_CHECKING:
    from omegaconf import DictConfig


def _store_path(cfg: DictConfig, meta: dict, shards_dir: Optional[Path]) -> Path:
    """The shard store of ``xlab predict``: ``--shards``, else the one the model was trained on."""
    if shards_dir is not None:
        return Path(shards_dir)
    return trained_store(meta, cfg)


def cli_predict(
    checkpoint: Path,
    *,
    out: Path,
    num_articles: int,
    prompt_tokens: int,
    max_new_tokens: int,
    shards_dir: Optional[Path],
    greedy: bool,
    seed: int,
    device: str,
    force: bool = False,
    sampling: Optional[dict] = None,
) -> dict:
    """``xlab predict``: write one JSON line per article (see :func:`predict`) to ``out`` atomically
    and print a summary. An existing ``out`` is replaced only with ``force``.

    ``sampling``: ``temperature``, ``top_k`` and ``top_p`` (the command passes its configuration's
    ``generate:`` section); a key not given takes :class:`~xlab.config.GenerateConfig`'s default.

    Returns:
        Summary dict: articles, skipped, reference_loss (token-weighted mean, nats), out.

    Raises:
        XLabError: bad option values, a missing checkpoint or store, a store encoded with another
        tokenizer, no article long enough, ``out`` a folder or (without ``force``) an existing file;
        the option checks and ``out`` come before any work.
    """
    out = Path(out)
    if out.is_dir():
        raise XLabError(f"--out {out} is a folder; give a file path such as {out / 'predictions.jsonl'}")
    if out.exists() and not force:
        raise XLabError(f"{out} already exists; choose another --out, or pass --force to overwrite it")
    if num_articles < 1:
        raise XLabError(f"--num-articles must be >= 1, got {num_articles}")
    if prompt_tokens < 1:
        raise XLabError(f"--prompt-tokens must be >= 1, got {prompt_tokens}")
    if max_new_tokens < 1:
        raise XLabError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    from xlab.config import GenerateConfig

    d = GenerateConfig()
    s = {"temperature": d.temperature, "top_k": d.top_k, "top_p": d.top_p, **(sampling or {})}
    temperature, top_k, top_p = float(s["temperature"]), s["top_k"], float(s["top_p"])
    # article i is sampled with seed + i: within torch's seeds, as seed <= 2**62 (the config's range)
    check_options(max_new_tokens=max_new_tokens, seed=seed, **s)
    model, cfg, tok, meta = load_for_cli(checkpoint, resolve_device(device))
    store = ShardStore(_store_path(cfg, meta, shards_dir))
    if store.tokenizer_sha256 != tok.sha256:
        raise XLabError(
            f"the shard store {store.path} was encoded with another tokenizer than the model's; "
            "pass the model's store with --shards"
        )
    if "predict" not in store.splits:
        raise XLabError(f"the shard store {store.path} has no predict split; run `xlab data encode`")
    note_prompt_cut(prompt_tokens + 1, model)  # every prompt is <sos> + K tokens
    records, skipped = predict(
        model,
        tok,
        store,
        num_articles=num_articles,
        prompt_tokens=prompt_tokens,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        seed=seed,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    if not records:
        raise XLabError(f"no predict-split article has more than {prompt_tokens} tokens; lower --prompt-tokens")
    n_tokens = sum(r["reference_tokens"] for r in records)
    mean_loss = sum(r["reference_loss"] * r["reference_tokens"] for r in records) / n_tokens
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    summary = {
        "articles": len(records),
        "skipped": skipped,
        "reference_tokens": n_tokens,
        "reference_loss": mean_loss,
        "reference_perplexity": math.exp(mean_loss),
        "out": str(out),
    }
    _print_summary(summary, greedy)
    return summary


def _print_summary(summary: dict, greedy: bool) -> None:
    table = Table(title="xlab predict", show_header=False)
    table.add_row("articles", f"{summary['articles']} ({summary['skipped']} shorter ones skipped)")
    table.add_row("decoding", "greedy" if greedy else "sampling")
    table.add_row("reference tokens", str(summary["reference_tokens"]))
    table.add_row(
        "reference loss",
        f"{summary['reference_loss']:.4f} nats/token (perplexity {summary['reference_perplexity']:.2f})",
    )
    table.add_row("written", summary["out"])
    Console(highlight=False).print(table)
