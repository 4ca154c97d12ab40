"""Training checkpoints, portable exports, and loading a model from either.

A training checkpoint (``runs/<run>/checkpoints/last.pt``, ``best-*.pt``) is one ``torch.save`` file
holding only tensors and plain containers, so that it loads with ``torch.load(weights_only=True)``
and a checkpoint from elsewhere cannot run code on load:

``format``            "xlab-checkpoint", ``format_version`` 1, ``xlab_version``
``model``             the model's state dict (no DDP / torch.compile prefixes)
``optimizer``         AdamW's state dict (two moments per parameter: the bulk of the file)
``step``              optimizer steps done; the learning-rate schedule is a function of it
``loader``            the training ShardLoader's state ``{"epoch", "position", "seed"}``
``rng``               torch (CPU and CUDA), numpy and Python ``random`` states, as tensors and numbers
``config``            the full XLab configuration in force (plain dict)
``model_config``      the :class:`~xlab.config.ModelConfig` the model was built from: the ``model`` section
                      plus the store's ``vocab_size`` and ``max_len`` (0.7 on; before, ``config["model"]``
                      held those two)
``store``             the rows trained on ``{"seq_len", "layout", "train_rows"}`` (0.6 on)
``tokenizer``         the tokenizer's ``.model`` bytes as a ``torch.uint8`` tensor
``tokenizer_sha256``  sha256 of those bytes
``shards``            the path of the shard store trained on
``best``              the best checkpoints kept so far: ``[{"loss", "step", "file"}]``
``rank_rng``          under DDP, every rank's torch random state ``[{"torch", "cuda"?}]`` (else empty)
``log_window``        the train-loss sums since the last log line ``{"loss_sum", "correct", "count", "steps",
                      "seconds"}``, so a resumed run logs what an uninterrupted one logs

An export folder (``xlab export``, written by :mod:`xlab.export`) holds ``model.safetensors`` (weights only), ``config.json`` and
``config.yaml`` (the configuration), ``model_config.json``, ``tokenizer.model`` and ``meta.json`` (step, store path,
versions). It is about a third of a training checkpoint: AdamW's two moments are not in it.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from xlab.errors import XLabError, first_line
from xlab.fsio import atomic_path, sha256_bytes
from xlab.pathcheck import folder_problem, suggestion
from xlab.version import __version__

if TYPE_CHECKING:
    from omegaconf import DictConfig

FORMAT = "xlab-checkpoint"
FORMAT_VERSION = 1
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_MODEL_CONFIG = "model_config.json"  # the ModelConfig the weights are built from (0.7 on)


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict:
    """Every random-number generator's state, as tensors and numbers (``weights_only``-loadable)."""
    import numpy as np
    import torch

    np_state = np.random.get_state()  # ("MT19937", uint32 keys (624,), pos, has_gauss, cached_gaussian)
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),  # 625 values < 2**32
            "gauss_next": py_gauss,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` output."""
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ save and load
def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically (a temporary file renamed into place); returns the path.

    Raises:
        XLabError: the file cannot be written (a full disk, a read-only folder); ``path`` is unchanged.
    """
    import torch

    path = Path(path)
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, "xlab_version": __version__, **state}
    try:
        with atomic_path(path) as tmp:
            torch.save(full, tmp)
    except (OSError, RuntimeError) as e:  # a full disk: torch's writer raises "basic_ios::clear: iostream error"
        raise XLabError(f"cannot write checkpoint {path}: {first_line(e, 160)} (is the disk full?); "
                        "the checkpoint there before is intact") from None  # fmt: skip
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a training checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        XLabError: the file is missing, not a checkpoint, corrupt, or holds objects other than
            tensors and plain containers (refused rather than unpickled: that could run code).
    """
    import pickle
    import warnings

    import torch

    path = Path(path)
    if path.is_dir() and (path / "model.safetensors").exists():
        raise XLabError(
            f"{path} is an export, not a training checkpoint: evaluate, generate and predict "
            f"take it as it is; export and --resume need a .pt checkpoint"
        )
    if path.is_dir():  # e.g. runs/demo/checkpoints: name the .pt files it holds
        raise XLabError(folder_problem(path, "checkpoint", "a .pt file", (".pt",), ("checkpoints",)))
    if not path.is_file():
        raise XLabError(f"checkpoint not found: {path}")
    not_ours = f"cannot read checkpoint {path}: not an XLab checkpoint (one that `xlab train` writes)"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise XLabError(f"cannot read checkpoint {path}: {e.strerror or first_line(e)}") from None
    # torch.save writes a zip archive (a raw pickle in its legacy format); any other file, fed to
    # torch's unpickler, fails with whatever its first bytes happen to mean ("Unsupported operand 103").
    if not (head == b"PK\x03\x04" or head[:1] == b"\x80"):
        raise XLabError(not_ours + (": the file is empty" if not head else ""))

    try:
        with warnings.catch_warnings():
            # torch warns (UserWarning) about raw-pickle files before failing on them; XLab says it in one line.
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refused the file: either it names Python objects to build (never unpickled:
        # that could run code) or it is not a pickle at all. torch lists the former without loading.
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - not a torch checkpoint at all
            names = []
        if names:
            raise XLabError(
                f"refusing to load {path}: it holds Python objects ({', '.join(names[:3])}), not only tensors "
                "and plain data; XLab loads only its own checkpoints"
            ) from None
        raise XLabError(not_ours) from None
    except Exception as e:  # noqa: BLE001 - any failure to parse the file is a bad checkpoint, not a bug
        if head == b"PK\x03\x04":  # a cut zip: torch's reader explains miniz at length, or says EINVAL
            raise XLabError(f"cannot read checkpoint {path}: it is truncated or not a checkpoint "
                            f"({path.stat().st_size:,} bytes); use another one (e.g. a best-*.pt)") from None  # fmt: skip
        raise XLabError(f"cannot read checkpoint {path}: {type(e).__name__}: {first_line(e, 120)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise XLabError(f"cannot read checkpoint {path}: not an XLab training checkpoint")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise XLabError(
            f"{path} has checkpoint format version {ckpt.get('format_version')}, this XLab reads {FORMAT_VERSION}"
        )
    if not isinstance(ckpt.get("model"), dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["model"].items()
    ):
        raise XLabError(f"cannot read checkpoint {path}: 'model' is missing or not a dict of tensors")
    if not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt["config"].get("model"), dict):
        raise XLabError(f"cannot read checkpoint {path}: 'config' is missing or not an XLab configuration")
    tok = ckpt.get("tokenizer")
    if not isinstance(tok, torch.Tensor) or tok.dtype != torch.uint8 or tok.dim() != 1:
        raise XLabError(f"cannot read checkpoint {path}: 'tokenizer' is missing or not a uint8 tensor")
    if "step" in ckpt and (isinstance(ckpt["step"], bool) or not isinstance(ckpt["step"], int)):
        raise XLabError(f"cannot read checkpoint {path}: 'step' is not an integer")
    return ckpt


def trained_store(meta: dict, cfg: DictConfig) -> Path:
    """The shard store a model was trained on: the path its checkpoint or export recorded, else
    ``shards/<data.name>`` of its configuration.

    Raises:
        XLabError: no folder at that path (naming it and ``--shards``), e.g. a relative path read from
            another folder than the one training ran in; or no way to tell the store.
    """
    from xlab.config import stage_paths

    if meta.get("shards"):
        path = Path(meta["shards"])
    else:
        try:
            path = stage_paths(cfg).shards
        except (AttributeError, KeyError, TypeError):  # a configuration without a data section
            raise XLabError("cannot tell which shard store the model was trained on; pass --shards") from None
    if not path.exists():
        # The fix is to point at the store, not to encode a new one (which `xlab data encode` would).
        rel = "" if path.is_absolute() else f", relative to {Path.cwd()}"
        raise XLabError(f"the shard store the model was trained on was not found at {path}{rel}; pass --shards DIR")
    return path


def tokenizer_bytes_tensor(data: bytes):
    """The tokenizer's model bytes as a ``torch.uint8`` tensor of shape ``(len(data),)``."""
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def tensor_bytes(t) -> bytes:
    """Inverse of :func:`tokenizer_bytes_tensor`."""
    return t.cpu().numpy().tobytes()


def tokenizer_from_bytes(data: bytes):
    """The :class:`~xlab.tokenizer.Tokenizer` of a checkpoint's stored ``.model`` bytes.

    Raises:
        XLabError: the bytes are not a readable SentencePiece model.
    """
    from xlab.tokenizer import Tokenizer

    try:
        return Tokenizer.from_bytes(data)
    except XLabError:
        raise
    except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError / OSError on bad bytes
        raise XLabError(f"the tokenizer stored with the model is unreadable: {e}") from None


def build_model(model_config):
    """A fresh :class:`xlab.model.Transformer` (weights as initialised) of ``model_config``: a
    :class:`~xlab.config.ModelConfig` or a mapping with its fields (e.g. a checkpoint's
    ``model_config``).

    Raises:
        XLabError: an unknown option or inconsistent sizes (see :meth:`ModelConfig.check`).
    """
    from xlab.model import Transformer

    return Transformer(model_config)


def load_model(path: str | os.PathLike, device: Any = "cpu"):
    """Load a model from a training checkpoint (``.pt``) or an export folder.

    Args:
        path: a checkpoint file written by ``xlab train`` or a folder written by ``xlab export``.
        device: where to put the model ("cpu", "cuda", "cuda:1", ...).

    Returns:
        ``(model, cfg, tokenizer)``: the :class:`~xlab.model.Transformer` in eval mode on ``device``,
        the XLab configuration (OmegaConf ``DictConfig``) it was trained with, and its
        :class:`~xlab.tokenizer.Tokenizer`.

    Raises:
        XLabError: missing, corrupt or unsafe files (one line).
    """
    model, cfg, tokenizer, _ = load_model_meta(path, device)
    return model, cfg, tokenizer


def _inference_backend(mc: dict, where: Path, device: Any) -> dict:
    """A model trained with ``attention=flash_attn`` is served by ``sdpa`` where flash-attn cannot run
    (not installed, or a CPU device): the backend holds no weights and computes the same attention,
    so a checkpoint from a GPU run still evaluates, generates and exports on a laptop (with a note).
    Returns the model configuration ``mc`` to build, with the backend replaced where needed."""
    import importlib.util

    if str(mc.get("attention")) != "flash_attn":
        return mc
    cpu = str(device).startswith("cpu")
    if cpu or importlib.util.find_spec("flash_attn") is None:
        print(f"note: {where} was trained with model.attention=flash_attn, which cannot run here "
              f"({'a CPU device' if cpu else 'flash-attn is not installed'}); using sdpa (the same attention)",
              file=sys.stderr)  # fmt: skip
        return {**mc, "attention": "sdpa"}
    return mc


def config_and_model(saved: Any, where: Path, device: Any = "cpu"):
    """``(cfg, model)`` from a checkpoint's (or an export's) saved configuration (:func:`saved_config`),
    the attention backend one that runs on ``device``; XLabError if they are not usable ones."""
    from xlab.config import saved_config

    cfg, mc = saved_config(saved, where)
    try:
        mc = _inference_backend(mc, where, device)
        if mc.get("attention") != cfg.model.attention:
            from xlab.config import Attention

            cfg.model.attention = Attention(mc["attention"])  # the backend served, as the model says
        model = build_model(mc)
    except Exception as e:  # noqa: BLE001 - impossible sizes: a bad file, not a bug
        raise XLabError(f"{where} holds an unusable configuration: {first_line(e)}") from None
    return cfg, model


def _read_export_json(p: Path) -> dict:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 - empty, truncated, not UTF-8, unreadable
        raise XLabError(f"cannot read {p}: {type(e).__name__}: {first_line(e)}; re-run `xlab export`") from None
    if not isinstance(data, dict):
        raise XLabError(f"cannot read {p}: expected a JSON object, found {type(data).__name__}; re-run `xlab export`")
    return data


def load_model_meta(path: str | os.PathLike, device: Any = "cpu"):
    """:func:`load_model` plus a dict ``{"step", "shards", "tokenizer_sha256"}`` read from the same files."""
    path = Path(path)
    if path.is_dir():
        cfg_path, w_path, tok_path = path / "config.json", path / EXPORT_WEIGHTS, path / "tokenizer.model"
        for p in (cfg_path, w_path, tok_path):
            if not p.is_file():  # e.g. runs/demo/checkpoints: name the .pt files it holds
                instead = suggestion(
                    path, (".pt",), ("checkpoints",), "a checkpoint .pt or a folder `xlab export` wrote"
                )
                raise XLabError(f"{path} is not an XLab export folder (missing {p.name}); {instead}")
        saved = {"config": _read_export_json(cfg_path)}
        if (path / EXPORT_MODEL_CONFIG).is_file():  # before 0.7 the config's model section held it all
            saved["model_config"] = _read_export_json(path / EXPORT_MODEL_CONFIG)
        cfg, model = config_and_model(saved, cfg_path, device)
        from safetensors.torch import load_model as st_load

        try:
            st_load(model, str(w_path), strict=True)
        except Exception as e:  # noqa: BLE001
            raise XLabError(f"corrupt or mismatched weights {w_path}: {first_line(e)}") from None
        try:
            tok_bytes = tok_path.read_bytes()
        except OSError as e:
            raise XLabError(f"cannot read {tok_path}: {first_line(e)}") from None
        meta_file = _read_export_json(path / "meta.json") if (path / "meta.json").is_file() else {}
        step, shards = meta_file.get("step"), meta_file.get("shards")
        meta = {
            "step": step if isinstance(step, int) and not isinstance(step, bool) else None,
            "shards": shards if isinstance(shards, str) else None,
        }
    else:
        ckpt = load_checkpoint(path)
        cfg, model = config_and_model(ckpt, path, device)
        try:
            model.load_state_dict(ckpt["model"])
        except Exception as e:  # noqa: BLE001 - missing keys, wrong shapes
            raise XLabError(f"checkpoint {path} does not match its model configuration: {first_line(e)}") from None
        tok_bytes = tensor_bytes(ckpt["tokenizer"])
        shards = ckpt.get("shards")
        meta = {"step": ckpt.get("step"), "shards": shards if isinstance(shards, str) else None}
    meta["tokenizer_sha256"] = sha256_bytes(tok_bytes)
    tokenizer = tokenizer_from_bytes(tok_bytes)
    import torch

    bad = next(
        (n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()), None
    )
    if bad is not None:  # a diverged run's weights: every search would return garbage or nothing
        raise XLabError(f"{path} holds non-finite weights ({bad}); use an earlier checkpoint (e.g. a best-*.pt)")
    model.to(device)
    model.eval()
    return model, cfg, tokenizer, meta


def export(ckpt_path: str | os.PathLike, out: Optional[str | os.PathLike] = None) -> Path:
    """Write a training checkpoint's model as a portable folder: :func:`xlab.export.export`."""
    from xlab.export import export as export_folder

    return export_folder(ckpt_path, out)
