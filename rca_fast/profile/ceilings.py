"""The device's ceilings, measured in the same run as the ops they judge.

* copy bandwidth: a large device-to-device copy (GPU: 1 GiB; CPU: 64 MiB, a memcpy), counting the
  bytes read plus the bytes written, in GB/s (1e9 bytes);
* matmul rate: square products through torch (cuBLAS / the CPU BLAS) in TFLOP/s (1e12 FLOP/s):
  GPU bf16, tf32 (fp32 inputs on the tensor cores) and fp32 (IEEE); CPU fp32 (and bf16 when
  the profile runs in bf16).

A ceiling is the device's best: the fastest of the timed calls, not their median (a shared or
throttled machine makes some calls slow; none makes one faster than the device can go).

An op's *roofline time* is the larger of bytes / bandwidth and FLOPs / matmul rate: no version of
the op can be much faster, and measured time over it says how far from the device's limits it is.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .timing import Timer

RATE_KEYS = {"bf16": "bf16_TFLOPs", "tf32": "tf32_TFLOPs", "fp32": "fp32_TFLOPs"}


def _matmul_tflops(timer: Timer, n: int, dtype: torch.dtype, device: torch.device, *,
                   tf32: bool = False) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    # Random operands: a matmul over zeros can run faster than over real data.
    a = torch.randn(n, n, device=device, dtype=torch.float32, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, dtype=torch.float32, generator=gen).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    if device.type == "cuda":
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            ms = timer.time(lambda: torch.mm(a, b, out=out)).min_ms
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
    else:
        ms = timer.time(lambda: torch.mm(a, b, out=out)).min_ms
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def measure(device: torch.device, *, dtypes=("fp32",), copy_bytes: Optional[int] = None,
            matmul_n: Optional[int] = None, timer: Optional[Timer] = None) -> Dict[str, float]:
    """Measure the ceilings of ``device``.

    Args:
        device: the device the ops run on.
        dtypes: profile dtypes ("fp32", "bf16"); on the CPU a bf16 rate is measured only when asked.
        copy_bytes: size of the copied buffer (default 1 GiB on GPU, 64 MiB on CPU).
        matmul_n: side of the square products (default 8192 on GPU, 1024 on CPU).
        timer: the Timer to use (default: one for ``device``).
    Returns:
        {"copy_GBps", "fp32_TFLOPs", ["tf32_TFLOPs"], ["bf16_TFLOPs"], "copy_bytes", "matmul_n"}.
    """
    device = torch.device(device)
    gpu = device.type == "cuda"
    copy_bytes = copy_bytes or ((1 << 30) if gpu else (64 << 20))
    matmul_n = matmul_n or (8192 if gpu else 1024)
    if copy_bytes < 4 or matmul_n < 1:
        raise ValueError(f"ceilings: copy_bytes and matmul_n must be positive, got {copy_bytes}, {matmul_n}")
    timer = timer or Timer(device, flush_l2=False)
    numel = copy_bytes // 4
    src = torch.rand(numel, device=device, generator=torch.Generator(device=device).manual_seed(0))
    dst = torch.empty_like(src)
    ms = timer.time(lambda: dst.copy_(src)).min_ms
    out = {"copy_GBps": 2 * numel * 4 / (ms * 1e-3) / 1e9}
    del src, dst
    out["fp32_TFLOPs"] = _matmul_tflops(timer, matmul_n, torch.float32, device, tf32=False)
    if gpu:
        out["tf32_TFLOPs"] = _matmul_tflops(timer, matmul_n, torch.float32, device, tf32=True)
        out["bf16_TFLOPs"] = _matmul_tflops(timer, matmul_n, torch.bfloat16, device)
    elif "bf16" in dtypes:
        out["bf16_TFLOPs"] = _matmul_tflops(timer, matmul_n, torch.bfloat16, device)
    out["copy_bytes"] = float(numel * 4)
    out["matmul_n"] = float(matmul_n)
    return out


def rate_key(dtype: str, ceilings: Dict[str, float]) -> str:
    """Which measured matmul rate bounds an op run in ``dtype``: bf16 for bf16; for fp32 the
    tf32 rate where it was measured (Triton's fp32 dot runs on the tensor cores as tf32, so that is
    the fastest any fp32 version can go), else the fp32 rate."""
    if dtype == "bf16" and "bf16_TFLOPs" in ceilings:
        return "bf16_TFLOPs"
    if dtype == "fp32" and "tf32_TFLOPs" in ceilings:
        return "tf32_TFLOPs"
    return "fp32_TFLOPs"


def roofline_ms(nbytes: float, flops: float, ceilings: Dict[str, float], dtype: str):
    """(roofline ms, bound) for the work: the larger of bytes / bandwidth and FLOPs / matmul rate,
    and which of the two it is ("memory" or "compute")."""
    memory_ms = nbytes / (ceilings["copy_GBps"] * 1e9) * 1e3
    compute_ms = flops / (ceilings[rate_key(dtype, ceilings)] * 1e12) * 1e3
    return (memory_ms, "memory") if memory_ms >= compute_ms else (compute_ms, "compute")
