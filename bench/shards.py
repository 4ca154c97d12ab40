"""Shard-store benchmark: encoding throughput, storage and loader speed, with baselines measured in
the same run.

1. Encoding, end to end to verified shards (``xlab data encode`` + ``xlab data validate``), in MB of
   UTF-8 text per second, against
   - raw ``SentencePieceProcessor.encode`` on the same texts with the same cores (target ratio >= 0.75);
   - the original XLab approach: ``datasets.map`` tokenizing into Arrow ``int64`` token lists.
2. Storage: bytes per token of the shards (uint16) against the Arrow int64 lists.
3. Loader: tokens per second from one process, batch 64, sequence length 512, shuffled (target 20M).

Corpus: the built-in Wikipedia sample (``xlab data download``), train split repeated ``--repeat``
times so that the timed part outweighs process start-up. Run: ``python bench/shards.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _quiet():
    """Silence the stages' rich output while timing."""
    from pipelines import stage

    stage.console.quiet = True


def prepare(work: Path, repeat: int, vocab_size: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import download, split, train_tokenizer
    from xlab.config import SPLITS, load_config

    cfg = load_config(
        [],
        [
            f"paths.data_dir={work / 'data'}",
            f"paths.tokenizer_dir={work / 'tok'}",
            f"paths.shards_dir={work / 'shards'}",
            f"tokenizer.vocab_size={vocab_size}",
        ],
        use_defaults_file=False,
    )
    download.run(cfg)
    split.run(cfg)
    train_tokenizer.run(cfg)
    d = work / "data" / "splits" / "wiki"
    t = pq.read_table(d / "train.parquet")
    parts = []
    for k in range(repeat):
        ids = pa.array([f"{i}#{k}" for i in t.column("id").to_pylist()])
        parts.append(t.set_column(0, "id", ids))
    pq.write_table(pa.concat_tables(parts), d / "train.parquet")
    texts = []
    for s in SPLITS:
        texts += pq.read_table(d / f"{s}.parquet", columns=["text"]).column("text").to_pylist()
    return cfg, texts


def time_raw_sentencepiece(model: Path, texts: list[str], cores: int) -> float:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    sp.encode(texts[:200], num_threads=cores)
    t0 = time.perf_counter()
    sp.encode(texts, num_threads=cores)
    return time.perf_counter() - t0


def time_xlab_encode(cfg, num_proc: int) -> tuple[float, dict]:
    from pipelines import encode, validate

    cfg.shards.num_proc = num_proc
    t0 = time.perf_counter()
    m = encode.run(cfg, force=True)
    code = validate.run(cfg)
    dt = time.perf_counter() - t0
    assert code == 0, "validation failed"
    return dt, m


def time_datasets_map(work: Path, model: Path, cores: int) -> tuple[float, int, int]:
    """The original XLab approach: datasets.map tokenizing into int64 lists stored as Arrow."""
    import datasets
    from datasets import Features, Sequence, Value

    from xlab.config import SPLITS

    datasets.disable_progress_bars()
    d = work / "data" / "splits" / "wiki"
    cache = work / "hf"
    shutil.rmtree(cache, ignore_errors=True)
    ds = datasets.load_dataset(
        "parquet", data_files={s: str(d / f"{s}.parquet") for s in SPLITS}, cache_dir=str(cache / "load")
    )
    feats = Features({"tokens": Sequence(Value("int64"))})
    t0 = time.perf_counter()
    out = ds.map(
        _hf_tokenize,
        batched=True,
        num_proc=cores,
        remove_columns=["id", "url", "title", "text"],
        features=feats,
        fn_kwargs={"model": str(model)},
        cache_file_names={s: str(cache / f"{s}.arrow") for s in SPLITS},
    )
    dt = time.perf_counter() - t0
    tokens = sum(int(sum(len(x) for x in out[s]["tokens"])) for s in SPLITS)
    nbytes = sum(f.stat().st_size for f in cache.glob("*.arrow"))
    return dt, tokens, nbytes


_SP = {}


def _hf_tokenize(batch, model):
    import sentencepiece as spm

    sp = _SP.get(model)
    if sp is None:
        sp = _SP[model] = spm.SentencePieceProcessor(model_file=model)
    return {"tokens": sp.encode(batch["text"])}


def time_loader(work: Path, seconds: float = 3.0) -> float:
    """Tokens per second of ShardLoader, batch 64, seq_len 512, shuffled, over a 128 MB store."""
    import numpy as np

    from xlab.fsio import sha256_file
    from xlab.store import ShardEntry, ShardLoader, ShardStore, SplitEntry, StoreManifest, TokenizerEntry

    seq_len, rows_per, n_shards = 512, 32768, 4
    path = work / "loader_store"
    rng = np.random.default_rng(0)
    train = SplitEntry()
    for k in range(n_shards):
        a = rng.integers(5, 8192, size=(rows_per, seq_len + 1), dtype=np.uint16)
        a[::3, 0] = 1
        a[1::7, 400:] = 3
        p = path / "train" / f"{k:06d}.npy"
        p.parent.mkdir(parents=True, exist_ok=True)
        np.save(p, a)
        train.add_shard(ShardEntry(f"train/{k:06d}.npy", rows_per, 0, sha256_file(p)), articles=0, target_tokens=0)
    ids = TokenizerEntry(vocab_size=8192, pad_id=3, sos_id=1, eos_id=2, unk_id=0, copy=None)
    StoreManifest(seq_len=seq_len, dtype="uint16", tokenizer=ids, splits={"train": train}, stage="bench").write(path)
    loader = ShardLoader(ShardStore(path), "train", 64, seed=0)
    it = iter(loader)
    for _ in range(20):
        next(it)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        try:
            x, _ = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        n += x.numel()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="times the train split is repeated")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="xlab-bench-shards-"))
    try:
        print(f"preparing the corpus in {work} ...", flush=True)
        cfg, texts = prepare(work, args.repeat, args.vocab_size)
        _quiet()
        from xlab.config import stage_paths

        model = stage_paths(cfg).tokenizer
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        print(f"corpus: {len(texts):,} articles, {mb:.1f} MB of text; {cores} cores", flush=True)

        raw = min(time_raw_sentencepiece(model, texts, cores) for _ in range(2))
        runs = {}
        for num_proc in sorted({1, cores}):
            runs[num_proc] = min((time_xlab_encode(cfg, num_proc) for _ in range(2)), key=lambda r: r[0])
        enc_dt, manifest = runs[cores]  # the default: one process per core
        hf_dt, hf_tokens, hf_bytes = time_datasets_map(work, model, cores)

        splits = manifest["splits"].values()
        text_tokens = sum(s["target_tokens"] - s["articles"] for s in splits)
        shard_bytes = sum(f.stat().st_size for f in (stage_paths(cfg).shards).rglob("*.npy"))
        slots = sum(s["rows"] for s in splits) * manifest["row_len"]
        loader_tps = time_loader(work)
        import resource

        # ru_maxrss is in KiB on Linux; children = the encode workers (and the datasets.map workers)
        peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

        res = {
            "text_MB": round(mb, 2),
            "raw_sentencepiece_MB_s": round(mb / raw, 2),
            **{f"xlab_encode_validate_MB_s_num_proc_{k}": round(mb / v[0], 2) for k, v in runs.items()},
            "datasets_map_int64_MB_s": round(mb / hf_dt, 2),
            "ratio_xlab_vs_raw_sentencepiece": round(raw / enc_dt, 3),
            "ratio_xlab_vs_datasets_map": round(hf_dt / enc_dt, 3),
            "store_bytes_per_slot": round(shard_bytes / slots, 3),
            "store_bytes_per_text_token": round(shard_bytes / text_tokens, 3),
            "arrow_int64_bytes_per_token": round(hf_bytes / hf_tokens, 3),
            "loader_tokens_per_s_b64_s512": round(loader_tps),
            "ratio_loader_vs_20M_target": round(loader_tps / 20e6, 2),
            "peak_rss_MB_main_process": round(peak_self),
            "peak_rss_MB_largest_child": round(peak_children),
        }
        print(json.dumps(res, indent=2))
        print(
            f"encode to verified shards (num_proc={cores}, the default): "
            f"{res['ratio_xlab_vs_raw_sentencepiece']:.2f}x raw SentencePiece "
            f"(target >= 0.75), {res['ratio_xlab_vs_datasets_map']:.2f}x datasets.map(int64); "
            f"storage {res['store_bytes_per_slot']:.2f} B/token slot vs {res['arrow_int64_bytes_per_token']:.2f} "
            f"(Arrow int64); loader {loader_tps / 1e6:.1f}M tokens/s (target 20M)"
        )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
