"""Where each stage of a corpus reads and writes, from a configuration's ``paths``, ``data.name``,
``shards.layout`` and ``train.run_name``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig


@dataclass(frozen=True)
class StagePaths:
    """Where each stage of the corpus ``cfg.data.name`` reads and writes."""

    raw: Path  # data/raw/<name>/            articles.parquet + manifest.json
    splits: Path  # data/splits/<name>/       {train,val,test,predict}.parquet + manifest.json
    tokenizer: Path  # tokenizers/<name>.model (its manifest: tokenizers/<name>.json)
    shards: Path  # shards/<name>/            manifest.json + <split>/*.npy
    run: Path  # runs/<run_name>/

    @property
    def tokenizer_manifest(self) -> Path:
        return self.tokenizer.with_suffix(".json")


def stage_paths(cfg: DictConfig) -> StagePaths:
    """The :class:`StagePaths` of a configuration. A packed store is ``shards/<name>-packed``, beside
    the padded ``shards/<name>``: the two recipes' stores coexist, and a run never trains on the
    other layout's rows because another recipe encoded them last."""
    name = cfg.data.name
    p = cfg.paths
    store = name if str(cfg.shards.get("layout", "padded")) == "padded" else f"{name}-{cfg.shards.layout}"
    return StagePaths(
        raw=Path(p.data_dir) / "raw" / name,
        splits=Path(p.data_dir) / "splits" / name,
        tokenizer=Path(p.tokenizer_dir) / f"{name}.model",
        shards=Path(p.shards_dir) / store,
        run=Path(p.runs_dir) / cfg.train.run_name,
    )
