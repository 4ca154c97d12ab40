"""``xlab export``: a training checkpoint's model as a portable folder, byte-reproducible.

The folder holds ``model.safetensors`` (weights only), ``config.json`` and ``config.yaml`` (the
configuration), ``model_config.json`` (what the weights are built from), ``tokenizer.model`` and
``meta.json`` (step, store path, versions, the checkpoint exported). Every file is a function of the
checkpoint and of the path it was given as: the same checkpoint exported twice gives the same bytes,
file by file (no timestamps; JSON keys sorted; the safetensors header written in one order, see
:func:`canonical_safetensors`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from xlab.checkpoint import (
    EXPORT_MODEL_CONFIG,
    EXPORT_WEIGHTS,
    config_and_model,
    load_checkpoint,
    tensor_bytes,
)
from xlab.errors import XLabError, first_line
from xlab.fsio import atomic_dir, atomic_write_json, publish_mode, sha256_bytes
from xlab.version import __version__

EXPORTS = Path("exports")  # where an export goes when no --out is given


def default_folder(run_name: str, step: int, suffix: str = "") -> Path:
    """``exports/<run_name>-step<step><suffix>``: always one folder inside ``exports/``.

    Raises:
        XLabError: the name is not one folder name (:func:`xlab.config.name_problem`); a checkpoint's
            saved ``train.run_name`` is checked when it is loaded, so this is a second guard.
    """
    from xlab.config import name_problem

    name = f"{run_name}-step{step}{suffix}"
    problem = name_problem("the export folder", name)
    if problem:
        raise XLabError(f"{problem}; pass --out DIR")
    return EXPORTS / name


def canonical_safetensors(path: Path) -> None:
    """Rewrite the header of the safetensors file ``path`` in one order: ``__metadata__`` first with
    its keys sorted, then the tensors in the order written. The safetensors writer keeps the
    metadata in a hash map whose order changes from process to process, so without this two exports
    of one checkpoint differ in their first bytes. The data after the header is left as it is (its
    offsets are relative to the end of the header).

    Format: 8 bytes little-endian header length ``N``, ``N`` bytes of JSON padded with spaces, data.

    Raises:
        OSError: the file cannot be read or written.
        ValueError: the file is no safetensors file.
    """
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
    header = json.loads(raw)
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the writer pads the header to 8 bytes (aligned data)
    if text == raw:
        return
    if len(text) == n:  # the same keys in another order: same length, rewritten in place
        with open(path, "r+b") as f:
            f.seek(8)
            f.write(text)
        return
    tmp = path.with_name(path.name + ".canonical")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(len(text).to_bytes(8, "little") + text)
        src.seek(8 + n)
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, path)


def export(ckpt_path: str | os.PathLike, out: Optional[str | os.PathLike] = None) -> Path:
    """Write a training checkpoint's model as a portable folder (weights only, no optimizer state).

    Args:
        ckpt_path: a training checkpoint ``.pt``.
        out: output folder; default ``exports/<run_name>-step<step>`` (:func:`default_folder`).

    Returns:
        The folder written: ``model.safetensors``, ``config.json``, ``config.yaml``,
        ``model_config.json`` (what the weights are built from), ``tokenizer.model``, ``meta.json``.
        It appears complete or not at all (written beside it, then renamed), and is the same bytes
        every time the same checkpoint is exported.

    Raises:
        XLabError: the checkpoint is unreadable or its saved names are not folder names, or ``out``
            already exists (never overwritten).
    """
    import yaml
    from safetensors.torch import save_model

    ckpt_path = Path(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    step = int(ckpt.get("step", 0))
    cfg, model = config_and_model(ckpt, ckpt_path)
    from xlab.config import to_dict

    cfg_dict = to_dict(cfg)  # the configuration as this XLab reads it (settings it no longer has dropped)
    out = default_folder(cfg.train.run_name, step) if out is None else Path(out)
    if out.exists():
        raise XLabError(f"{out} already exists; choose another --out or remove it")
    try:
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # noqa: BLE001 - missing keys, wrong shapes
        raise XLabError(f"checkpoint {ckpt_path} does not match its model configuration: {first_line(e)}") from None
    tok_bytes = tensor_bytes(ckpt["tokenizer"])
    with atomic_dir(out) as tmp:
        # save_model (not save_file) handles tied weights: a shared tensor is stored once.
        try:
            save_model(model, str(tmp / EXPORT_WEIGHTS), metadata={"format": "xlab-export", "step": str(step)})
            canonical_safetensors(tmp / EXPORT_WEIGHTS)
        except Exception as e:  # noqa: BLE001 - SafetensorError (no space left, ...) is no OSError
            raise XLabError(f"cannot write the export {out}: {first_line(e, 160)}; nothing was written") from None
        publish_mode(tmp / EXPORT_WEIGHTS)  # the safetensors writer creates it 0600
        (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False), encoding="utf-8")
        mc_text = json.dumps(model.cfg.to_dict(), indent=2, sort_keys=True) + "\n"
        (tmp / EXPORT_MODEL_CONFIG).write_text(mc_text, encoding="utf-8")
        (tmp / "tokenizer.model").write_bytes(tok_bytes)
        atomic_write_json(
            tmp / "meta.json",
            {
                "format": "xlab-export",
                "xlab_version": __version__,
                "step": step,
                "shards": ckpt.get("shards"),
                "tokenizer_sha256": sha256_bytes(tok_bytes),
                "source_checkpoint": str(ckpt_path),
                "num_parameters": model.num_parameters(),
            },
        )
    from rich.console import Console

    size_ck, size_ex = ckpt_path.stat().st_size, sum(f.stat().st_size for f in out.iterdir())
    Console(highlight=False).print(
        f"[bold]export[/bold]: {out} ({size_ex / 1e6:.1f} MB; the checkpoint is {size_ck / 1e6:.1f} MB), step {step}"
    )
    return out
