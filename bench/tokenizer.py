"""Benchmark: XLab's reversible tokenizer against raw SentencePiece, measured in the same run.

    .venv/bin/python bench/tokenizer.py [--splits data/splits/wiki] [--vocab-size 8192] [--threads N]

On the sample's train split it prints
  - encode throughput ratio: ``Tokenizer.encode(list)`` over ``SentencePieceProcessor.encode(list)``
    with the same model, the same texts and the same thread count (target >= 0.9);
  - training time ratio: ``Tokenizer.train`` on the articles over ``SentencePieceTrainer.train`` on
    the same lines (paragraphs) with the same settings (target <= 1.2);
  - bytes per token on the val split (when present).
Timings are the best of ``--repeats`` runs, alternating the two sides so that load on a shared
machine affects both alike.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def read_texts(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["text"]).column(0).to_pylist()


def best_of(repeats: int, *fns):
    """Best wall time of each function over ``repeats`` rounds, calling them in turn each round."""
    best = [float("inf")] * len(fns)
    results = [None] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            results[k] = fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best, results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", type=Path, default=Path("data/splits/wiki"), help="folder with train/val parquet")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import sentencepiece as spm

    from xlab.tokenizer import NEWLINE, Tokenizer

    train_path = args.splits / "train.parquet"
    if not train_path.is_file():
        print(
            f"no train split at {train_path}: run `xlab pipeline` (or `xlab data download` then "
            "`xlab data split`) first",
            file=sys.stderr,
        )
        return 1
    texts = read_texts(train_path)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    lines = [p for t in texts for p in t.split("\n") if p]
    print(
        f"train split: {len(texts):,} texts, {n_bytes / 1e6:.2f} MB, {len(lines):,} lines; "
        f"vocab {args.vocab_size}, {args.threads} threads, best of {args.repeats}"
    )

    # ---- training: ours (articles in, codec + splitting + sampling + SentencePiece) vs raw (lines in)
    def train_ours():
        return Tokenizer.train(texts, args.vocab_size, None, num_threads=args.threads)

    def train_raw():
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buf,
            model_type="bpe",
            vocab_size=args.vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            user_defined_symbols=[NEWLINE],
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            max_sentence_length=4096,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=args.threads,
            minloglevel=2,
        )
        return buf.getvalue()

    (t_ours, t_raw), (tok, _) = best_of(max(1, args.repeats - 1), train_ours, train_raw)
    print(
        f"training   : xlab {t_ours:7.2f} s   raw sentencepiece {t_raw:7.2f} s   "
        f"ratio {t_ours / t_raw:.3f} (target <= 1.2)"
    )

    # ---- encoding: the same model, texts and threads
    sp = tok._sp

    def enc_ours():
        return tok.encode(texts, num_threads=args.threads)

    def enc_raw():
        return sp.encode(texts, num_threads=args.threads)

    (e_ours, e_raw), (ids, _) = best_of(args.repeats, enc_ours, enc_raw)
    ratio = e_raw / e_ours
    print(
        f"encode     : xlab {n_bytes / e_ours / 1e6:7.2f} MB/s raw sentencepiece {n_bytes / e_raw / 1e6:7.2f} MB/s "
        f"throughput ratio {ratio:.3f} (target >= 0.9)"
    )
    assert tok.decode(ids) == texts, "round trip failed"
    print(
        f"round trip : exact on all {len(texts):,} train texts; train bytes per token "
        f"{n_bytes / sum(map(len, ids)):.3f}"
    )

    val_path = args.splits / "val.parquet"
    if val_path.is_file():
        val = read_texts(val_path)
        vb = sum(len(t.encode("utf-8")) for t in val)
        vt = sum(map(len, tok.encode(val, num_threads=args.threads)))
        print(f"val        : {len(val):,} texts, bytes per token {vb / vt:.3f}")
    else:
        print(f"val        : no val split at {val_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
