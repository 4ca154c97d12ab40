"""Encode parts under an existing launcher (torchrun, a Slurm job array) into one shared folder.

The part comes from the environment (``part_from_env``); the parts of one job share the folder's job
record (created once, atomically), a part of another job is refused without touching the folder, and
the last part to finish writes the manifest. The multi-process tests run the real command line with
a small trained SentencePiece tokenizer on the tiny corpus of tests/test_encode.py.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ROOT
from test_encode import config, store_bytes, write_corpus

from pipelines import encode as enc
from pipelines import encode_parts
from pipelines.encode_job import _disagreement
from xlab.config import SPLITS
from xlab.errors import XLabError
from xlab.fsio import create_once

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ------------------------------------------------------------------------------ part from the env
@pytest.mark.parametrize(
    "env, part",
    [
        ({}, None),
        ({"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}, (3, 2)),
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4"}, (4, 1)),
        ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}, (3, 2)),
        # torchrun's variables win: Slurm sets its own also where torchrun manages the processes
        ({"RANK": "0", "WORLD_SIZE": "2", "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 0)),
        ({"SLURM_JOB_ID": "99", "SLURM_NTASKS": "4"}, None),  # a plain Slurm job is not an array
    ],
)
def test_part_from_env(env, part):
    got = encode_parts.part_from_env(env)
    assert (got[:2] if got else None) == part
    if env.get("RANK"):
        assert got[2] == f"torchrun: RANK={env['RANK']}, WORLD_SIZE={env['WORLD_SIZE']}"
    elif part:
        assert got[2].startswith("Slurm job array: SLURM_ARRAY_TASK_ID=")


@pytest.mark.parametrize(
    "env, words",
    [
        ({"RANK": "x", "WORLD_SIZE": "3"}, "RANK='x' is not an integer"),
        ({"LOCAL_RANK": "0"}, "WORLD_SIZE is not set"),
        ({"RANK": "3", "WORLD_SIZE": "3"}, "part 3 of 3 is not a part"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "part 0 of 0"),
        ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "5"}, None),  # fine: 4 of 5
        ({"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_COUNT": "5"}, "contiguous array"),  # --array=0-9:2
        ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "2"}, "part -1 of 2"),
        # --array=0-30:2 as Slurm describes it: task 2 alone would pass as part 2 of 16
        (
            {
                "SLURM_ARRAY_TASK_ID": "2",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_MAX": "30",
                "SLURM_ARRAY_TASK_STEP": "2",
                "SLURM_ARRAY_TASK_COUNT": "16",
            },
            "contiguous Slurm job array",
        ),
        (
            {
                "SLURM_ARRAY_TASK_ID": "5",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_MAX": "9",
                "SLURM_ARRAY_TASK_COUNT": "3",
            },
            "has gaps",
        ),  # --array=1,5,9
        ({"SLURM_ARRAY_TASK_ID": "1"}, "SLURM_ARRAY_TASK_COUNT is not set"),
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2.0"}, "not an integer"),
    ],
)
def test_bad_launcher_variables_are_one_clear_error(env, words):
    if words is None:
        assert encode_parts.part_from_env(env)[:2] == (5, 4)
        return
    with pytest.raises(XLabError, match=words) as e:
        encode_parts.part_from_env(env)
    assert "\n" not in str(e.value)


def test_explicit_options_win_over_the_environment():
    env = {"RANK": "1", "WORLD_SIZE": "3"}
    assert encode_parts.choose_part(4, 2, env) == (4, 2, "--num-shards/--shard-index")
    assert encode_parts.choose_part(None, None, env) == (3, 1, "torchrun: RANK=1, WORLD_SIZE=3")
    assert encode_parts.choose_part(None, None, {}) == (1, 0, None)
    assert encode_parts.choose_part(2, None, env) == (2, 0, "--num-shards/--shard-index")


def test_create_once_has_exactly_one_winner(tmp_path):
    path = tmp_path / "rec" / "job.json"
    won, start = [], threading.Barrier(8)

    def create(i):
        start.wait()
        won.append((create_once(path, json.dumps({"by": i}).encode()), i))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for ok, i in won if ok]
    assert len(winners) == 1 and json.loads(path.read_text()) == {"by": winners[0]}
    assert [p.name for p in path.parent.iterdir()] == ["job.json"]  # no temporary left beside it


# ------------------------------------------------------------------------ in one process, in turn
def test_the_last_part_writes_the_manifest(tmp_path, capsys):
    from test_encode import encode

    write_corpus(tmp_path / "one")
    write_corpus(tmp_path / "parts")
    encode(config(tmp_path / "one"))
    cfg = config(tmp_path / "parts")
    store = tmp_path / "parts" / "shards" / "wiki"
    assert encode(cfg, num_shards=3, shard_index=1)["parts_missing"] == [0, 2]
    assert encode(cfg, num_shards=3, shard_index=0)["parts_missing"] == [2]
    assert not (store / "manifest.json").exists()
    m = encode(cfg, num_shards=3, shard_index=2)
    assert "finished last; writing the manifest" in capsys.readouterr().out
    assert m == json.loads((store / "manifest.json").read_text())
    assert store_bytes(store) == store_bytes(tmp_path / "one" / "shards" / "wiki")
    assert encode_parts.merge(cfg) == m  # merge stays, and finds nothing left to do


def test_another_number_of_parts_is_refused_and_one_process_finishes_any_job(tmp_path):
    """The record says how the work is divided; the whole-store command (which holds the folder
    alone) reuses every done unit whatever the division."""
    from test_encode import encode

    write_corpus(tmp_path)
    cfg = config(tmp_path)
    store = tmp_path / "shards" / "wiki"
    encode(cfg, num_shards=3, shard_index=0)
    with pytest.raises(XLabError, match="3 parts there, 2 here"):
        encode(cfg, num_shards=2, shard_index=1)
    m = encode(cfg)  # one process holds the whole store: it reuses part 0's units and completes it
    assert m["splits"]["train"]["articles"] == 60 and not (store / ".work").exists()


# ---------------------------------------------------------------- several processes (the CLI)
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The tiny corpus with a trained 300-id SentencePiece tokenizer (and a second one of 310 ids),
    plus the bytes of the store one process encodes from it."""
    from xlab.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root)
    texts = pq.read_table(root / "data/splits/wiki/train.parquet").column("text").to_pylist()
    Tokenizer.train(texts, 300, root / "tokenizers" / "wiki.model", num_threads=1)
    Tokenizer.train(texts, 310, root / "other" / "wiki.model", num_threads=1)
    ref = root / "ref"
    ref.mkdir()
    for d in ("data", "tokenizers"):
        os.symlink(root / d, ref / d)
    enc.run(config(ref))  # one process, the real tokenizer loader
    return root, store_bytes(ref / "shards" / "wiki")


def fresh(corpus, tmp_path) -> Path:
    root, _ = corpus
    for d in ("data", "tokenizers", "other"):
        os.symlink(root / d, tmp_path / d)
    return tmp_path


def cli_args(root: Path, *more: str) -> list[str]:
    o = [f"paths.data_dir={root / 'data'}", f"paths.tokenizer_dir={root / 'tokenizers'}",
         f"paths.shards_dir={root / 'shards'}", "shards.seq_len=16", "shards.articles_per_shard=7",
         "shards.layout=padded"]  # fmt: skip
    return ["data", "encode", "--num-proc", "1", *[a for x in o for a in ("-o", x)], *more]


def clean_env(**extra: str) -> dict:
    """This environment without any launcher's variables (the tests may themselves run under one)."""
    e = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT) + os.pathsep + e.get("PYTHONPATH", ""))
    e.update(extra)
    return e


# A part as a user's launcher starts it, the imports done before a barrier so that the parts reach
# the shared folder at the same instant; at exit it says whether torch.distributed was ever imported.
PART = """
import atexit, os, sys, time
sys.argv = ["xlab", *sys.argv[1:]]
from xlab.commands.main import main
import pipelines.encode, pyarrow.parquet, xlab.store, xlab.tokenizer
atexit.register(lambda: print("torch.distributed imported:", "torch.distributed" in sys.modules))
if os.environ.get("SLOW_PACK"):  # slow every unit so that the test can kill the part mid-run
    real = xlab.store.pack_articles
    def slow(*a, **k):
        time.sleep(float(os.environ["SLOW_PACK"]))
        return real(*a, **k)
    xlab.store.pack_articles = slow
while not os.path.exists(os.environ["BARRIER"]):
    time.sleep(0.002)
main()
"""


def slurm_part(root: Path, task: int, count: int, *more: str, **env: str) -> subprocess.Popen:
    e = clean_env(SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_COUNT=str(count), SLURM_ARRAY_TASK_MIN="0",
                  SLURM_ARRAY_JOB_ID="4242", BARRIER=str(root / "go"), **env)  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", PART, *cli_args(root, *more)], cwd=root, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def finish(p: subprocess.Popen, timeout=120) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def snapshot(store: Path) -> dict:
    """Every file under the store (its records too) with its bytes and modification time."""
    return {str(p.relative_to(store)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(store.rglob("*"))
            if p.is_file()}  # fmt: skip


@pytest.mark.slow
def test_three_torchrun_processes_give_the_single_process_store(corpus, tmp_path):
    root = fresh(corpus, tmp_path)
    t0 = time.time()
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
         "-m", "xlab", *cli_args(root)],
        cwd=root, env=clean_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for r in range(3):
        assert f"encode: part {r} of 3 (from torchrun: RANK={r}, WORLD_SIZE=3)" in p.stdout
    assert p.stdout.count("finished last; writing the manifest") == 1, p.stdout
    assert store_bytes(root / "shards" / "wiki") == corpus[1]
    print(f"torchrun, 3 parts: {time.time() - t0:.1f} s")


@pytest.mark.slow
def test_three_slurm_array_tasks_started_together_give_the_single_process_store(corpus, tmp_path):
    root = fresh(corpus, tmp_path)
    t0 = time.time()
    parts = [slurm_part(root, t, 3) for t in range(3)]
    time.sleep(1.0)  # let every part reach the barrier (its imports done)
    (root / "go").touch()
    results = [finish(p) for p in parts]
    for t, (rc, out, err) in enumerate(results):
        assert rc == 0, out + err
        assert f"part {t} of 3 (from Slurm job array: SLURM_ARRAY_TASK_ID={t}, SLURM_ARRAY_TASK_MIN=0, " in out
        assert "torch.distributed imported: False" in out  # encode starts no process group
    assert sum("finished last; writing the manifest" in out for _, out, _ in results) == 1
    assert store_bytes(root / "shards" / "wiki") == corpus[1]
    assert sorted(p.name for p in (root / "shards").iterdir()) == ["wiki"]
    print(f"3 array tasks at once: {time.time() - t0:.1f} s")


@pytest.mark.slow
def test_a_part_killed_mid_run_and_relaunched_completes_the_store(corpus, tmp_path):
    root = fresh(corpus, tmp_path)
    store = root / "shards" / "wiki"
    slow = slurm_part(root, 1, 3, SLOW_PACK="0.15")
    others = [slurm_part(root, t, 3) for t in (0, 2)]
    time.sleep(1.0)
    (root / "go").touch()
    deadline = time.time() + 60
    while not (store / ".work" / "train" / "000001.json").exists():  # part 1's first unit is done
        assert slow.poll() is None and time.time() < deadline, slow.stderr.read()
        time.sleep(0.01)
    os.kill(slow.pid, signal.SIGKILL)
    slow.wait()
    said = []
    for p in others:
        rc, out, err = finish(p)
        assert rc == 0 and "parts not done yet: [" in out, out + err
        said.append(out)
    assert any("parts not done yet: [1]." in out for out in said), said  # the later of the two
    assert not (store / "manifest.json").exists()
    first = (store / "train" / "000001.npy").stat()
    rc, out, err = finish(slurm_part(root, 1, 3))  # relaunched: skips its done units, finishes last
    assert rc == 0 and "finished last; writing the manifest" in out, out + err
    again = (store / "train" / "000001.npy").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not encoded again
    assert store_bytes(store) == corpus[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, words",
    [
        ({"more": ("-o", "shards.seq_len=9")}, "seq_len 16 there, 9 here"),
        ({"more": ("-o", "paths.tokenizer_dir=other")}, "tokenizer sha256"),
        ({"count": 2}, "3 parts there, 2 here"),
    ],
)
def test_a_part_of_another_job_is_refused_and_the_store_untouched(corpus, tmp_path, change, words):
    root = fresh(corpus, tmp_path)
    store = root / "shards" / "wiki"
    (root / "go").touch()
    rc, out, err = finish(slurm_part(root, 0, 3))
    assert rc == 0, out + err
    before = snapshot(store)
    rc, out, err = finish(slurm_part(root, 1, change.get("count", 3), *change.get("more", ())))
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {store} holds another encode job (") and words in err, err
    assert snapshot(store) == before


def test_bad_launcher_variables_exit_2_in_one_line(tmp_path, cli):
    r = cli(["data", "encode"], cwd=tmp_path, check=False, env={"RANK": "1", "WORLD_SIZE": "1"})
    assert (
        r.returncode == 2
        and r.stderr.strip() == "error: encode part 1 of 1 is not a part (torchrun: RANK=1, WORLD_SIZE=1)"
    )
    assert not (tmp_path / "shards").exists()


def test_a_job_that_differs_in_layout_says_so():
    """A layout absent from a job's parameters means padded (it is recorded only when packed)."""
    rec = {"params": {"seq_len": 16}, "inputs": {"tokenizer": "ab", "splits": {s: "x" for s in SPLITS}}, "parts": 1}
    job = {**rec, "params": {"seq_len": 16, "layout": "packed"}}
    assert _disagreement(rec, job) == "layout padded there, packed here"
    assert _disagreement(rec, {**rec, "params": {"seq_len": 16, "layout": "padded"}}) == "other settings"


def test_an_explicit_part_outside_the_parts_is_refused_before_it_is_announced(tmp_path, cli):
    r = cli(["data", "encode", "--num-shards", "2", "--shard-index", "5"], cwd=tmp_path, check=False, env={})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "error: --shard-index must be in [0, --num-shards) and --num-shards >= 1 (got 5 of 2)"


def test_a_job_record_of_0_6_reads_back_unchanged_and_matches():
    """EncodeJob keeps job.json's keys: a record that XLab 0.6 wrote (no stage_version) can be joined."""
    from pipelines.encode_job import EncodeJob

    rec = {
        "params": {"seq_len": 16, "articles_per_shard": 7, "format_version": 1},
        "inputs": {"tokenizer": "ab", "splits": {s: "x" for s in SPLITS}},
        "units": {s: 3 for s in SPLITS},
        "articles": {s: 20 for s in SPLITS},
        "dtype": "uint16",
        "tokenizer_file": "/elsewhere/wiki.model",
        "parts": 2,
        "tokenizer": {"vocab_size": 300, "pad_id": 0, "sos_id": 1, "eos_id": 2, "unk_id": 3},
    }
    job = EncodeJob.from_json(rec, Path("job.json"))
    assert job.to_json() == rec and job.stage_version == 1 and job.matches(rec)
    assert job.matches({**rec, "tokenizer_file": "here.model"})  # the path is not the identity
    assert not job.matches({**rec, "parts": 3}) and job.matches({**rec, "parts": 3}, parts=False)
    later = EncodeJob.from_json({**rec, "stage_version": 2}, Path("job.json"))
    assert later.to_json()["stage_version"] == 2 and not later.matches(rec)
    assert later.disagreement(rec) == "encode stage version 1 there, 2 here"
    with pytest.raises(XLabError, match="not an encode job record"):
        EncodeJob.from_json({"params": {}}, Path("job.json"))
