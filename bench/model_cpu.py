"""CPU training speed of the XLab decoder against HF transformers' GPT-2 with the same dimensions.

Both models: the conf/defaults.yaml dimensions (vocabulary 8192, sequence 128, d_model 256, 4 layers,
4 heads, d_ff 1024), float32, dropout 0, train mode, the same batch and the same loss
(cross-entropy over all positions). One step = forward + backward. The two are timed in alternating
rounds in the same process, so load from other processes hits both alike; the figure is the median
step time. Prints tokens/s of each and the ratio XLab / GPT-2 (>= 1.0 means XLab is at least as fast).

Needs the bench extra: pip install 'xlabml[bench]'.

Usage: python bench/model_cpu.py [--batch 16] [--rounds 5] [--steps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from xlab.model import ModelConfig, Transformer

DIMS = dict(vocab_size=8192, max_len=128, d_model=256, n_layers=4, n_heads=4, d_ff=1024)


def make_gpt2():
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        sys.exit("this benchmark needs HF transformers: pip install 'xlabml[bench]'")
    cfg = GPT2Config(
        vocab_size=DIMS["vocab_size"],
        n_positions=DIMS["max_len"],
        n_embd=DIMS["d_model"],
        n_layer=DIMS["n_layers"],
        n_head=DIMS["n_heads"],
        n_inner=DIMS["d_ff"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(cfg)
    assert model.config._attn_implementation == "sdpa"
    return model


def step_fn(model, logits_of):
    def step(x, y):
        logits = logits_of(model, x)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    ap.add_argument("--steps", type=int, default=3, help="steps per model per round")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    xlab = Transformer(ModelConfig(**DIMS)).train()
    gpt2 = make_gpt2().train()
    steps = {
        "xlab": step_fn(xlab, lambda m, x: m(x)),
        "gpt2": step_fn(gpt2, lambda m, x: m(input_ids=x).logits),
    }
    B, T = args.batch, DIMS["max_len"]
    x = torch.randint(0, DIMS["vocab_size"], (B, T))
    y = torch.randint(0, DIMS["vocab_size"], (B, T))

    for step in steps.values():  # warm-up: allocator, kernels, lazy init
        step(x, y)
        step(x, y)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in order:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[name](x, y)
            times[name].append((time.perf_counter() - t0) / args.steps)

    tok = {k: B * T / statistics.median(v) for k, v in times.items()}
    print(f"forward+backward, fp32, batch {B} x seq {T}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"  parameters: xlab {xlab.num_parameters():,}  gpt2 {sum(p.numel() for p in gpt2.parameters()):,}")
    for k in steps:
        print(f"  {k:5s} {tok[k]:10,.0f} tokens/s  (median step {statistics.median(times[k]) * 1e3:.1f} ms)")
    print(f"ratio xlab/gpt2: {tok['xlab'] / tok['gpt2']:.2f}")


if __name__ == "__main__":
    main()
