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

Usage: python bench/gpu.py [--steps 300] [--batch 16] [--compile] [--peak-tflops 989] [--tiny] [--recipe modern]
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
    args = ap.parse_args()

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
    cfg = ModelConfig(**{**(TINY if tiny else GPT2_SMALL), **model_opts}, dropout=0.0, attention="sdpa")
    model = Transformer(cfg).to(device).train()
    keep = ("optimizer", "muon_lr", "muon_momentum")  # the learning rate of AdamW stays GPT-2's 3e-4
    train_cfg = TrainConfig(lr=3e-4, weight_decay=0.1, **{k: v for k, v in train_opts.items() if k in keep})
    opt = build_optimizer(model, train_cfg, device)
    step_model = torch.compile(model) if args.compile else model
    B, T = args.batch, cfg.max_len
    # A few fixed random batches, already on the device: the benchmark measures the model, not a loader.
    data = torch.randint(0, cfg.vocab_size, (4, B, T + 1), device=device)

    def step(i: int) -> torch.Tensor:
        row = data[i % len(data)]
        x, y = row[:, :-1], row[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = step_model(x)  # (B, T, V) bf16
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
    print(
        f"{name}: {model.num_parameters() / 1e6:.1f}M parameters, batch {B} x seq {T}, bf16 autocast, "
        f"SDPA FlashAttention forced, {args.recipe} recipe ({train_cfg.optimizer}), compile={args.compile}, "
        f"{fpt / 1e9:.3f} GFLOP/token"
    )

    # FLASH_ATTENTION only: if the flash kernel cannot take these inputs, SDPA raises instead of
    # quietly running a slower kernel and spoiling the figure.
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
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
    print(f"achieved: {tok_s * fpt / 1e12:.1f} TFLOP/s")
    if peak:
        print(f"MFU: {100 * tok_s * fpt / (peak * 1e12):.1f}% of {peak:.0f} TFLOP/s bf16 peak")
    else:
        print("MFU: n/a (unknown device; pass --peak-tflops)")
    if cuda:
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
