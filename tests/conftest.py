"""Shared test helpers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
XLAB = [sys.executable, "-m", "xlab"]


def run_cli(args, cwd, check=True, timeout=600, env=None):
    """Run ``xlab ARGS`` in ``cwd`` as a user would; returns the CompletedProcess (text mode)."""
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "2")
    e["HF_HUB_OFFLINE"] = "1"
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    if env:
        e.update(env)
    p = subprocess.run(XLAB + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=e)
    if check and p.returncode != 0:
        raise AssertionError(
            f"xlab {' '.join(map(str, args))} exited {p.returncode}\n"
            f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
        )
    return p


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One torch thread for the whole suite: its models are tiny, and on a busy 2-core machine a
    second thread only adds synchronization (subprocesses set OMP_NUM_THREADS themselves)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_children_die(children, what: str, timeout_s: float = 10.0) -> None:
    """Assert that every psutil process in ``children`` exits (or is a zombie) within ``timeout_s``
    after its parent was killed; kill the survivors before failing."""
    import time

    import psutil

    def alive():
        out = []
        for c in children:
            try:
                if c.is_running() and c.status() != psutil.STATUS_ZOMBIE:
                    out.append(c)
            except psutil.NoSuchProcess:
                pass
        return out

    deadline = time.time() + timeout_s
    while alive() and time.time() < deadline:
        time.sleep(0.05)
    left = alive()
    for c in left:  # clean up before failing
        c.kill()
    assert not left, f"processes outlived {what}: {[c.pid for c in left]}"
