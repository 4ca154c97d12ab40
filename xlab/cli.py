"""The 0.3 entry module, kept so that ``python -m xlab.cli`` and ``torchrun -m xlab.cli`` still work;
the command line is :mod:`xlab.commands.app` (``python -m xlab``)."""

from xlab.commands.app import app
from xlab.commands.main import main

__all__ = ["app", "main"]

if __name__ == "__main__":
    main()
