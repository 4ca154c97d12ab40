"""``xlab data validate``: verify a shard store completely against its manifest and tokenizer.

Checks, for every shard in the manifest: the file exists, its sha256, its ``.npy`` shape and dtype,
every id below the vocabulary size, and the row structure of the format (xlab/store/format.py):

- padding only at the tail of a row, right after the article's ``<eos>``, and no row whose targets
  are all padding;
- ``<sos>`` only at column 0 (an article's first row), nothing but padding after ``<eos>``;
- an article's rows continue one another (a row that does not start with ``<sos>`` begins with the
  last token of the full row before it), and a shard ends with a complete article;
- the manifest's row and real-token counts.

A ``packed`` split (articles back to back) has its own structure: every row overlaps the one before
by one token, the shard's stream starts with ``<sos>``, every later ``<sos>`` follows an ``<eos>``
and every ``<eos>`` is followed by ``<sos>`` or by the padding of the shard's last row, the only row
that may hold padding.

Also the tokenizer's sha256 (``tokenizers/<name>.model`` and the store's copy) against the manifest.
Exit code 0 when everything holds, else 1 with every problem listed by file and row.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.stage import console
from xlab.config import stage_paths

if TYPE_CHECKING:
    from omegaconf import DictConfig

CHUNK_ROWS = 65536  # rows checked at a time (bounded memory)
MAX_ROWS_LISTED = 100  # per problem kind and file; the rest are counted


def _rows_and_common_problems(rows, start: int, *, vocab_size: int, pad: int, found: dict):
    """The checks both layouts share (ids below the vocabulary, padding only at a row's tail, a target
    in every row), added to ``found``; returns the rows as int64, their pad mask and the ``add(kind,
    row_mask)`` that records further problems at file row numbers."""
    import numpy as np

    r = rows.astype(np.int64)

    def add(kind, mask):
        idx = np.flatnonzero(mask)
        if len(idx):
            found[kind].extend((idx + start).tolist())

    too_big = r >= vocab_size
    if too_big.any():
        bad_rows = np.flatnonzero(too_big.any(1))
        worst = int(r[bad_rows].max())
        found[f"token id >= vocabulary size {vocab_size} (largest {worst})"].extend((bad_rows + start).tolist())
    is_pad = r == pad
    add(
        "padding followed by a token (padding must end the row)", (np.logical_or.accumulate(is_pad, 1) != is_pad).any(1)
    )
    add("no target token (the row's targets are all padding)", is_pad[:, 1:].all(1))
    return r, is_pad, add


def _row_problems(rows, start: int, prev_last, *, vocab_size: int, pad: int, sos: int, eos: int, found: dict) -> None:
    """Add ``{kind: [row numbers]}`` for a chunk of rows starting at file row ``start``.

    ``prev_last`` is the last row of the previous chunk (None at the top of the file)."""
    import numpy as np

    r, is_pad, add = _rows_and_common_problems(rows, start, vocab_size=vocab_size, pad=pad, found=found)
    n = len(r)
    add("<sos> after column 0", (r[:, 1:] == sos).any(1))
    eos_mid = (r[:, :-1] == eos) & ~is_pad[:, 1:]
    add("a token after <eos> (only padding may follow it)", eos_mid.any(1))
    has_pad = is_pad.any(1)
    first_pad = np.argmax(is_pad, 1)
    before = r[np.arange(n), np.maximum(first_pad - 1, 0)]
    add("padding not preceded by <eos>", has_pad & (first_pad > 0) & (before != eos))
    # Continuation: row i either starts an article (<sos>) or continues row i-1, which then must be
    # full (no padding, not ended by <eos>) and end with row i's first token.
    prev = np.empty_like(r)
    if n > 1:
        prev[1:] = r[:-1]
    starts = r[:, 0] == sos
    if prev_last is None:
        add("the shard does not begin with <sos>", (np.arange(n) == 0) & ~starts)
        check = np.arange(n) > 0
    else:
        prev[0] = prev_last.astype(np.int64)
        check = np.ones(n, dtype=bool)
    prev_open = (prev != pad).all(1) & (prev[:, -1] != eos)
    add("the previous row's article is cut short before this <sos>", check & starts & prev_open)
    add(
        "the row continues no article (previous row ended or does not overlap)",
        check & ~starts & (~prev_open | (prev[:, -1] != r[:, 0])),
    )


def _packed_row_problems(rows, start: int, prev_last, *, last_row: int, vocab_size: int, pad: int, sos: int,
                         eos: int, found: dict) -> None:  # fmt: skip
    """:func:`_row_problems` for a ``packed`` shard whose last row is file row ``last_row``."""
    import numpy as np

    r, is_pad, add = _rows_and_common_problems(rows, start, vocab_size=vocab_size, pad=pad, found=found)
    n = len(r)
    add("padding before the shard's last row (a packed split pads only its end)",
        is_pad.any(1) & (np.arange(n) + start < last_row))  # fmt: skip
    first_pad = np.argmax(is_pad, 1)
    before = r[np.arange(n), np.maximum(first_pad - 1, 0)]
    add("padding not preceded by <eos>", is_pad.any(1) & (first_pad > 0) & (before != eos))
    add("<sos> not preceded by <eos>", ((r[:, 1:] == sos) & (r[:, :-1] != eos)).any(1))
    add("<eos> followed by neither <sos> nor padding", ((r[:, :-1] == eos) & (r[:, 1:] != sos) & ~is_pad[:, 1:]).any(1))
    prev = np.empty_like(r)
    if n > 1:
        prev[1:] = r[:-1]
    if prev_last is None:
        add("the shard does not begin with <sos>", (np.arange(n) == 0) & (r[:, 0] != sos))
        check = np.arange(n) > 0
    else:
        prev[0] = prev_last.astype(np.int64)
        check = np.ones(n, dtype=bool)
    add("the row does not continue the previous one (rows overlap by one token)", check & (prev[:, -1] != r[:, 0]))


def check_shard(path: Path, entry: dict, store, counts: dict | None = None, layout: str = "padded") -> list[str]:
    """Every problem of one shard of a split of ``layout``, as ``"<file> ..."`` lines; adds the shard's
    ``articles`` and ``target_tokens`` (:func:`xlab.store.row_counts`) to ``counts`` when given."""
    import numpy as np

    from xlab.fsio import sha256_file
    from xlab.store import read_npy_header, row_counts

    name = entry["file"]
    if not path.is_file():
        return [f"{name}: missing"]
    out = []
    if sha256_file(path) != entry.get("sha256"):
        out.append(f"{name}: sha256 differs from the manifest (file changed or corrupt)")
    try:
        shape, dtype, fortran, _ = read_npy_header(path)
    except (OSError, ValueError) as e:
        return out + [f"{name}: not a readable .npy file ({e})"]
    want = (int(entry["rows"]), store.row_len)
    if dtype != store.dtype or fortran or len(shape) != 2 or shape[1] != store.row_len:
        return out + [f"{name}: array is {dtype}{list(shape)}, the store needs {store.dtype}[rows, {store.row_len}]"]
    if shape != want:
        out.append(f"{name}: {shape[0]} rows, the manifest says {want[0]}")
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        return out + [f"{name}: not a readable .npy file ({e})"]
    found: dict = defaultdict(list)
    real = 0
    prev_last = None
    for a in range(0, shape[0], CHUNK_ROWS):
        chunk = np.asarray(arr[a : a + CHUNK_ROWS])
        real += int(np.count_nonzero(chunk != store.pad_id))
        if counts is not None:
            arts, targets = row_counts(chunk, layout=layout, pad_id=store.pad_id, sos_id=store.sos_id, first=a == 0)
            counts["articles"] += arts
            counts["target_tokens"] += targets
        ids = {"vocab_size": store.vocab_size, "pad": store.pad_id, "sos": store.sos_id, "eos": store.eos_id}
        if layout == "packed":
            _packed_row_problems(chunk, a, prev_last, last_row=shape[0] - 1, found=found, **ids)
        else:
            _row_problems(chunk, a, prev_last, found=found, **ids)
        prev_last = chunk[-1]
    if prev_last is not None and not ((prev_last == store.pad_id).any() or prev_last[-1] == store.eos_id):
        found["the shard ends inside an article (last row has no <eos>)"].append(shape[0] - 1)
    if real != entry.get("real_tokens"):
        out.append(f"{name}: {real} real tokens, the manifest says {entry.get('real_tokens')}")
    for kind, rows in found.items():
        listed = ", ".join(map(str, rows[:MAX_ROWS_LISTED]))
        more = f" and {len(rows) - MAX_ROWS_LISTED} more" if len(rows) > MAX_ROWS_LISTED else ""
        out.append(f"{name}: {'row' if len(rows) == 1 else 'rows'} {listed}{more}: {kind}")
    return out


def _text_count_problems(store, split: str, parquet: Path) -> list[str]:
    """``text_bytes`` and ``text_chars`` of ``split`` recomputed from the split file the store was
    encoded from (when it is there, unchanged, and every rejected article is listed): the UTF-8
    bytes and characters of its non-blank articles that the tokenizer did not reject."""
    from xlab.fsio import sha256_file

    info = store.split_info(split)
    expected_sha = (store.manifest.get("inputs") or {}).get("splits", {}).get(split)
    rejected = {str(r.get("id")) for r in info.get("rejected", [])}
    if not expected_sha or not parquet.is_file() or len(rejected) != int(info.get("rejected_articles", 0)):
        return []
    if sha256_file(parquet) != expected_sha:
        return []  # another input: validate the store as it is, the up-to-date check is encode's
    import pyarrow.parquet as pq

    n_bytes = n_chars = n_empty = 0
    # pre_buffer=False: the default keeps every column chunk read until the file is closed
    for batch in pq.ParquetFile(parquet, pre_buffer=False).iter_batches(batch_size=4096, columns=["id", "text"]):
        for i, t in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            if not t or t.isspace():
                n_empty += 1  # (non-blank text always has tokens: the codec falls back to bytes)
            elif str(i) not in rejected:
                n_bytes += len(t.encode("utf-8", "surrogatepass"))
                n_chars += len(t)
    found = (("text_bytes", n_bytes), ("text_chars", n_chars), ("empty_articles", n_empty))
    return [f"manifest: split {split} {key} {info.get(key)}, its split file holds {n}"
            for key, n in found if n != int(info.get(key, -1))]  # fmt: skip


def run(cfg: DictConfig, shards_dir=None) -> int:
    """Validate the store at ``shards_dir`` (default ``shards/<name>``); print every problem.

    Returns:
        0 when the store is sound, 1 otherwise.

    Raises:
        XLabError: no store (no manifest) at that folder.
    """
    from xlab.fsio import sha256_file
    from xlab.progress import unit_progress
    from xlab.store import ShardStore, token_dtype

    path = Path(shards_dir) if shards_dir else stage_paths(cfg).shards
    store = ShardStore(path)
    problems: list[str] = []
    if store.row_len != store.seq_len + 1:
        problems.append(f"manifest: row_len {store.row_len} != seq_len + 1 ({store.seq_len + 1})")
    if store.dtype != token_dtype(store.vocab_size):
        problems.append(
            f"manifest: dtype {store.dtype} is not {token_dtype(store.vocab_size)} for vocabulary {store.vocab_size}"
        )
    tok_files = [p for p in (stage_paths(cfg).tokenizer, path / "tokenizer.model") if p.is_file()]
    if not tok_files:
        problems.append("tokenizer: no tokenizer file found to compare with the manifest")
    for p in tok_files:
        if sha256_file(p) != store.tokenizer_sha256:
            problems.append(
                f"tokenizer: sha256 of {p} differs from the manifest's; re-encode with `xlab data encode --force`"
            )
    entries = [(s, e) for s in store.splits for e in store.split_info(s)["shards"]]
    counts = {s: {"articles": 0, "target_tokens": 0} for s in store.splits}
    checked_rows = 0
    with unit_progress("shards", console) as bar:
        for split, e in bar.track(entries, description="validate"):
            problems.extend(check_shard(path / e["file"], e, store, counts[split], store.layout(split)))
            checked_rows += int(e["rows"])
    for s in store.splits:
        info = store.split_info(s)
        for key, found in counts[s].items():
            if found != int(info.get(key, -1)):
                problems.append(f"manifest: split {s} {key} {info.get(key)}, the shards hold {found}")
        problems += _text_count_problems(store, s, stage_paths(cfg).splits / f"{s}.parquet")
    if problems:
        console.print(f"[bold red]validate[/bold red]: {len(problems)} problem(s) in {path}")
        for line in problems:
            console.print(f"  {line}", markup=False, highlight=False)
        return 1
    console.print(
        f"[bold green]validate[/bold green]: {path} is sound ({len(entries)} shards, "
        f"{checked_rows:,} rows, tokenizer {store.tokenizer_sha256[:12]})"
    )
    return 0
