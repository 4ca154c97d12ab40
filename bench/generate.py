"""Generation speed: the KV cache against recomputing the context, and beam search against greedy.

Model: the default decoder dimensions (vocabulary 8192, d_model 256, 4 layers, 4 heads, d_ff 1024),
with max_len 256 for this benchmark, random initialisation, float32, eval mode. Every run continues
the same 16-token prompt by 256 new tokens with no end-of-sequence id, so every run does the same
number of steps (the context slides once, at token 257, by the rule of ``xlab.generate``).

1. Greedy search with the KV cache against greedy search that recomputes the whole visible
   context at every step with the model's plain forward (logits at every position, as a loop over
   ``model(ids)[:, -1]`` does). Target: >= 5x. Also printed: against a recompute that projects only
   the last position onto the vocabulary, which isolates what the cache alone saves.
2. Beam search of width 4 (one batched forward over the 4 beams per step, cache reordered) against
   greedy search, both cached, as time per generated token. Target: <= 3x.

The variants run in alternating rounds in one process, so load from other processes hits them
alike; each figure is the median over the rounds. On a machine whose cores are busy with other
work, pass ``--threads 1``: a multi-threaded step of this small model then mostly waits for its
descheduled threads, which measures the neighbours rather than the decoder.

Usage: python bench/generate.py [--rounds 3] [--new-tokens 256] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from xlab import generate as gen
from xlab.model import ModelConfig, Transformer

DIMS = dict(vocab_size=8192, max_len=256, d_model=256, n_layers=4, n_heads=4, d_ff=1024)


class Recompute:
    """The model without its KV cache: ``xlab.generate`` then feeds the whole visible context at
    every step through ``model(ids)``, which computes logits at every position."""

    def __init__(self, model: Transformer):
        self.model, self.cfg, self.parameters = model, model.cfg, model.parameters

    def __call__(self, ids):
        return self.model(ids)


class RecomputeLastHead(Recompute):
    """As :class:`Recompute`, but with ``hidden``/``head`` exposed, so ``xlab.generate`` projects only
    the last position onto the vocabulary."""

    def __init__(self, model: Transformer):
        super().__init__(model)
        self.hidden, self.head = model.hidden, model.head


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--beam-width", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**DIMS)).to(device).eval()
    prompt = torch.randint(4, DIMS["vocab_size"], (args.prompt_tokens,)).tolist()
    n = args.new_tokens

    runs = {
        "greedy, KV cache": lambda: gen.greedy_search(model, prompt, n),
        "greedy, recompute": lambda: gen.greedy_search(Recompute(model), prompt, n),
        "greedy, recompute-last": lambda: gen.greedy_search(RecomputeLastHead(model), prompt, n),
        f"beam {args.beam_width}, KV cache": lambda: gen.beam_search(model, prompt, n, beam_width=args.beam_width),
    }
    # Same tokens with and without the cache (a benchmark of a wrong result would be meaningless).
    assert gen.greedy_search(model, prompt, 40) == gen.greedy_search(Recompute(model), prompt, 40)
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}

    print(
        f"device {device}, threads {torch.get_num_threads()}, prompt {args.prompt_tokens} tokens, "
        f"{n} new tokens, max_len {DIMS['max_len']}, median of {args.rounds} rounds"
    )
    for name, t in med.items():
        print(f"  {name:<24} {t:8.3f} s   {1000 * t / n:7.2f} ms/token   {n / t:8.1f} tokens/s")
    cache_ratio = med["greedy, recompute"] / med["greedy, KV cache"]
    last_ratio = med["greedy, recompute-last"] / med["greedy, KV cache"]
    beam_ratio = med[f"beam {args.beam_width}, KV cache"] / med["greedy, KV cache"]
    print(
        f"KV cache speed-up over recompute: {cache_ratio:.2f}x (target >= 5x: "
        f"{'met' if cache_ratio >= 5 else 'NOT met'})"
    )
    print(f"KV cache speed-up over a recompute that projects only the last position: {last_ratio:.2f}x")
    print(
        f"beam {args.beam_width} / greedy time per generated token: {beam_ratio:.2f}x (target <= 3x: "
        f"{'met' if beam_ratio <= 3 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
