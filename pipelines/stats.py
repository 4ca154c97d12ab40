"""``xlab stats``: statistics of a shard store and its tokenizer, as tables (and a histogram).

Per split: layout, articles, sequences (rows), real tokens, padding fraction (of target positions:
the slots a step computes but the loss ignores), the sequences the split would need packed
(``shards.layout=packed``) and the share of them packing saves, characters and UTF-8 bytes per text
token, article length in tokens (mean, median, std, p99). Article lengths are read from the rows
themselves: in a padded split an article starts at a row whose first token is ``<sos>``, in a packed
one at every ``<sos>`` of the shard's token stream; an article of ``n`` tokens has ``n + 1`` targets
(``t1..tn``, ``<eos>``).
Vocabulary: learned pieces, single characters, byte pieces, and the fraction of text tokens that
are byte-fallback pieces, measured on a seeded random sample of training rows.
Also the add-one-smoothed unigram cross entropy of val under train counts: the loss a model must
beat to have learned more than token frequencies.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.stage import console
from xlab.config import stage_paths
from xlab.errors import XLabError
from xlab.store.lock import reading

if TYPE_CHECKING:
    from omegaconf import DictConfig

SAMPLE_ROWS = 4096  # rows drawn (seeded) for the byte-fallback measurement
SAMPLE_SEED = 0
CHUNK_ROWS = 65536


def _chunks(store, split: str) -> Iterator:
    """Row arrays of ``split``, each ``(k, seq_len + 1)`` of whole articles (one shard at a time,
    memory-mapped; a shard always holds whole articles)."""
    import numpy as np

    for p in store.shard_paths(split):
        arr = np.load(p, mmap_mode="r")
        if len(arr):
            yield arr


def target_counts(store, split: str):
    """``(vocab_size,)`` int64 counts of the target tokens of ``split`` (pad and ``<sos>`` excluded)."""
    import numpy as np

    counts = np.zeros(store.vocab_size, dtype=np.int64)
    for arr in _chunks(store, split):
        for a in range(0, len(arr), CHUNK_ROWS):
            t = np.asarray(arr[a : a + CHUNK_ROWS, 1:]).ravel()
            # <sos> is a target only in packed rows, where it is ignored: not a target either way
            counts += np.bincount(t[(t != store.pad_id) & (t != store.sos_id)], minlength=store.vocab_size)
    return counts


def unigram_baseline(store, fit_split: str = "train", eval_split: str = "val") -> float:
    """Cross entropy (nats per target token) of ``eval_split``'s targets under the unigram
    distribution of ``fit_split``'s targets with add-one (Laplace) smoothing over the vocabulary:
    ``p(t) = (c(t) + 1) / (N + V)``. Targets include ``<eos>``, exclude padding.

    Raises:
        XLabError: a split is missing from the store.
        ValueError: ``eval_split`` has no targets.
    """
    import numpy as np

    fit = target_counts(store, fit_split)
    ev = target_counts(store, eval_split)
    if ev.sum() == 0:
        raise ValueError(f"split {eval_split!r} has no target tokens")
    logp = np.log(fit + 1.0) - math.log(fit.sum() + store.vocab_size)
    return float(-(ev * logp).sum() / ev.sum())


def _packed_lengths(rows, sos_id: int, pad_id: int):
    """Article lengths (text tokens) of one packed shard's rows: the gaps between its ``<sos>`` tokens
    in the shard's token stream (rows overlap by one token), less ``<sos>`` and ``<eos>``."""
    import numpy as np

    stream = np.concatenate([rows[0], rows[1:, 1:].ravel()])
    end = len(stream) - int(np.argmax(stream[::-1] != pad_id)) if (stream != pad_id).any() else 0
    starts = np.flatnonzero(stream[:end] == sos_id)
    return (np.append(starts[1:], end) - starts - 2).astype(np.int64)


def shard_lengths(store, split: str) -> Iterator:
    """``(articles,)`` int64 article lengths in text tokens (``<sos>``/``<eos>`` excluded), one array
    per non-empty shard of ``split``, in store order."""
    import numpy as np

    packed = store.layout(split) == "packed"
    for arr in _chunks(store, split):
        rows = np.asarray(arr)
        if packed:
            yield _packed_lengths(rows, store.sos_id, store.pad_id)
            continue
        starts = rows[:, 0] == store.sos_id
        article = np.cumsum(starts) - 1  # article index of each row within the shard
        targets = np.count_nonzero(rows[:, 1:] != store.pad_id, axis=1)
        yield np.bincount(article, weights=targets).astype(np.int64) - 1


def article_lengths(store, split: str):
    """``(articles,)`` int64 lengths in text tokens (``<sos>``/``<eos>`` excluded) of ``split``."""
    import numpy as np

    out = list(shard_lengths(store, split))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def packed_rows(lengths, seq_len: int) -> int:
    """Rows the articles of one shard (``lengths`` in text tokens) take in the packed layout: their
    ``sum(n + 2)``-token stream cut every ``seq_len`` tokens (:func:`xlab.store.pack_documents`)."""
    return -(-(int(lengths.sum()) + 2 * len(lengths) - 1) // seq_len) if len(lengths) else 0


def split_stats(store, split: str) -> dict:
    """The per-split figures of the module docstring, as a dict."""
    import numpy as np

    info = store.split_info(split)
    per_shard = list(shard_lengths(store, split))
    lengths = np.concatenate(per_shard) if per_shard else np.zeros(0, dtype=np.int64)
    rows = store.rows(split)
    n_packed = sum(packed_rows(n, store.seq_len) for n in per_shard)
    text_tokens = int(lengths.sum())
    target_positions = rows * store.seq_len
    targets = text_tokens + len(lengths)
    pct = (lambda q: float(np.percentile(lengths, q))) if len(lengths) else (lambda q: float("nan"))
    return {
        "articles": int(len(lengths)),
        "sequences": rows,
        "real_tokens": int(info.get("real_tokens", 0)),
        "target_tokens": targets,
        "padding_fraction": (target_positions - targets) / target_positions if target_positions else float("nan"),
        "layout": store.layout(split),
        "packed_sequences": n_packed,
        "packing_saves": 1 - n_packed / rows if rows else 0.0,
        "chars_per_token": info.get("text_chars", 0) / text_tokens if text_tokens else float("nan"),
        "bytes_per_token": info.get("text_bytes", 0) / text_tokens if text_tokens else float("nan"),
        "length_mean": float(lengths.mean()) if len(lengths) else float("nan"),
        "length_median": pct(50),
        "length_std": float(lengths.std()) if len(lengths) else float("nan"),
        "length_p99": pct(99),
        "lengths": lengths,
    }


def vocab_stats(tok, store, split: str = "train") -> dict:
    """Vocabulary composition and byte-fallback usage (seeded random sample of ``split``'s rows).

    Pieces are: special (pad/sos/eos/unk), byte (``<0xNN>``), single characters (one code point,
    the word-boundary marker ``▁`` not counted), learned (the rest: merges of two or more characters).
    """
    import numpy as np

    special = {store.pad_id, store.sos_id, store.eos_id, store.unk_id}
    is_byte = np.zeros(tok.vocab_size, dtype=bool)
    single = learned = 0
    for i in range(tok.vocab_size):
        if i in special:
            continue
        if tok.is_byte(i):
            is_byte[i] = True
        elif len(tok.id_to_piece(i).replace("\u2581", " ")) == 1:
            single += 1
        else:
            learned += 1
    fallback = float("nan")
    n = store.rows(split) if split in store.splits else 0
    if n:
        rng = np.random.default_rng(SAMPLE_SEED)
        idx = np.sort(rng.choice(n, size=min(n, SAMPLE_ROWS), replace=False))
        t = store.read_rows(split, idx)[:, 1:].ravel().astype(np.int64)
        text = t[~np.isin(t, list(special))]
        fallback = float(is_byte[text].mean()) if len(text) else float("nan")
    return {
        "vocab_size": int(tok.vocab_size),
        "special": len(special),
        "byte_pieces": int(is_byte.sum()),
        "single_chars": single,
        "learned_pieces": learned,
        "byte_fallback_fraction": fallback,
        "sample_rows": int(min(n, SAMPLE_ROWS)),
    }


def run(cfg: DictConfig, shards_dir=None, plot=None) -> dict:
    """Print the store's statistics; with ``plot``, write the article-length histograms (PNG).

    Returns:
        ``{"splits": {split: stats}, "vocab": {...} or None, "unigram_val_nats": float or None}``
        (article length arrays left out).

    Raises:
        XLabError: no store at the folder (names ``xlab data encode``), a missing or damaged
            shard (names ``xlab data validate``), a ``plot`` path that is not a ``.png`` file or
            whose folder does not exist.
    """
    if plot is not None:  # checked before any work
        plot = Path(plot)
        if plot.is_dir() or plot.suffix.lower() != ".png":
            raise XLabError(
                f"--plot needs the path of a .png file, got {str(plot)!r} "
                f"({'a folder' if plot.is_dir() else 'not .png'}); e.g. --plot lengths.png"
            )
        if not plot.parent.is_dir():  # a typo in the folder would otherwise create a new tree
            raise XLabError(f"--plot {str(plot)!r}: folder {str(plot.parent)!r} does not exist; create it first")
    path = Path(shards_dir) if shards_dir else stage_paths(cfg).shards
    with reading(path, "stats"):
        return _run(cfg, path, plot)


def _run(cfg: DictConfig, path: Path, plot: Path | None) -> dict:
    from rich.table import Table

    from xlab.store import ShardStore

    store = ShardStore(path)
    store.check()  # damaged or missing shards: one clear line, not a numpy error halfway through
    per = {s: split_stats(store, s) for s in store.splits}

    t = Table(title=f"shard store {path} (seq_len {store.seq_len}, {store.dtype}, vocab {store.vocab_size:,})")
    for c in ("split", "articles", "sequences", "real tokens", "padding", "chars/tok", "bytes/tok"):
        t.add_column(c, justify="left" if c == "split" else "right")

    def pct(x: float) -> str:  # an empty split has no fractions
        return "—" if math.isnan(x) else f"{x:.1%}"

    def num(x: float) -> str:
        return "—" if math.isnan(x) else f"{x:.2f}"

    for s, d in per.items():
        t.add_row(
            s,
            f"{d['articles']:,}",
            f"{d['sequences']:,}",
            f"{d['real_tokens']:,}",
            pct(d["padding_fraction"]),
            num(d["chars_per_token"]),
            num(d["bytes_per_token"]),
        )
    console.print(t)
    t = Table(title="layout: padding and what packing saves")
    for c in ("split", "layout", "padding", "sequences", "packed", "change"):
        t.add_column(c, justify="left" if c in ("split", "layout") else "right")
    for s, d in per.items():
        t.add_row(
            s,
            d["layout"],
            pct(d["padding_fraction"]),
            f"{d['sequences']:,}",
            f"{d['packed_sequences']:,}",
            f"{-d['packing_saves']:+.1%}" if d["sequences"] else "—",
        )
    console.print(t)
    console.print(
        "padding: target slots the loss ignores; packed: the sequences with shards.layout=packed "
        "(which packs train only), and the change in sequences, i.e. in steps per epoch"
    )
    t = Table(title="article length (tokens)")
    for c in ("split", "mean", "median", "std", "p99"):
        t.add_column(c, justify="left" if c == "split" else "right")
    for s, d in per.items():
        t.add_row(
            s,
            f"{d['length_mean']:.1f}",
            f"{d['length_median']:.0f}",
            f"{d['length_std']:.1f}",
            f"{d['length_p99']:.0f}",
        )
    console.print(t)

    vocab = None
    tok_path = store.tokenizer_path
    if tok_path is not None:
        from xlab.tokenizer import Tokenizer

        try:
            tok = Tokenizer.load(tok_path)
        except ValueError as e:  # an empty, foreign or damaged .model file
            raise XLabError(
                f"{tok_path} is not a usable XLab tokenizer ({e}); rebuild it with "
                f"`xlab tokenizer train --force` and `xlab data encode --force`"
            ) from None
        vocab = vocab_stats(tok, store, "train" if "train" in store.splits else store.splits[0])
        v = Table(title=f"vocabulary ({tok_path})")
        for c in ("pieces", "special", "bytes", "single chars", "learned", "byte fallback"):
            v.add_column(c, justify="right")
        v.add_row(
            f"{vocab['vocab_size']:,}",
            str(vocab["special"]),
            f"{vocab['byte_pieces']:,}",
            f"{vocab['single_chars']:,}",
            f"{vocab['learned_pieces']:,}",
            f"{vocab['byte_fallback_fraction']:.3%}",
        )
        console.print(v)
        console.print(
            f"byte fallback: share of text tokens that are byte pieces, in {vocab['sample_rows']:,} "
            f"seeded random rows of the train split"
        )
    else:
        console.print("[yellow]tokenizer file not found; vocabulary statistics skipped[/yellow]")

    unigram = None
    if {"train", "val"} <= set(store.splits) and per["val"]["target_tokens"]:
        unigram = unigram_baseline(store)
        console.print(
            f"unigram baseline on val (add-one smoothed train counts): {unigram:.3f} nats/token "
            f"({unigram / math.log(2):.3f} bits/token)"
        )
    if plot is not None:
        try:
            _plot(per, plot, store.seq_len)
        except OSError as e:
            raise XLabError(f"cannot write {plot}: {e.strerror or e}") from None
        console.print(f"article-length histogram written to {plot}")
    return {
        "splits": {s: {k: v for k, v in d.items() if k != "lengths"} for s, d in per.items()},
        "vocab": vocab,
        "unigram_val_nats": unigram,
    }


def length_figure(per: dict, seq_len: int):
    """The article-length histograms of :func:`run`, one panel per split of ``per`` (split ->
    :func:`split_stats`), as a matplotlib Figure: the same bins and x-range in every panel, so
    splits compare at a glance; a dashed line at ``seq_len`` (the tokens of one row: a longer
    article spans several rows); integer article counts on the y axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    hi = max([int(d["lengths"].max()) for d in per.values() if len(d["lengths"])] + [seq_len, 1])
    log = hi > 50
    # one set of bins for all splits: a shared x axis with per-split bins would mislead
    bins = np.unique(np.geomspace(1, hi + 1, 50).astype(int)) if log else np.arange(0, hi + 2)
    fig, axes = plt.subplots(len(per), 1, figsize=(8, 2.4 * len(per)), squeeze=False, sharex=True)
    for ax, (s, d) in zip(axes[:, 0], per.items()):
        lengths = d["lengths"]
        if len(lengths):
            ax.hist(lengths, bins=bins)
        ax.axvline(seq_len, color="tab:red", linestyle="--", linewidth=1, label=f"seq_len {seq_len}")
        ax.set_title(f"{s}: {len(lengths):,} articles, median {d['length_median']:.0f} tokens")
        ax.set_ylabel("articles")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="upper right", fontsize="small")
    ax0 = axes[0, 0]
    if log:
        ax0.set_xscale("log")
    ax0.set_xlim(bins[0], bins[-1])
    axes[-1, 0].set_xlabel("article length (tokens)")
    fig.tight_layout()
    return fig


def _plot(per: dict, path: Path, seq_len: int) -> None:
    """Write :func:`length_figure` to ``path`` (PNG) atomically."""
    import matplotlib.pyplot as plt

    from xlab.fsio import atomic_path

    fig = length_figure(per, seq_len)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
