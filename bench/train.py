"""Training-step speed and memory of XLab's trainer against a plain PyTorch loop over HF GPT-2.

Speed: one optimizer step of ``xlab.train`` (its real ``train_step``: shard loader, fused chunked loss,
gradient clipping, fused AdamW) on the conf/defaults.yaml model (d_model 256, 4 layers, 4 heads,
d_ff 1024, vocabulary 8192, sequence 128, batch 32), against the loop a user would write over
``transformers.GPT2LMHeadModel`` of the same dimensions (untied head, SDPA attention, dropout 0):
``model(input_ids, labels).loss.backward(); clip; AdamW.step()``. Same precision for both (fp32 on
CPU, bf16 autocast on CUDA). The two are timed in alternating rounds in one process, so load from other
processes hits both alike; the figure is the median step time. Prints tokens/s of each, the ratio
XLab / GPT-2 (target >= 1.0), and the trainer's MFU (on CPU against a matrix-product rate measured at
start-up; on a GPU against its data-sheet bf16 peak).

Memory: the peak resident memory of a training step with the fused chunked loss and with naive full
logits (``F.cross_entropy(model(x))``), each measured in a fresh subprocess, for the defaults and for
a configuration like the original XLab's quick one (about 2.8M parameters, batch 128, sequence 128,
vocabulary 10,000). On CPU the figure is the resident high-water mark (VmHWM) of the step; on CUDA
``torch.cuda.max_memory_allocated``.

Needs the bench extra: pip install 'xlabml[bench]'.

Usage: python bench/train.py [--rounds 3] [--steps 2] [--device cpu|cuda] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULTS = dict(vocab=8192, seq=128, d_model=256, n_layers=4, n_heads=4, d_ff=1024, batch=32)
QUICK = dict(vocab=10000, seq=128, d_model=128, n_layers=2, n_heads=4, d_ff=512, batch=128)


def write_random_store(path: Path, rows: int, vocab: int, seq: int) -> Path:
    """A shard store of uniformly random tokens (one train shard of full rows: an article of
    ``seq - 1`` tokens fills one row exactly); the tokenizer file is a placeholder, which the trainer
    copies into its checkpoints without parsing."""
    import numpy as np

    from xlab.store import TokenizerEntry, write_store

    articles = np.random.default_rng(0).integers(4, vocab, size=(rows, seq - 1)).tolist()
    ids = TokenizerEntry(vocab_size=vocab, pad_id=3, sos_id=1, eos_id=2, unk_id=0)
    write_store(
        path,
        {"train": articles},
        seq_len=seq,
        tokenizer=ids,
        tokenizer_bytes=b"placeholder tokenizer",
        articles_per_shard=rows,
    )
    return path


def gpt2(d: dict):
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        sys.exit("this benchmark needs HF transformers: pip install 'xlabml[bench]'")
    cfg = GPT2Config(
        vocab_size=d["vocab"],
        n_positions=d["seq"],
        n_embd=d["d_model"],
        n_layer=d["n_layers"],
        n_head=d["n_heads"],
        n_inner=d["d_ff"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    return model


def speed(args) -> None:
    import torch

    from xlab.config import load_config
    from xlab.device import autocast_factory, resolve_device
    from xlab.distributed import DistInfo
    from xlab.train import Trainer
    from xlab.train.mfu import measure_cpu_matmul_flops, mfu, peak_flops

    device = resolve_device(args.device)
    d = DEFAULTS
    B, T = d["batch"], d["seq"]
    n_steps = 2 + 2 * args.rounds * args.steps
    tmp = Path(tempfile.mkdtemp(prefix="xlab-bench-"))
    store = write_random_store(tmp / "store", B * (n_steps + 2), d["vocab"], T)
    cfg = load_config(
        [ROOT / "conf" / "defaults.yaml"],
        [f"paths.runs_dir={tmp / 'runs'}", "train.run_name=bench", f"train.device={device}"],
        use_defaults_file=False,
    )
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.train.batch_size) == (d["d_model"], d["n_layers"], B)
    trainer = Trainer(cfg, store, False, DistInfo(), device)
    trainer.model.train()
    it = trainer.micro_batches()

    torch.manual_seed(0)
    ref = gpt2(d).to(device).train()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.1)
    auto = autocast_factory("auto", device)
    gen = torch.Generator().manual_seed(0)
    ref_batches = [torch.randint(0, d["vocab"], (B, T), generator=gen).to(device) for _ in range(4)]

    def ref_step(i: int) -> None:
        x = ref_batches[i % len(ref_batches)]
        with auto() if auto else torch.autocast("cpu", enabled=False):
            loss = ref(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def xlab_step(i: int) -> None:
        trainer.train_step([next(it)])

    steps = {"xlab": xlab_step, "gpt2": ref_step}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for f in steps.values():  # warm-up: allocator, kernels, optimizer state
        f(0)
        f(1)
    sync()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        for name in list(steps) if r % 2 == 0 else list(reversed(steps)):
            t0 = time.perf_counter()
            for i in range(args.steps):
                steps[name](i)
            sync()
            times[name].append((time.perf_counter() - t0) / args.steps)
    tok = {k: B * T / statistics.median(v) for k, v in times.items()}
    # A CPU has no published peak: the bench names what it compares with, a matmul rate it measures.
    peak = peak_flops(device) or (measure_cpu_matmul_flops() if device.type == "cpu" else None)
    fpt = trainer.model.flops_per_token(T)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"training step (forward, backward, clip, AdamW), {'bf16' if auto else 'fp32'}, batch {B} x seq {T}, "
        f"vocab {d['vocab']}, {name}, torch {torch.__version__}"
    )
    print(f"  parameters: xlab {trainer.model.num_parameters():,}  gpt2 {sum(p.numel() for p in ref.parameters()):,}")
    for k in steps:
        print(f"  {k:5s} {tok[k]:10,.0f} tokens/s  (median step {statistics.median(times[k]) * 1e3:.1f} ms)")
    m = mfu(fpt, tok["xlab"], peak)
    peak_s = (
        "n/a" if not peak else f"{peak / 1e9:,.1f} GFLOP/s" + (" (measured matmul)" if device.type == "cpu" else "")
    )
    what = "MFU" if device.type == "cuda" else "share of the measured matmul rate"
    print(
        f"  xlab {what}: {'n/a' if m is None else f'{100 * m:.1f}%'} against {peak_s}; {fpt / 1e6:.1f} MFLOP per token"
    )
    print(f"ratio xlab/gpt2: {tok['xlab'] / tok['gpt2']:.2f}")


def _vm(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (e.g. VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def memory_child(kind: str, dims: dict, device_name: str) -> None:
    """Run two training steps and print a JSON line with the peak memory (subprocess entry point).

    On CPU the peak is the resident high-water mark VmHWM, reset after setup by writing 5 to
    /proc/self/clear_refs (ru_maxrss would not do: it survives exec, so it can report the parent's).
    """
    import torch
    import torch.nn.functional as F

    from xlab.loss import model_loss
    from xlab.model import ModelConfig, Transformer

    device = torch.device(device_name)
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            vocab_size=dims["vocab"],
            max_len=dims["seq"],
            d_model=dims["d_model"],
            n_layers=dims["n_layers"],
            n_heads=dims["n_heads"],
            d_ff=dims["d_ff"],
        )
    ).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, dims["vocab"], (dims["batch"], dims["seq"]), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")
        before = _vm("VmRSS")
    for _ in range(2):
        if kind == "chunked":
            loss_sum, _, count = model_loss(model, x, x, chunk_tokens=8192)
            loss = loss_sum / count
        else:
            loss = F.cross_entropy(model(x).flatten(0, 1).float(), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _vm("VmHWM")
    print(json.dumps({"peak": peak, "before": before, "params": model.num_parameters()}))


def memory(args) -> None:
    for label, dims in (("defaults", DEFAULTS), ("quick-like", QUICK)):
        res = {}
        for kind in ("chunked", "naive"):
            out = subprocess.run(
                [sys.executable, __file__, "--_memory-child", kind, json.dumps(dims), args.device],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        what = "peak allocated (CUDA)" if args.device.startswith("cuda") else "peak resident"
        print(
            f"memory, {label} ({res['naive']['params'] / 1e6:.1f}M parameters, batch {dims['batch']} x seq "
            f"{dims['seq']}, vocab {dims['vocab']}), {what} over a training step:"
        )
        for kind in ("chunked", "naive"):
            r = res[kind]
            print(
                f"  {kind:8s} {r['peak'] / 2**20:8,.0f} MiB  ({(r['peak'] - r['before']) / 2**20:,.0f} MiB above "
                f"the {r['before'] / 2**20:,.0f} MiB before the step)"
            )
        print(
            f"  ratio naive/chunked: {res['naive']['peak'] / res['chunked']['peak']:.2f} peak, "
            f"{(res['naive']['peak'] - res['naive']['before']) / (res['chunked']['peak'] - res['chunked']['before']):.2f}"
            " above"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    ap.add_argument("--steps", type=int, default=2, help="steps per model per round")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--_memory-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._memory_child:
        kind, dims, dev = args._memory_child
        memory_child(kind, json.loads(dims), dev)
        return
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.skip_speed:
        speed(args)
    if not args.skip_memory:
        memory(args)


if __name__ == "__main__":
    main()
