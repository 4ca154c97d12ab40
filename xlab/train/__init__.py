"""Training: the loop (:mod:`~xlab.train.trainer`), the learning-rate schedule, the optimizer,
checkpoint keeping, resume reconciliation, run logging and MFU.

Importing this package imports torch; the command line imports it only inside ``xlab train``.
"""

from xlab.train.optim import build_optimizer, param_groups
from xlab.train.schedule import lr_at
from xlab.train.trainer import Trainer, train

__all__ = ["Trainer", "build_optimizer", "lr_at", "param_groups", "train"]
