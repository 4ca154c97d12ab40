"""A Hugging Face export of an XLab model: ``xlab export CHECKPOINT --format hf --out DIR``.

The folder loads with ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` (native classes
where one expresses the model exactly, else with ``trust_remote_code=True``: :mod:`xlab.hf.native`)
and ``AutoTokenizer.from_pretrained(DIR)`` (:mod:`xlab.hf.tokenizer`). It holds ``config.json``,
``model.safetensors`` (float32), the tokenizer files, ``generation_config.json`` (the run's
``generate:`` settings), a model card ``README.md`` and, for remote code, ``configuration_xlab.py``
and ``modeling_xlab.py``. Writing it needs the ``tokenizers`` package (``pip install 'xlabml[hf]'``);
nothing here imports transformers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from xlab.errors import XLabError, first_line

__all__ = ["export_hf"]

REMOTE_FILES = ("configuration_xlab.py", "modeling_xlab.py")


def _check_out(out: Path, force: bool) -> None:
    """Refuse an existing ``out`` unless ``force``; even then, only an earlier export or an empty
    folder is replaced, never another folder."""
    if not out.exists():
        return
    if not force:
        raise XLabError(f"{out} already exists; choose another --out, or pass --force to replace it")
    if not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file()):
        raise XLabError(f"{out} exists and is not an export folder; --force replaces only an earlier export")


def export_hf(ckpt_path: str | os.PathLike, out: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Write a training checkpoint's model as a Hugging Face folder.

    Args:
        ckpt_path: a training checkpoint ``.pt`` (``xlab train`` writes them).
        out: the folder to write (default ``exports/<run_name>-step<step>-hf``); it appears complete
            or not at all (written beside it, then renamed).
        force: replace ``out`` when it holds an earlier export.

    Returns:
        ``out``.

    Raises:
        XLabError: not an XLab checkpoint, ``out`` exists (without ``force``, or not an export), the
            ``tokenizers`` package is missing, or the folder cannot be written; nothing is written then.
    """
    from xlab.checkpoint import config_and_model, load_checkpoint, tensor_bytes, tokenizer_from_bytes
    from xlab.export import default_folder
    from xlab.fsio import atomic_dir, publish_mode

    ckpt_path = Path(ckpt_path)
    if out is not None:  # refused before the checkpoint is read
        _check_out(Path(out), force)
    try:
        import tokenizers  # noqa: F401 - checked before any work
    except ImportError:
        raise XLabError("--format hf needs the tokenizers package: pip install 'xlabml[hf]'") from None
    ckpt = load_checkpoint(ckpt_path)
    cfg, model = config_and_model(ckpt, ckpt_path)
    step = int(ckpt.get("step", 0))
    out = Path(out) if out is not None else default_folder(cfg.train.run_name, step, "-hf")
    _check_out(out, force)
    try:
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # noqa: BLE001 - missing keys, wrong shapes
        raise XLabError(f"checkpoint {ckpt_path} does not match its model configuration: {first_line(e)}") from None
    tok = tokenizer_from_bytes(tensor_bytes(ckpt["tokenizer"]))
    from safetensors.torch import save_file

    from xlab.hf.card import generation_config, last_val, model_card
    from xlab.hf.native import architecture, convert
    from xlab.hf.tokenizer import write_tokenizer

    special = {"bos_token_id": tok.sos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    arch, config, tensors = convert(model.cfg, model.state_dict(), special)
    config["xlab"] = {"model_config": model.cfg.to_dict(), "step": step}
    with atomic_dir(out) as tmp:
        try:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        except Exception as e:  # noqa: BLE001 - SafetensorError (no space left, ...) is no OSError
            raise XLabError(f"cannot write the export {out}: {first_line(e, 160)}; nothing was written") from None
        publish_mode(tmp / "model.safetensors")  # the safetensors writer creates it 0600
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        write_tokenizer(tmp, tok, model.cfg.max_len)
        gen = generation_config(cfg.generate, special)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        why = architecture(model.cfg)[1]
        card = model_card(cfg, model.cfg, arch, why, step, model.num_parameters(), last_val(ckpt_path, step))
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if arch == "xlab":
            remote = Path(__file__).parent / "remote"
            for name in REMOTE_FILES:
                shutil.copyfile(remote / name, tmp / name)
    load = "trust_remote_code=True" if arch == "xlab" else "no remote code"
    print(f"export: {out} ({arch}, {load}{'; ' + why if why else ''})")
    return out
