"""Packed rows with document masks against padded rows, on the demo configuration (CPU).

Three measurements, each a ratio within this run:

1. attention: forward + backward of SDPA with a document mask (a real packed batch's
   ``DocumentMask.dense()``) against plain causal SDPA (``is_causal``) of the same shape
   (batch 32 x 4 heads x 128 positions x head size 64), in alternating rounds;
2. throughput: the real ``Trainer.train_step`` of the demo model on the padded demo store and on the
   same splits encoded with ``shards.layout=packed``, timed in alternating rounds in this process.
   Both process the same token slots per step; *real target tokens* per second is slots per second
   times the share of target slots the loss scores (the store's ``target_tokens / (rows * seq_len)``);
3. quality at equal wall time: both train ``--steps`` steps from the same seed with the demo recipe,
   then the whole val split (padded in both stores, so the same targets with the same context) is
   scored with ``xlab evaluate``. When a packed step is slower than a padded one, the packed run is
   read off its val curve (val subset) at the padded run's wall time instead.

Targets (issue 13): packed >= 1.25x the real target tokens per second, and lower val bits per byte
after equal wall time. Needs the demo data stages (``make demo``, or download, split, tokenizer train,
encode); both stores are encoded from them under ``--out``.

Usage: python bench/packing.py [--steps 200] [--threads 2] [--rounds 6] [--out runs/packing-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def sh(cmd: list[str], log: Path, env: dict) -> None:
    with open(log, "a") as f:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)


def time_attention(rounds: int, reps: int, batch) -> tuple[float, float]:
    """Median seconds of masked and causal SDPA forward + backward at the demo's shape."""
    import torch

    from xlab.attention import DocumentMask, attention
    from xlab.store import document_ids

    inputs, sos = batch
    B, T = inputs.shape
    H, D = 4, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g, requires_grad=True) for _ in range(3))
    docs = DocumentMask(document_ids(inputs, sos))

    def run(masked: bool) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            d = DocumentMask(docs.doc_ids) if masked else None  # the mask is built once per forward
            attention(q, k, v, docs=d).sum().backward()
        return (time.perf_counter() - t0) / reps

    run(True), run(False)  # warm-up
    masked, causal = [], []
    for r in range(rounds):
        for m in (True, False) if r % 2 == 0 else (False, True):
            (masked if m else causal).append(run(m))
    return statistics.median(masked), statistics.median(causal)


def real_share(store) -> float:
    """Share of the train split's target slots that the loss scores."""
    info = store.info.splits["train"]
    return info.target_tokens / (info.rows * store.seq_len)


def time_steps(stores: dict[str, Path], args, out: Path) -> dict[str, float]:
    """Median seconds per optimizer step on each store, alternating rounds, in this process."""
    import torch

    from xlab.config import load_config
    from xlab.distributed import DistInfo
    from xlab.train import Trainer

    torch.set_num_threads(args.threads)
    trainers = {}
    for name, path in stores.items():
        cfg = load_config([], [f"paths.runs_dir={out / 'timing'}", f"train.run_name=t-{name}", "train.device=cpu"])
        tr = Trainer(cfg, path, False, DistInfo(), torch.device("cpu"))
        tr.model.train()
        it = tr.micro_batches()
        tr.train_step([next(it)])  # warm-up: allocator, optimizer state
        trainers[name] = (tr, it)
    times: dict[str, list[float]] = {k: [] for k in stores}
    for r in range(args.rounds):
        for name in list(stores) if r % 2 == 0 else reversed(list(stores)):
            tr, it = trainers[name]
            t0 = time.perf_counter()
            for _ in range(args.timing_steps):
                tr.train_step([next(it)])
            times[name].append((time.perf_counter() - t0) / args.timing_steps)
    return {k: statistics.median(v) for k, v in times.items()}


def train_and_score(name: str, store: Path, args, out: Path, env: dict) -> dict:
    """Train ``name`` on ``store`` for ``args.steps`` steps (unless done), score the whole val split."""
    res = out / "results" / f"{name}.json"
    if res.exists():
        return json.loads(res.read_text())
    log = out / "results" / f"{name}.log"
    run_dir = out / "runs" / name
    o = [f"paths.runs_dir={out / 'runs'}", f"train.max_steps={args.steps}", f"train.eval_every={args.eval_every}",
         "train.eval_batches=8", f"train.checkpoint_every={args.steps}", "train.keep_best=0",
         f"train.log_every={args.eval_every}", f"train.threads={args.threads}", "train.device=cpu"]  # fmt: skip
    sets = [x for v in o for x in ("-o", v)]
    t0 = time.time()
    sh([sys.executable, "-m", "xlab", "train", "--run-name", name, "--shards", str(store), *sets], log, env)
    wall = time.time() - t0
    ev = out / "results" / f"{name}.eval.json"
    ckpt = run_dir / "checkpoints" / "last.pt"
    sh([sys.executable, "-m", "xlab", "evaluate", str(ckpt), "--shards", str(store), "--json", str(ev)], log, env)
    m = json.loads(ev.read_text())
    curve = [(r["step"], r["bits_per_byte"]) for r in map(json.loads, (run_dir / "metrics.jsonl").open())
             if r.get("split") == "val"]  # fmt: skip
    result = {"val_loss": m["loss"], "val_bpb": m["bits_per_byte"], "curve": curve, "train_wall_s": wall}
    res.write_text(json.dumps(result, indent=1))
    return result


def interpolate(curve: list, step: float) -> float:
    pts = sorted(curve)
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if s0 <= step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return pts[-1][1] if step >= pts[-1][0] else pts[0][1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--timing-steps", type=int, default=3)
    p.add_argument("--out", default="runs/packing-bench")
    args = p.parse_args()
    out = (ROOT / args.out).resolve()
    (out / "results").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

    from xlab.config import load_config, stage_paths
    from xlab.store import ShardStore

    paths = stage_paths(load_config())
    if not (paths.splits / "train.parquet").is_file() or not paths.tokenizer.is_file():
        sys.exit("bench/packing.py needs the demo's splits and tokenizer; run `make demo` or the data stages first")
    stores = {}
    for layout in ("padded", "packed"):  # the demo's own splits and tokenizer, encoded both ways
        root = out / f"shards-{layout}"
        sh([sys.executable, "-m", "xlab", "data", "encode", "-o", f"paths.shards_dir={root}",
            "-o", f"shards.layout={layout}"], out / "results" / "encode.log", env)  # fmt: skip
        stores[layout] = root / paths.shards.name
    padded_path, packed_path = stores["padded"], stores["packed"]
    padded, packed = ShardStore(padded_path), ShardStore(packed_path)
    share = {"padded": real_share(padded), "packed": real_share(packed)}
    rows = {"padded": padded.rows("train"), "packed": packed.rows("train")}
    print(f"train rows: padded {rows['padded']:,}, packed {rows['packed']:,} ({rows['packed'] / rows['padded']:.3f}x); "
          f"scored target slots: padded {share['padded']:.1%}, packed {share['packed']:.1%}")  # fmt: skip

    import numpy as np
    import torch

    from xlab.store.loader import make_batch

    torch.set_num_threads(args.threads)
    x, _ = make_batch(packed, "train", np.arange(32))
    masked, causal = time_attention(args.rounds, 10, (x, packed.sos_id))
    print(f"attention fwd+bwd (32x4x128x64): document mask {masked * 1e3:.2f} ms, causal {causal * 1e3:.2f} ms "
          f"-> {masked / causal:.2f}x")  # fmt: skip

    step = time_steps({"padded": padded_path, "packed": packed_path}, args, out)
    slots = 32 * padded.seq_len
    tps = {k: slots / step[k] * share[k] for k in step}
    ratio = tps["packed"] / tps["padded"]
    print(f"step: padded {step['padded'] * 1e3:.0f} ms, packed {step['packed'] * 1e3:.0f} ms; real target tokens/s: "
          f"padded {tps['padded']:,.0f}, packed {tps['packed']:,.0f} -> {ratio:.2f}x (target >= 1.25x)")  # fmt: skip

    res = {
        k: train_and_score(k, path, args, out, env) for k, path in (("padded", padded_path), ("packed", packed_path))
    }
    # equal wall time: the packed run at the padded run's steps x (padded / packed step time)
    at = args.steps * step["padded"] / step["packed"]
    if at >= args.steps:
        packed_bpb, how = res["packed"]["val_bpb"], "whole val, at its last step (no slower than padded)"
        padded_bpb = res["padded"]["val_bpb"]
    else:
        packed_bpb, how = interpolate(res["packed"]["curve"], at), f"val subset, at step {at:.0f} of its curve"
        padded_bpb = res["padded"]["curve"][-1][1]
    print(
        f"val after {args.steps} steps (whole val): padded {res['padded']['val_loss']:.4f} nats / "
        f"{res['padded']['val_bpb']:.4f} bpb, packed {res['packed']['val_loss']:.4f} / {res['packed']['val_bpb']:.4f}"
    )
    print(f"equal wall time ({how}): padded {padded_bpb:.4f} bpb, packed {packed_bpb:.4f} bpb "
          f"({packed_bpb / padded_bpb - 1:+.1%}); train wall: padded {res['padded']['train_wall_s']:.0f} s, "
          f"packed {res['packed']['train_wall_s']:.0f} s")  # fmt: skip
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if ratio < 1.25 or packed_bpb >= padded_bpb:
        print("TARGET MISSED: see the figures above")


if __name__ == "__main__":
    main()
