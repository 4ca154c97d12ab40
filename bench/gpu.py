"""GPU training throughput and MFU of the XLab decoder at GPT-2-small size.

Trains a 124M-parameter configuration (vocabulary 50304, d_model 768, 12 layers, 12 heads, d_ff 3072,
sequence 1024, tied embeddings as in GPT-2) on random tokens for a few hundred steps: bf16 autocast
over float32 weights, SDPA restricted to its FlashAttention kernel (an error, not a silent fallback,
if that kernel cannot run), fused AdamW, optionally torch.compile. Prints tokens/s and the model FLOPs
utilization

    MFU = tokens/s * Transformer.flops_per_token(seq_len) / peak bf16 FLOP/s

(6N + 12 L C T FLOPs per token, PaLM appendix B) against the GPU's dense bf16 peak from the table
below, or --peak-tflops.

Without CUDA (or with --tiny) it runs a tiny configuration on the CPU for a few steps, to show that
the script works; its figures mean nothing.

``--recipe modern`` trains the modern recipe instead (conf/recipe/modern.yaml's model options and
Muon for the block matrices, through XLab's own ``build_optimizer``), so the two recipes' tokens/s and
MFU (and Muon's step overhead) can be read off two runs of this script.

``--attention flex|flash_attn`` picks another attention backend, and ``--packed`` feeds rows that
pack documents (lengths drawn from a geometric distribution, mean ``--doc-len`` tokens) with their
document masks: SDPA then runs its memory-efficient kernel with a dense mask, flash-attn its varlen
kernel, FlexAttention a document BlockMask. ``--suite`` runs every combination in one go (0.2 and
modern recipes; padded and packed rows with each available backend), after checking on a packed batch
that every backend's bf16 logits agree with the math reference; it is the one script to run when a GPU
is lent (about 5 minutes on an H200).

Usage: python bench/gpu.py [--steps 300] [--batch 16] [--compile] [--peak-tflops 989] [--tiny] [--recipe modern]
       [--attention sdpa|flash_attn|flex] [--packed] [--suite]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from xlab.config import TrainConfig
from xlab.model import ModelConfig, Transformer
from xlab.train.optim import build_optimizer

ROOT = Path(__file__).resolve().parent.parent


def modern_recipe() -> tuple[dict, dict]:
    """The model options and train settings of conf/recipe/modern.yaml (sizes stay this script's)."""
    from omegaconf import OmegaConf

    r = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "recipe" / "modern.yaml"))
    return r.get("model", {}), r.get("train", {})


# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets; without sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}

GPT2_SMALL = dict(vocab_size=50304, max_len=1024, d_model=768, n_layers=12, n_heads=12, d_ff=3072, tie_embeddings=True)
TINY = dict(vocab_size=512, max_len=64, d_model=64, n_layers=2, n_heads=2, d_ff=256, tie_embeddings=True)


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():  # "H100 PCIe" is checked before "H100"
        if key in device_name:
            return value
    return None


def random_doc_ids(B: int, T: int, mean_len: int, device, seed: int = 0) -> torch.Tensor:
    """(B, T) int64 document ids of rows packing documents of geometric lengths (mean ``mean_len``)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(B, T, generator=g) < 1.0 / mean_len
    starts[:, 0] = True
    return (starts.cumsum(1) - 1).to(device)


def check_backends(cfg: ModelConfig, device, backends: list[str]) -> None:
    """Print each backend's largest |logit - math logit| on a packed batch (bf16 autocast, no grad)."""
    torch.manual_seed(0)
    ref = Transformer({**cfg.__dict__, "attention": "math"}).to(device).eval()
    x = torch.randint(0, cfg.vocab_size, (2, cfg.max_len), device=device)
    d = random_doc_ids(2, cfg.max_len, 200, device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        want = ref(x, doc_ids=d).float()
        for b in backends:
            m = Transformer({**cfg.__dict__, "attention": b}).to(device).eval()
            m.load_state_dict(ref.state_dict())
            diff = (m(x, doc_ids=d).float() - want).abs().max().item()
            print(f"  check {b:10s} packed, bf16: max |logit - math| = {diff:.4f} (logit std {want.std().item():.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation, autotuning)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s (default: from the GPU name)")
    ap.add_argument("--tiny", action="store_true", help="tiny configuration (automatic without CUDA)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--recipe", choices=("0.2", "modern"), default="0.2", help="0.2 (AdamW) or modern (Muon)")
    ap.add_argument("--attention", choices=("sdpa", "flash_attn", "flex"), default="sdpa")
    ap.add_argument("--packed", action="store_true", help="packed rows with document masks")
    ap.add_argument("--doc-len", type=int, default=600, help="mean document length of --packed rows (tokens)")
    ap.add_argument("--suite", action="store_true", help="every recipe x layout x backend, after a check")
    args = ap.parse_args()
    if not args.suite:
        bench(args)
        return
    import copy

    cuda = torch.cuda.is_available()
    backends = ["sdpa", "flex"] if cuda else ["sdpa"]  # FlexAttention has no CPU backward
    try:
        import flash_attn  # noqa: F401

        backends.insert(1, "flash_attn")
    except ImportError:
        print("flash-attn not installed: its padded and varlen runs are skipped")
    size = TINY if (args.tiny or not cuda) else GPT2_SMALL
    check_backends(ModelConfig(**size, dropout=0.0), torch.device("cuda" if cuda else "cpu"),
                   [b for b in backends if b != "sdpa"] + ["sdpa"])  # fmt: skip
    runs = [("0.2", "sdpa", False), ("modern", "sdpa", False)]
    runs += [("0.2", b, p) for b in backends for p in (False, True) if (b, p) != ("sdpa", False)]
    results = []
    for recipe, backend, packed in runs:
        a = copy.copy(args)
        a.recipe, a.attention, a.packed = recipe, backend, packed
        a.steps, a.warmup, a.log_every = min(args.steps, 100), min(args.warmup, 15), 10**9
        results.append(((recipe, backend, packed), bench(a)))
    print("\nsuite: recipe  attention   rows     tokens/s   MFU")
    for (recipe, backend, packed), (tok_s, mfu_pct) in results:
        print(
            f"       {recipe:7s} {backend:11s} {'packed' if packed else 'padded':8s} {tok_s:10,.0f}   "
            + (f"{mfu_pct:.1f}%" if mfu_pct is not None else "n/a")
        )


def bench(args) -> tuple[float, float | None]:
    """One configuration of the module docstring; returns (tokens/s, MFU in percent or None)."""
    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    device = torch.device("cuda" if cuda else "cpu")
    if tiny:
        args.batch, args.steps, args.warmup = min(args.batch, 4), min(args.steps, 10), min(args.warmup, 2)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)

    model_opts, train_opts = modern_recipe() if args.recipe == "modern" else ({}, {})
    cfg = ModelConfig(**{**(TINY if tiny else GPT2_SMALL), **model_opts}, dropout=0.0, attention=args.attention)
    model = Transformer(cfg).to(device).train()
    keep = ("optimizer", "muon_lr", "muon_momentum")  # the learning rate of AdamW stays GPT-2's 3e-4
    train_cfg = TrainConfig(lr=3e-4, weight_decay=0.1, **{k: v for k, v in train_opts.items() if k in keep})
    opt = build_optimizer(model, train_cfg, device)
    step_model = torch.compile(model) if args.compile else model
    B, T = args.batch, cfg.max_len
    # A few fixed random batches, already on the device: the benchmark measures the model, not a loader.
    data = torch.randint(0, cfg.vocab_size, (4, B, T + 1), device=device)
    docs = [random_doc_ids(B, T, args.doc_len, device, seed=i) if args.packed else None for i in range(len(data))]

    def step(i: int) -> torch.Tensor:
        row = data[i % len(data)]
        x, y = row[:, :-1], row[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            d = docs[i % len(data)]
            logits = step_model(x) if d is None else step_model(x, doc_ids=d)  # (B, T, V) bf16
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    peak = args.peak_tflops or (peak_tflops(name) if cuda else None)
    fpt = model.flops_per_token(T)
    # SDPA forced to FlashAttention without a mask: an error, not a silent fallback to a slower kernel.
    forced = args.attention == "sdpa" and not args.packed and cuda
    print(
        f"{name}: {model.num_parameters() / 1e6:.1f}M parameters, batch {B} x seq {T}, bf16 autocast, "
        f"attention {args.attention}{' (FlashAttention kernel forced)' if forced else ''}, "
        f"{'packed rows, mean document ' + str(args.doc_len) if args.packed else 'padded rows'}, "
        f"{args.recipe} recipe ({train_cfg.optimizer}), compile={args.compile}, "
        f"{fpt / 1e9:.3f} GFLOP/token"
    )

    # FLASH_ATTENTION only: if the flash kernel cannot take these inputs, SDPA raises instead of
    # quietly running a slower kernel and spoiling the figure. With a document mask SDPA cannot use
    # that kernel (it takes no mask) and picks the memory-efficient one.
    from contextlib import nullcontext

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if forced else nullcontext():
        for i in range(args.warmup):
            step(i)
        sync()
        t0 = time.perf_counter()
        t_log, loss = t0, None
        for i in range(1, args.steps + 1):
            loss = step(i)
            if i % args.log_every == 0 or i == args.steps:
                lv = loss.item()  # synchronizes
                now = time.perf_counter()
                n = args.log_every if i % args.log_every == 0 else i % args.log_every
                print(f"  step {i:4d}  loss {lv:.3f}  {n * B * T / (now - t_log):,.0f} tokens/s")
                t_log = now
        sync()
        elapsed = time.perf_counter() - t0

    tok_s = args.steps * B * T / elapsed
    print(f"tokens/s: {tok_s:,.0f}")
    print(f"achieved: {tok_s * fpt / 1e12:.1f} TFLOP/s (dense-causal FLOPs: a document mask computes fewer)")
    mfu_pct = 100 * tok_s * fpt / (peak * 1e12) if peak else None
    if peak:
        print(f"MFU: {mfu_pct:.1f}% of {peak:.0f} TFLOP/s bf16 peak")
    else:
        print("MFU: n/a (unknown device; pass --peak-tflops)")
    if cuda:
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        torch.cuda.reset_peak_memory_stats()
    return tok_s, mfu_pct


if __name__ == "__main__":
    main()
