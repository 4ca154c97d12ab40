"""Model FLOPs utilisation: achieved training FLOP/s as a fraction of the hardware's peak.

MFU = ``flops_per_token * tokens_per_second / peak_flops`` (Chowdhery et al., "PaLM", 2022, appendix B),
with ``flops_per_token`` the model's training FLOPs per token (forward + backward, no recomputation).
On a GPU the peak is the dense bf16 tensor-core rate from the vendor's data sheet for the device
name. A CPU has no stated, stable peak (a rate measured at start-up moves with the machine's load,
which once gave "MFU" of 115-119 %), so on CPU training reports achieved GFLOP/s and no MFU;
:func:`measure_cpu_matmul_flops` remains for benchmarks that name it as what it is.
"""

from __future__ import annotations

import time
from typing import Optional

# Dense (no sparsity) bf16 tensor-core peak in FLOP/s, from the vendors' data sheets. Matched as a
# case-insensitive substring of torch.cuda.get_device_name(); the first match wins, so the more
# specific names come first.
GPU_PEAK_BF16 = [
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16 (no bf16 on Volta)
    ("T4", 65e12),  # fp16
]


def gpu_peak_flops(device_name: str) -> Optional[float]:
    """Peak dense bf16 FLOP/s of a GPU named ``device_name`` (e.g. "NVIDIA H100 80GB HBM3"), or None."""
    name = device_name.lower()
    for key, peak in GPU_PEAK_BF16:
        if key.lower() in name:
            return peak
    return None


def measure_cpu_matmul_flops(n: int = 768, seconds: float = 0.15) -> float:
    """fp32 FLOP/s of ``n x n`` matrix products on this CPU with torch's current thread count.

    Runs one warm-up product, then as many as fit in about ``seconds``; one product is ``2 n^3`` FLOPs.
    """
    import torch

    g = torch.Generator().manual_seed(0)  # a private generator: the global RNG stream is left untouched
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    reps = 0
    t0 = time.perf_counter()
    while True:
        torch.mm(a, b, out=out)
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            break
    return 2.0 * n**3 * reps / dt


def peak_flops(device) -> Optional[float]:
    """The published peak FLOP/s to measure MFU against on ``device`` (a torch.device or string): a
    known GPU's dense bf16 rate; None for a CPU or an unknown GPU (no MFU is reported then)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    return None


def mfu(flops_per_token: float, tokens_per_second: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation, a fraction of ``peak`` (FLOP/s); None without a peak."""
    if not peak:
        return None
    return flops_per_token * tokens_per_second / peak
