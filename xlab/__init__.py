"""XLab: a data-pipeline-first lab for training transformer language models on Wikipedia.

Importing ``xlab`` is cheap (no torch); heavy modules are imported where they are used.
"""

__version__ = "0.6.0"


def load_model(path, device="cpu"):
    """Load a model from a training checkpoint (``.pt``) or an export folder (safetensors).

    Returns ``(model, config, tokenizer)``; see :func:`xlab.checkpoint.load_model`.
    """
    from xlab.checkpoint import load_model as _load_model

    return _load_model(path, device=device)
