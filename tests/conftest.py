"""Shared test helpers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
XLAB = [sys.executable, "-m", "xlab.cli"]


def run_cli(args, cwd, check=True, timeout=600, env=None):
    """Run ``xlab ARGS`` in ``cwd`` as a user would; returns the CompletedProcess (text mode)."""
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "2")
    e["HF_HUB_OFFLINE"] = "1"
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    if env:
        e.update(env)
    p = subprocess.run(XLAB + [str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env=e)
    if check and p.returncode != 0:
        raise AssertionError(f"xlab {' '.join(map(str, args))} exited {p.returncode}\n"
                             f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


@pytest.fixture
def cli():
    return run_cli
