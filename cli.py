#!/usr/bin/env python3
"""Run the XLab command line from a clone: ``./cli.py --help`` (the installed command is ``xlab``)."""

from xlab.cli import main

if __name__ == "__main__":
    main()
