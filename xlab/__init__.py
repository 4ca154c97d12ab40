"""XLab: a data-pipeline-first lab for training transformer language models on Wikipedia.

This module is the public face only: the release number and :func:`load_model`. Modules inside
XLab import :mod:`xlab.version` instead of the package root, so imports keep running one way.
Importing ``xlab`` is cheap (no torch); heavy modules are imported where they are used.
"""

from xlab.version import __version__

__all__ = ["__version__", "load_model"]


def load_model(path, device="cpu"):
    """Load a model from a training checkpoint (``.pt``) or an export folder (safetensors).

    Returns ``(model, config, tokenizer)``; see :func:`xlab.checkpoint.load_model`.
    """
    from xlab.checkpoint import load_model as _load_model

    return _load_model(path, device=device)
