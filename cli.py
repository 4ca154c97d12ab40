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
    from xlab.commands.app import main

    main()
