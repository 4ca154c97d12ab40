"""Stage `xlab tokenizer train`: the reversible BPE tokenizer from the train split; `xlab tokenizer show`.

Reads  data/splits/<name>/train.parquet (column ``text``; val.parquet too, if present, to report bytes
       per token)
Writes tokenizers/<name>.model (atomically) and its manifest tokenizers/<name>.json
Skips  when the manifest holds the same parameters, the same train split sha256 and STAGE_VERSION.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.stage import (
    console,
    is_up_to_date,
    output_lock,
    parquet_file,
    read_manifest,
    reading_parquet,
    skipped,
    write_manifest,
)
from xlab.config import stage_paths
from xlab.errors import XLabError
from xlab.fsio import remove_leftovers, sha256_file
from xlab.pathcheck import file_problem
from xlab.progress import spinner

if TYPE_CHECKING:
    from omegaconf import DictConfig

STAGE = "tokenizer"
# The version of this stage's output format and code, recorded in its manifest: bump when this
# stage's output for the same inputs and params would differ (an upgrade that leaves it alone
# redoes nothing; see pipelines/stage.py).
STAGE_VERSION = 1
SPLIT_FIX = "xlab data split --force"
_BATCH_ROWS = 1024


def iter_texts(parquet_path: Path, batch_rows: int = _BATCH_ROWS) -> Iterator[str]:
    """The ``text`` column of a split, streamed in record batches (bounded memory); a null text is
    an empty one, as encode counts it."""
    f = parquet_file(parquet_path, SPLIT_FIX, columns=("text",))
    with reading_parquet(parquet_path, SPLIT_FIX):
        for batch in f.iter_batches(batch_size=batch_rows, columns=["text"]):
            yield from ("" if t is None else t for t in batch.column(0).to_pylist())


def _num_rows(parquet_path: Path) -> int:
    """Rows of a split file, from its footer (XLabError for a damaged file)."""
    return parquet_file(parquet_path, SPLIT_FIX, columns=("text",)).metadata.num_rows


def bytes_per_token(tok: Any, parquet_path: Path, batch_rows: int = _BATCH_ROWS) -> dict:
    """UTF-8 bytes per token of a split's texts under ``tok`` (no sos/eos counted).

    Returns {"texts", "bytes", "tokens", "bytes_per_token"} (bytes_per_token None for no tokens).
    """
    n_texts = n_bytes = n_tokens = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_tokens
        n_tokens += sum(map(len, tok.encode(batch)))
        batch.clear()

    for text in iter_texts(parquet_path, batch_rows):
        n_texts += 1
        n_bytes += len(text.encode("utf-8"))
        batch.append(text)
        if len(batch) >= batch_rows:
            flush()
    if batch:
        flush()
    return {
        "texts": n_texts,
        "bytes": n_bytes,
        "tokens": n_tokens,
        "bytes_per_token": round(n_bytes / n_tokens, 4) if n_tokens else None,
    }


def run(cfg: DictConfig, force: bool = False) -> dict:
    """Train the tokenizer on the train split (see the module docstring).

    Returns the stage manifest (a dict). Raises XLabError when the train split is missing or
    SentencePiece refuses the settings.
    """
    out = stage_paths(cfg).tokenizer
    with output_lock(out, "tokenizer train"):
        for written in (out, stage_paths(cfg).tokenizer_manifest):  # what a killed run of this stage left
            remove_leftovers(written)
        return _run(cfg, force)


def _run(cfg: DictConfig, force: bool) -> dict:
    from xlab.tokenizer import Tokenizer

    paths = stage_paths(cfg)
    train_path = paths.splits / "train.parquet"
    val_path = paths.splits / "val.parquet"
    if not train_path.is_file():
        raise XLabError(f"train split not found ({train_path}); run `xlab data split` first")
    tc = cfg.tokenizer
    params = {
        "vocab_size": int(tc.vocab_size),
        "seed": int(tc.seed),
        "max_sentences": int(tc.max_sentences),
        "max_sentence_length": int(tc.max_sentence_length),
    }
    inputs = {"train.parquet": sha256_file(train_path)}
    manifest_path = paths.tokenizer_manifest
    if not force and is_up_to_date(manifest_path, params, inputs, [paths.tokenizer], stage_version=STAGE_VERSION):
        m = read_manifest(manifest_path)
        # the model file must still be the one the manifest describes (not replaced or damaged)
        if (m.get("tokenizer") or {}).get("sha256") == sha256_file(paths.tokenizer):
            skipped(f"tokenizer train ({cfg.data.name})", manifest_path)
            return m

    n_train = _num_rows(train_path)
    if n_train == 0:
        raise XLabError(
            f"the train split {train_path} is empty (0 articles); rerun `xlab data split --force` "
            f"with more articles (data.max_articles) or a larger data.train_fraction"
        )

    t0 = time.perf_counter()
    # SentencePiece trains in C++ and reports nothing until it is done: a spinner and the elapsed
    # time show that it is still working.
    with spinner(f"training a {params['vocab_size']}-piece BPE tokenizer on {train_path} ...", console):
        try:
            tok = Tokenizer.train(
                iter_texts(train_path),
                params["vocab_size"],
                paths.tokenizer,
                seed=params["seed"],
                max_sentences=params["max_sentences"],
                max_sentence_length=params["max_sentence_length"],
                num_threads=tc.num_threads,
            )
        except ValueError as e:
            if str(e).startswith("no training text"):
                raise XLabError(
                    f"the train split {train_path} has no text (all {n_train:,} articles are empty); "
                    f"rerun `xlab data download --force` and `xlab data split --force`"
                ) from None
            raise XLabError(f"tokenizer training failed: {e} (try another -o tokenizer.vocab_size=N)") from None
    report = dict(tok.train_report)
    counts: dict[str, Any] = {
        "texts": report["texts"],
        "bytes": report["bytes"],
        "lines": report["lines"],
        "lines_split": report["lines_split"],
        "sentences": report["sentences"],
        "sampled_lines": report["sampled"],
        "training_seconds": report["seconds"],
        "vocab_size": tok.vocab_size,
    }
    if val_path.is_file():
        with spinner("measuring bytes per token on the val split ...", console):
            v = bytes_per_token(tok, val_path)
        counts.update(
            val_texts=v["texts"], val_bytes=v["bytes"], val_tokens=v["tokens"], val_bytes_per_token=v["bytes_per_token"]
        )
    extra = {
        "tokenizer": {
            "file": paths.tokenizer.name,
            "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "pad_id": tok.pad_id,
            "sos_id": tok.sos_id,
            "eos_id": tok.eos_id,
            "unk_id": tok.unk_id,
        }
    }
    manifest = write_manifest(
        manifest_path,
        stage=STAGE,
        params=params,
        inputs=inputs,
        counts=counts,
        stage_version=STAGE_VERSION,
        extra=extra,
    )
    _summary(paths.tokenizer, tok, counts, time.perf_counter() - t0)
    return manifest


def _summary(path: Path, tok: Any, counts: dict, seconds: float) -> None:
    from rich.table import Table

    t = Table(title=f"tokenizer train: {path}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_row(
        "vocabulary", f"{tok.vocab_size:,} (unk {tok.unk_id}, sos {tok.sos_id}, eos {tok.eos_id}, pad {tok.pad_id})"
    )
    t.add_row("train texts / bytes", f"{counts['texts']:,} / {counts['bytes']:,}")
    t.add_row("lines (paragraphs)", f"{counts['lines']:,}")
    t.add_row("lines split (too long)", f"{counts['lines_split']:,}")
    t.add_row("sentences / sampled", f"{counts['sentences']:,} / {counts['sampled_lines']:,}")
    if "val_bytes_per_token" in counts:
        t.add_row("val bytes per token", f"{counts['val_bytes_per_token']}")
    t.add_row("training seconds", f"{counts['training_seconds']:.2f} (stage {seconds:.2f})")
    t.add_row("sha256", tok.sha256[:16] + "…")
    console.print(t)


def show(cfg: DictConfig, text: str, tokenizer_path: Path | None = None) -> dict:
    """Print the pieces and ids of ``text`` as a table; byte-fallback pieces are marked.

    Returns {"ids", "pieces", "bytes", "tokens", "roundtrip"}. Raises XLabError when the tokenizer
    file is missing or is not an XLab tokenizer.
    """
    from rich.markup import escape
    from rich.table import Table

    from xlab.tokenizer import Tokenizer

    path = Path(tokenizer_path) if tokenizer_path is not None else stage_paths(cfg).tokenizer
    if path.is_dir():  # --tokenizer tokenizers: name the .model files it holds
        raise XLabError(file_problem(path, "tokenizer", ".model"))
    if not path.is_file():
        raise XLabError(f"tokenizer not found ({path}); run `xlab tokenizer train` first")
    try:
        tok = Tokenizer.load(path)
    except ValueError as e:  # an empty, foreign or damaged .model file
        raise XLabError(f"{path} is not a usable XLab tokenizer ({e}); run `xlab tokenizer train --force`") from None
    try:
        ids = tok.encode(text)
    except ValueError as e:
        raise XLabError(f"cannot encode the text: {e}") from None
    pieces = [tok.id_to_piece(i) for i in ids]
    table = Table(
        title=f"{len(ids)} tokens, {len(text.encode('utf-8'))} bytes",
        caption=str(path),
        title_justify="left",
        caption_justify="left",
    )
    table.add_column("#", justify="right", style="dim")
    table.add_column("id", justify="right")
    table.add_column("piece")
    table.add_column("byte", justify="center")
    for k, (i, p) in enumerate(zip(ids, pieces)):
        byte = tok.is_byte(i)
        shown = escape(repr(p)[1:-1])  # makes "\n", "\t" and friends visible
        table.add_row(
            str(k), str(i), f"[yellow]{shown}[/yellow]" if byte else shown, "[yellow]byte[/yellow]" if byte else ""
        )
    console.print(table)
    ok = tok.decode(ids) == text
    n_bytes = len(text.encode("utf-8"))
    console.print(
        f"bytes per token: {n_bytes / len(ids):.3f}" if ids else "empty text: no tokens",
        f"· round trip: {'exact' if ok else 'DIFFERS'}",
    )
    return {"ids": ids, "pieces": pieces, "bytes": n_bytes, "tokens": len(ids), "roundtrip": ok}
