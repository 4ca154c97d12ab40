#!/usr/bin/env python3
"""Run the XLab command line from a clone: ``./cli.py --help`` (the installed command is ``xlab``).

When the clone has the ``.venv`` that ``make setup`` creates and this script was started by another
interpreter, it re-runs itself with the environment's Python, so ``./cli.py`` works without
activating anything.
"""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    venv_python = here / ".venv" / "bin" / "python"
    if venv_python.exists() and Path(sys.prefix).resolve() != (here / ".venv").resolve():
        os.execv(str(venv_python), [str(venv_python), str(Path(__file__).resolve()), *sys.argv[1:]])
    sys.path.insert(0, str(here))
    try:
        from xlab.commands.main import main

        main()
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in ("xlab", "pipelines"):
            raise  # XLab's own module: a bug or a broken clone, and its traceback says which
        # No .venv and an interpreter without XLab's dependencies: the set-up step was skipped.
        print(
            f"error: XLab's dependencies are not installed ({sys.executable} cannot import {e.name}); "
            f"run `make setup` in {here} (./cli.py then uses its .venv), or `pip install -e {here}`",
            file=sys.stderr,
        )
        sys.exit(2)
