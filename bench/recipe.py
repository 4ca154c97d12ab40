"""The recipe ablation: the 0.2 architecture with AdamW against each modern ingredient and their combination.

Every variant trains the demo model (conf/defaults.yaml: d_model 256, 4 layers, 4 heads, d_ff 1024,
vocabulary 8192, rows of 128 tokens, batch 32) on the demo store for the same number of steps, so the
same tokens in the same order from the same seed, and is then scored on the whole val split (loss and
bits per byte, ``xlab evaluate``). Stages, each using what the one before found:

1. baseline (0.2 architecture, AdamW) at three learning rates; the best is *the baseline*;
2. each ingredient alone on the baseline at its best learning rate;
3. every ingredient that lowered bits per byte alone, combined, at three learning-rate scales
   (AdamW's ``lr`` and Muon's ``muon_lr`` together); 3b. the best single ingredient alone at the
   scales 1 and 2 (extended past an end like every sweep), since ingredients that help alone need
   not help together; *the winner* is the better of the two;
4. a second seed (other initial weights and data order) for the baseline and the winner;
5. step time of every architecture, timed in alternating rounds in this process (the real
   ``Trainer.train_step``; rounds alternate so load from other processes hits all alike);
6. equal wall time: the winner's val curve where its wall time (steps x step time) equals the
   baseline's whole run, against the baseline's last point on the same val subset. The winner is
   then mid-schedule, its learning rate not yet decayed, so this understates it.

None of the ingredients changes the parameter count (QK-norm has no learned gains; ReLU² keeps
``d_ff``; zero-init and the soft cap change no shapes), so the comparison is at equal parameters and
equal FLOPs per token up to the few element-wise operations the timing shows.

Runs go to ``--out`` (default runs/recipe-bench/), one result file per run, so a killed bench picks up
where it stopped. Training runs ``--jobs`` at a time with ``--threads`` torch threads each; losses do
not depend on either (the timing stage runs alone). Needs the demo store: ``make demo`` or the data
stages of ``xlab pipeline``.

Usage: python bench/recipe.py [--steps 200] [--jobs 2] [--threads 1] [--plot docs/recipe.png]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASE_LRS = (1e-3, 2e-3, 4e-3)
WINNER_SCALES = (0.5, 1.0, 2.0)
INGREDIENTS = {
    "muon": ["train.optimizer=muon"],
    "qk_norm": ["model.qk_norm=true"],
    "relu2": ["model.activation=relu2"],
    "zero_init_proj": ["model.zero_init_proj=true"],
    "softcap15": ["model.logit_softcap=15"],
    "rope": ["model.position=rope"],
}
SEED2 = 1234
# Every variant starts from the 0.2 recipe spelled out (the demo's conf/defaults.yaml carries the modern one).
BASE = ROOT / "conf" / "recipe" / "v0.2.yaml"


def overrides_for(ingredients: list[str], lr: float, seed: int = 42, scale: float = 1.0) -> list[str]:
    o = [f"train.lr={lr * scale:g}", f"train.seed={seed}"]
    if "muon" in ingredients:
        from xlab.config import TrainConfig

        o.append(f"train.muon_lr={TrainConfig().muon_lr * scale:g}")  # Muon's default rate, scaled
    for name in ingredients:
        o += INGREDIENTS[name]
    return o


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        (self.out / "results").mkdir(parents=True, exist_ok=True)
        self.python = sys.executable

    def common(self, steps: int) -> list[str]:
        a = self.args
        return [
            f"paths.runs_dir={self.out / 'runs'}",
            f"train.max_steps={steps}",
            f"train.eval_every={a.eval_every}",
            f"train.eval_batches={a.eval_batches}",
            f"train.checkpoint_every={steps}",
            "train.keep_best=0",
            f"train.log_every={a.eval_every}",
            f"train.threads={a.threads}",
            "train.device=cpu",
        ]

    def run(self, name: str, overrides: list[str], steps: int) -> dict:
        """Train ``name`` (unless its result exists), score the whole val split, return the result."""
        res_path = self.out / "results" / f"{name}.json"
        if res_path.exists():
            return json.loads(res_path.read_text())
        run_dir = self.out / "runs" / name
        env = dict(os.environ, OMP_NUM_THREADS=str(self.args.threads), PYTHONUNBUFFERED="1")
        log = self.out / "results" / f"{name}.log"
        sets = [x for o in self.common(steps) + overrides for x in ("-o", o)]
        t0 = time.time()
        with open(log, "w") as f:
            resume = ["--resume"] if (run_dir / "checkpoints" / "last.pt").exists() else []
            cmd = [self.python, "-m", "xlab", "train", "--run-name", name, "-c", str(BASE), *resume, *sets]
            subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)
            ev = self.out / "results" / f"{name}.eval.json"
            cmd = [self.python, "-m", "xlab", "evaluate", str(run_dir / "checkpoints" / "last.pt"), "--json", str(ev)]
            subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)
        metrics = json.loads(ev.read_text())
        curve = []
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("split") == "val":
                curve.append((r["step"], r["bits_per_byte"]))
        result = {
            "name": name,
            "overrides": overrides,
            "steps": steps,
            "val_loss": metrics["loss"],
            "val_bpb": metrics["bits_per_byte"],
            "curve": curve,
            "train_wall_s": time.time() - t0,
        }
        tmp = res_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(res_path)
        print(f"  {name}: val loss {result['val_loss']:.4f}, bpb {result['val_bpb']:.4f}", flush=True)
        return result

    def run_many(self, jobs: dict[str, tuple[list[str], int]]) -> dict[str, dict]:
        with ThreadPoolExecutor(self.args.jobs) as pool:
            futures = {k: pool.submit(self.run, k, o, s) for k, (o, s) in jobs.items()}
            return {k: f.result() for k, f in futures.items()}

    def sweep(self, values: list[float], job) -> dict[float, dict]:
        """Run ``job(v) -> (name, overrides, steps)`` for each value; while the best is at an end of
        the grid, extend the grid by a factor of 2 past it (at most twice), so the best is inside."""
        values = sorted(values)
        done: dict[float, dict] = {}
        for _ in range(3):
            todo = {v: job(v) for v in values if v not in done}
            res = self.run_many({n: (o, s) for n, o, s in todo.values()})
            done |= {v: res[todo[v][0]] for v in todo}
            best = min(done, key=lambda v: done[v]["val_bpb"])
            if best == max(done):
                values = [best * 2]
            elif best == min(done):
                values = [best / 2]
            else:
                break
        return done


def time_steps(variants: dict[str, list[str]], args, out: Path) -> dict[str, float]:
    """Median seconds per optimizer step of each variant, in alternating rounds, in this process."""
    import torch

    from xlab.config import load_config
    from xlab.distributed import DistInfo
    from xlab.train import Trainer

    torch.set_num_threads(args.threads)
    trainers = {}
    for name, o in variants.items():
        cfg = load_config(
            [BASE], [f"paths.runs_dir={out / 'timing'}", f"train.run_name=t-{name}", "train.device=cpu", *o]
        )
        tr = Trainer(cfg, None, False, DistInfo(), torch.device("cpu"))
        tr.model.train()
        it = tr.micro_batches()
        tr.train_step([next(it)])  # warm-up: allocator, optimizer state
        trainers[name] = (tr, it)
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            tr, it = trainers[name]
            t0 = time.perf_counter()
            for _ in range(args.timing_steps):
                tr.train_step([next(it)])
            times[name].append((time.perf_counter() - t0) / args.timing_steps)
    return {k: statistics.median(v) for k, v in times.items()}


def plot(results: list[tuple[str, dict, float]], path: Path) -> None:
    """Val bits per byte against wall time (steps x measured step time) for each (label, result, s/step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, r, step_s in results:
        steps, bpb = zip(*r["curve"])
        ax.plot([s * step_s / 60 for s in steps], bpb, marker="o", ms=3, label=label)
    ax.set_xlabel("training wall time on 1 CPU thread (minutes)")
    ax.set_ylabel("val bits per byte")
    ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("XLab demo model: 0.2 recipe vs the modern recipe")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timing-steps", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "runs" / "recipe-bench"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "recipe.png"))
    args = p.parse_args()
    os.chdir(ROOT)
    if not (ROOT / "shards" / "wiki" / "manifest.json").exists():
        sys.exit("bench/recipe.py needs the demo store shards/wiki: run `make demo` (or its data stages) first")
    b = Bench(args)
    S = args.steps
    print(f"recipe ablation: {S} steps x 32 x 128 tokens per variant, {args.jobs} jobs x {args.threads} thread(s); "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip

    print("stage 1: baseline learning rates", flush=True)
    base = b.sweep(list(BASE_LRS), lambda lr: (f"base-lr{lr:g}", overrides_for([], lr), S))
    base_lr = min(base, key=lambda v: base[v]["val_bpb"])
    best_base = base[base_lr]

    print(f"stage 2: each ingredient alone at lr {base_lr:g}", flush=True)
    alone = b.run_many({f"add-{k}": (overrides_for([k], base_lr), S) for k in INGREDIENTS})
    helped = [k for k in INGREDIENTS if alone[f"add-{k}"]["val_bpb"] < best_base["val_bpb"]]

    print(f"stage 3: all that helped ({' + '.join(helped) or 'nothing'}) at three learning-rate scales", flush=True)
    combo = b.sweep(list(WINNER_SCALES), lambda s: (f"winner-x{s:g}", overrides_for(helped, base_lr, scale=s), S))
    # Ingredients that help alone need not help together: the best single ingredient gets its own
    # learning-rate sweep, and the winner is whichever of the two is better.
    top = min(helped, key=lambda k: alone[f"add-{k}"]["val_bpb"]) if helped else None
    single = {}
    if top is not None:
        print(f"stage 3b: {top} alone at learning-rate scales 1 and 2 (and on past an end)", flush=True)
        name = lambda s: f"add-{top}" if s == 1 else f"single-{top}-x{s:g}"  # noqa: E731
        single = b.sweep([1.0, 2.0], lambda s: (name(s), overrides_for([top], base_lr, scale=s), S))
    candidates = [(helped, s, r) for s, r in combo.items()] + [([top], s, r) for s, r in single.items()]
    win_ings, win_scale, best_win = min(candidates, key=lambda c: c[2]["val_bpb"])
    win_label = " + ".join(win_ings) + f", lr x{win_scale:g}"
    print(f"  winner: {win_label}", flush=True)

    print("stage 4: second seed", flush=True)
    seed2 = b.run_many(
        {
            "base-seed2": (overrides_for([], base_lr, seed=SEED2), S),
            f"{'-'.join(win_ings)}-x{win_scale:g}-seed2": (
                overrides_for(win_ings, base_lr, seed=SEED2, scale=win_scale),
                S,
            ),
        }
    )
    base2, win2 = seed2.values()

    print("stage 5: step time (alternating rounds, alone)", flush=True)
    arch = {"baseline": overrides_for([], base_lr)} | {f"add-{k}": overrides_for([k], base_lr) for k in INGREDIENTS}
    arch["combination"] = overrides_for(helped, base_lr)
    arch["winner"] = overrides_for(win_ings, base_lr, scale=win_scale)
    load0 = os.getloadavg()[0]
    step_s = time_steps(arch, args, b.out)
    print(f"  load average {load0:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)

    # Equal wall time: the winner's val curve where its wall time equals the baseline's whole run,
    # against the baseline's last point of the same (eval_batches) val subset. The winner is then
    # mid-schedule (its learning rate not yet decayed), which understates it.
    t_base = S * step_s["baseline"]
    at = min(S, t_base / step_s["winner"])
    equal_bpb = interpolate(best_win["curve"], at)
    base_curve_end = best_base["curve"][-1][1]
    tokens_per_step = 32 * 128
    counts = param_counts(arch)
    b0 = best_base["val_bpb"]
    rows = [("baseline (0.2 architecture, AdamW), lr " + f"{base_lr:g}", best_base, "baseline")]
    rows += [(f"baseline, lr {lr:g}", base[lr], "baseline") for lr in sorted(base) if lr != base_lr]
    rows += [(f"+ {k}", alone[f"add-{k}"], f"add-{k}") for k in INGREDIENTS]
    rows += [(f"{' + '.join(helped)}, lr x{s:g}", combo[s], "combination") for s in sorted(combo)]
    rows += [(f"{top} alone, lr x{s:g}", single[s], f"add-{top}") for s in sorted(single)]
    rows += [("baseline, seed 2", base2, "baseline"), (f"winner ({win_label}), seed 2", win2, "winner")]
    print()
    print("| variant | params total / non-emb | val loss | val bpb | wall (min) | tokens/s | Δ bpb |")
    print("|---|---|---|---|---|---|---|")
    for label, r, a in rows:
        tot, ne = counts[a]
        wall = r["steps"] * step_s[a] / 60
        tps = tokens_per_step / step_s[a]
        print(
            f"| {label} | {tot / 1e6:.2f}M / {ne / 1e6:.2f}M | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | "
            f"{wall:.1f} | {tps:,.0f} | {100 * (r['val_bpb'] - b0) / b0:+.2f}% |"
        )
    mean = lambda *rs: statistics.mean(r["val_bpb"] for r in rs)  # noqa: E731
    d_tokens = (mean(best_win, win2) - mean(best_base, base2)) / mean(best_base, base2)
    d_time = (equal_bpb - base_curve_end) / base_curve_end
    muon_over = step_s["add-muon"] / step_s["baseline"] - 1
    print()
    print(f"winner: {win_label}")
    print(f"equal tokens, mean of 2 seeds: {100 * d_tokens:+.2f}% bpb (target <= -8%)")
    print(
        f"equal wall time: {100 * d_time:+.2f}% bpb on the val subset, winner at step {at:.0f} of {S} "
        f"({equal_bpb:.4f} vs {base_curve_end:.4f}; target <= -5%)"
    )
    print(f"Muon step-time overhead over AdamW: {100 * muon_over:+.1f}% (target <= +10%)")
    print("step time (s): " + ", ".join(f"{k} {v:.3f}" for k, v in step_s.items()))
    if args.plot:
        plot([("0.2 recipe (AdamW)", best_base, step_s["baseline"]), ("modern recipe", best_win, step_s["winner"])],
             Path(args.plot))  # fmt: skip


def interpolate(curve: list, step: float) -> float:
    """The val bits per byte of ``curve`` ((step, bpb) points) at ``step``, linear between points."""
    pts = sorted(curve)
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if s0 <= step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return pts[-1][1] if step >= pts[-1][0] else pts[0][1]


def param_counts(arch: dict[str, list[str]]) -> dict[str, tuple[int, int]]:
    """(total, non-embedding) parameters of each variant's model."""
    from xlab.config import ModelConfig, load_config
    from xlab.model import Transformer

    out = {}
    for name, o in arch.items():
        cfg = load_config([BASE], list(o))
        m = Transformer(ModelConfig.of(cfg.model, vocab_size=cfg.tokenizer.vocab_size, max_len=cfg.shards.seq_len))
        out[name] = (m.num_parameters(), m.num_parameters(non_embedding=True))
    return out


if __name__ == "__main__":
    main()
