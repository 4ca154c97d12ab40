"""The encode job record and the complete store: what ``xlab data encode`` writes besides the shards.

- the *job record* ``.work/job.json`` (:class:`EncodeJob`) holds everything that determines the
  store's bytes (parameters, input hashes, unit counts, the stage version) and how the work is
  divided (``parts``); a folder holds the units of one job at a time (:func:`prepare`);
- a unit is done when its done-record and its shard exist (:func:`done`);
- the manifest (:func:`finalize`) is written from the done-records once every unit exists, and
  :func:`up_to_date` says whether a folder holds the complete store of a job;
- a complete store is never damaged: a rebuild happens beside it and :func:`swap` puts it in place.

How the units are divided among processes and who writes the manifest: :mod:`pipelines.encode_parts`.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.stage import console, is_up_to_date, parquet_file, read_manifest
from xlab.config import SPLITS
from xlab.errors import XLabError
from xlab.fsio import atomic_write_bytes, atomic_write_json, read_json, remove_path, sha256_file
from xlab.version import __version__

if TYPE_CHECKING:
    from omegaconf import DictConfig

WORK = ".work"
MAX_ERRORS_KEPT = 1000  # rejected articles listed in the manifest per split (all are counted)
SPLIT_FIX = "xlab data split --force"


@dataclass
class EncodeJob:
    """The job record ``.work/job.json``: what determines the store's bytes, and how the work is
    divided. Its JSON (:meth:`to_json`) keeps the keys of XLab 0.6's record, so a job that 0.6 began
    can be joined and merged.

    Attributes:
        params: ``seq_len``, ``articles_per_shard``, ``format_version`` and ``layout`` (absent when
            padded, so stores encoded before 0.6 stay up to date): what the up-to-date check compares.
        inputs: ``{"tokenizer": sha256, "splits": {split: sha256}}``.
        units: split -> number of units (shards); articles: split -> articles in its parquet file.
        dtype: the numpy dtype name of the shards' tokens.
        tokenizer_file: where the tokenizer was read (its sha256 identifies it, not this path).
        parts: how many parts the units are divided into (1: one process encodes them all).
        tokenizer: ``vocab_size`` and the special ids (``pad_id``, ``sos_id``, ``eos_id``, ``unk_id``).
        stage_version: the encode stage's version (its ``STAGE_VERSION``); recorded only when above 1.
    """

    params: dict
    inputs: dict
    units: dict[str, int]
    articles: dict[str, int]
    dtype: str
    tokenizer_file: str
    parts: int = 1
    tokenizer: dict[str, int] = field(default_factory=dict)
    stage_version: int = 1

    @classmethod
    def of(
        cls, cfg: DictConfig, tok: Any, split_files: dict[str, Path], tok_path: Path, parts: int, stage_version: int
    ) -> EncodeJob:
        """The job of encoding ``split_files`` with ``tok`` (read from ``tok_path``) under ``cfg.shards``
        in ``parts`` parts; reads the splits' row counts and hashes them.

        Raises:
            XLabError: a split file that is not a readable parquet file.
        """
        from xlab.store import FORMAT_VERSION, token_dtype

        a = int(cfg.shards.articles_per_shard)
        articles = {s: parquet_file(p, SPLIT_FIX).metadata.num_rows for s, p in split_files.items()}
        params = {"seq_len": int(cfg.shards.seq_len), "articles_per_shard": a, "format_version": FORMAT_VERSION}
        if cfg.shards.layout != "padded":  # absent when padded, so stores encoded before 0.6 stay up to date
            params["layout"] = str(cfg.shards.layout)
        return cls(
            params=params,
            inputs={"tokenizer": tok.sha256, "splits": {s: sha256_file(p) for s, p in split_files.items()}},
            units={s: math.ceil(n / a) for s, n in articles.items()},
            articles=articles,
            dtype=token_dtype(tok.vocab_size).name,
            tokenizer_file=str(tok_path),
            parts=int(parts),
            tokenizer={k: int(getattr(tok, k)) for k in ("vocab_size", "pad_id", "sos_id", "eos_id", "unk_id")},
            stage_version=int(stage_version),
        )

    @property
    def seq_len(self) -> int:
        return int(self.params["seq_len"])

    @property
    def articles_per_shard(self) -> int:
        return int(self.params["articles_per_shard"])

    @property
    def layout(self) -> str:
        return str(self.params.get("layout", "padded"))

    def to_json(self) -> dict:
        """The record as written to ``job.json`` (``stage_version`` only when above 1, as 0.6 wrote none)."""
        d = asdict(self)
        if self.stage_version == 1:
            del d["stage_version"]
        return d

    @classmethod
    def from_json(cls, d: Any, path: Path) -> EncodeJob:
        """Parse a record read from ``path``.

        Raises:
            XLabError: not a job record (a missing or mistyped key); names ``path``.
        """
        try:
            return cls(
                params=dict(d["params"]),
                inputs=dict(d["inputs"]),
                units={str(s): int(n) for s, n in d["units"].items()},
                articles={str(s): int(n) for s, n in d["articles"].items()},
                dtype=str(d["dtype"]),
                tokenizer_file=str(d["tokenizer_file"]),
                parts=int(d["parts"]),
                tokenizer={str(k): int(v) for k, v in d["tokenizer"].items()},
                stage_version=int(d.get("stage_version", 1)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise XLabError(f"{path} is not an encode job record ({type(e).__name__}: {e}); remove it and "
                            "run `xlab data encode --force`") from None  # fmt: skip

    def matches(self, rec: dict | None, parts: bool = True) -> bool:
        """Whether the recorded job ``rec`` (``job.json``'s content) describes the same store bytes
        (and, with ``parts``, the same division of the work). The tokenizer's path is left out: its
        sha256 is what identifies it, and the machines sharing a folder may see it under other paths."""
        if rec is None:
            return False
        skip = {"tokenizer_file"} if parts else {"tokenizer_file", "parts"}
        return {k: v for k, v in rec.items() if k not in skip} == {
            k: v for k, v in self.to_json().items() if k not in skip
        }

    def disagreement(self, rec: dict) -> str:
        """What differs between the recorded job ``rec`` and this one, in a few words."""
        return _disagreement(rec, self.to_json())

    def part_units(self, split: str, index: int) -> list[int]:
        """The units of ``split`` in part ``index`` of :attr:`parts`."""
        return [u for u in range(self.units[split]) if u % self.parts == index]


def _disagreement(rec: dict, job: dict) -> str:
    """What differs between two job records (``job.json`` contents), in a few words."""
    said = []
    r_in, j_in = rec.get("inputs") or {}, job["inputs"]
    if r_in.get("tokenizer") != j_in["tokenizer"]:
        said.append(f"tokenizer sha256 {str(r_in.get('tokenizer'))[:12]} there, {j_in['tokenizer'][:12]} here")
    # the layout is recorded only when packed: absent means padded
    there, here = ({"layout": "padded", **(p or {})} for p in (rec.get("params"), job["params"]))
    for k in sorted(set(there) | set(here)):
        if there.get(k) != here.get(k):
            said.append(f"{k} {there.get(k)} there, {here.get(k)} here")
    changed = [s for s in SPLITS if (r_in.get("splits") or {}).get(s) != j_in["splits"][s]]
    if changed:
        said.append(f"other {'/'.join(changed)} split file(s)")
    if rec.get("stage_version", 1) != job.get("stage_version", 1):
        said.append(f"encode stage version {rec.get('stage_version', 1)} there, {job.get('stage_version', 1)} here")
    if rec.get("parts") != job["parts"]:
        said.append(f"{rec.get('parts')} parts there, {job['parts']} here")
    return "; ".join(said) or "other settings"


def done(out: Path, split: str, unit: int) -> bool:
    """Whether unit ``unit`` of ``split`` is encoded in ``out`` (its done-record and its shard exist)."""
    return (out / WORK / split / f"{unit:06d}.json").is_file() and (out / split / f"{unit:06d}.npy").is_file()


def prepare(out: Path, job: EncodeJob) -> None:
    """Make ``out``, a folder this process holds alone, ready for ``job``'s units: no manifest, no
    temporaries, and nothing of another job (a killed run of the same job, whatever its number of
    parts, is kept and resumed); the record written."""
    # From here the store is being changed: first make sure no manifest claims it is complete.
    (out / "manifest.json").unlink(missing_ok=True)
    work = out / WORK
    if not job.matches(read_manifest(work / "job.json"), parts=False):
        # No record of this job (other parameters or inputs, or a finished store being redone):
        # nothing in the folder can be reused, and no stale shard may linger beside the new ones.
        for s in SPLITS:
            shutil.rmtree(out / s, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    for p in out.glob("**/.*.tmp"):  # temporaries of a killed run
        p.unlink(missing_ok=True)
    atomic_write_json(work / "job.json", job.to_json())


# ---------------------------------------------------------------------------- the complete store
def up_to_date(out: Path, job: EncodeJob) -> bool:
    """Whether ``out`` holds a complete store of ``job`` (its manifest has the job's params, inputs
    and stage version, every file exists, and a full read verifies every shard)."""
    m = read_manifest(out / "manifest.json")
    if m is None:
        return False
    try:
        files = [out / sh["file"] for info in m.get("splits", {}).values() for sh in info.get("shards", [])]
    except (AttributeError, KeyError, TypeError):  # a manifest of the wrong shape: redo the store
        return False
    files.append(out / "tokenizer.model")
    if not is_up_to_date(out / "manifest.json", job.params, job.inputs, files, stage_version=job.stage_version):
        return False
    from xlab.store import ShardStore

    try:  # a shard or a count changed since it was written is not up to date (one read of the store)
        ShardStore(out).verify()
    except XLabError as e:
        console.print(f"[yellow]encode: {e}; encoding again[/yellow]", markup=True, highlight=False)
        return False
    return True


def finalize(out: Path, job: EncodeJob, shown: Path | None = None) -> dict:
    """Write the store manifest from the done-records (every unit must be done); print a summary
    naming ``shown`` (default ``out``): where the store will be once swapped into place.

    Raises:
        XLabError: units not encoded yet, or the tokenizer file changed since encoding began.
    """
    from xlab.fsio import sha256_bytes
    from xlab.store import MANIFEST, TOKENIZER_COPY, ShardEntry, SplitEntry, StoreManifest, TokenizerEntry, split_layout

    work = out / WORK
    missing = [f"{s}/{u:06d}" for s in SPLITS for u in range(job.units[s]) if not done(out, s, u)]
    if missing:
        raise XLabError(
            f"{len(missing)} unit(s) not encoded yet (e.g. {', '.join(missing[:3])}); run the "
            f"missing `xlab data encode --num-shards N --shard-index I` parts (the last one to finish "
            f"writes the manifest)"
        )
    tok_src = Path(job.tokenizer_file)
    tok_bytes = tok_src.read_bytes()
    if sha256_bytes(tok_bytes) != job.inputs["tokenizer"]:
        raise XLabError(f"{tok_src} changed since encoding began; run `xlab data encode --force`")
    splits = {}
    for s in SPLITS:
        entry = SplitEntry(layout=split_layout(s, job.layout))
        for u in range(job.units[s]):
            rec = read_json(work / s / f"{u:06d}.json")
            entry.add_shard(
                ShardEntry(rec["file"], rec["rows"], rec["real_tokens"], rec["sha256"]),
                articles=rec["articles"],
                target_tokens=rec["target_tokens"],
                text_bytes=rec["text_bytes"],
                text_chars=rec["text_chars"],
            )
            entry.empty_articles += rec["empty"]
            entry.rejected_articles += len(rec["rejected"])
            room = MAX_ERRORS_KEPT - len(entry.rejected)
            entry.rejected.extend(rec["rejected"][: max(room, 0)])
        splits[s] = entry
    atomic_write_bytes(out / TOKENIZER_COPY, tok_bytes)  # the store carries its own tokenizer
    manifest = StoreManifest(
        seq_len=job.seq_len,
        dtype=job.dtype,
        tokenizer=TokenizerEntry(
            **job.tokenizer, file=job.tokenizer_file, copy=TOKENIZER_COPY, sha256=job.inputs["tokenizer"]
        ),
        splits=splits,
        params=job.params,
        inputs=job.inputs,
        stage="encode",
        stage_version=job.stage_version,
        xlab_version=__version__,
    ).to_json()
    atomic_write_json(out / MANIFEST, manifest)
    shutil.rmtree(work, ignore_errors=True)
    _print_summary(shown or out, manifest)
    return manifest


def _print_summary(out: Path, m: dict) -> None:
    from rich.table import Table

    t = Table(title=f"shard store {out} (seq_len {m['seq_len']}, {m['dtype']})")
    for c in ("split", "articles", "empty", "rejected", "rows", "targets", "text MB", "shards"):
        t.add_column(c, justify="right" if c != "split" else "left")
    for s, i in m["splits"].items():
        t.add_row(s, f"{i['articles']:,}", f"{i['empty_articles']:,}", f"{i['rejected_articles']:,}",
                  f"{i['rows']:,}", f"{i['target_tokens']:,}", f"{i['text_bytes'] / 1e6:,.2f}",
                  str(len(i["shards"])))  # fmt: skip
    console.print(t)


def swap(build: Path, out: Path) -> None:
    """Put the complete store ``build`` where ``out`` is, then delete the old one. A kill between the
    two renames leaves ``build`` complete and no ``out``: the next run finishes the swap."""
    old = out.parent / f".{out.name}.old"
    remove_path(old)  # a file, a link or a folder: whatever a killed swap moved aside
    if out.exists() or out.is_symlink():
        os.replace(out, old)
    os.replace(build, out)
    remove_path(old)
