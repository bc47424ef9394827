"""Shared benchmark machinery: timing, the device's measured ceilings, JSON result rows.

Every benchmark times with device synchronisation (CUDA events through
``triton.testing.do_bench`` on GPU, ``perf_counter`` on CPU), reports the median, and states its
speed as a fraction of ceilings measured in the same run: copy bandwidth (a large device-to-device
copy) and matmul rate (bf16 and fp32 on GPU, fp32 on CPU).  Rows are appended to
``benchmarks/results/<name>-<device>.json``; each names the device, torch and Triton versions.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, Optional

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, reps: int = 10) -> float:
    """Median wall time of ``fn()`` in milliseconds, synchronised with the device."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=max(warmup, 25), rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()}"


@functools.lru_cache(maxsize=None)
def ceilings(device_str: str) -> Dict[str, float]:
    """Measured peaks on this device: copy GB/s (read + write), bf16/fp32 matmul TFLOP/s."""
    device = torch.device(device_str)
    n = (1 << 28) if device.type == "cuda" else (1 << 24)      # 1 GiB / 64 MiB of float32
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    out = {"copy_GBps": 2 * src.numel() * 4 / ms / 1e6}
    m = 8192 if device.type == "cuda" else 1024
    for dtype in ((torch.bfloat16, torch.float32) if device.type == "cuda" else (torch.float32,)):
        a = torch.randn(m, m, device=device, dtype=dtype)
        b = torch.randn(m, m, device=device, dtype=dtype)
        ms = time_ms(lambda: a @ b, device)
        out[f"{str(dtype).replace('torch.', '')}_matmul_TFLOPs"] = 2 * m ** 3 / ms / 1e9
    return out


def roofline_ms(bytes_moved: float, flops: float, device: torch.device, dtype: str = "bfloat16") -> float:
    """The larger of (bytes / copy bandwidth) and (FLOPs / matmul rate), in ms."""
    c = ceilings(str(device))
    rate = c.get(f"{dtype}_matmul_TFLOPs", c["float32_matmul_TFLOPs"])
    return max(bytes_moved / (c["copy_GBps"] * 1e6), flops / (rate * 1e9))


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=os.path.dirname(RESULTS), stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def record(name: str, row: dict, device: torch.device, *, bytes_moved: Optional[float] = None,
           flops: Optional[float] = None) -> dict:
    """Complete ``row`` (which holds at least ``ms``) with GB/s, TFLOP/s, fractions of the measured
    ceilings and the machine, print it, and append it to ``results/<name>-<device>.json``."""
    c = ceilings(str(device))
    ms = row["ms"]
    full = dict(row)
    if bytes_moved is not None:
        full["GBps"] = bytes_moved / ms / 1e6
        full["frac_copy_bw"] = full["GBps"] / c["copy_GBps"]
    if flops is not None:
        full["TFLOPs"] = flops / ms / 1e9
    full.update(device=device_name(device), torch=torch.__version__, commit=git_commit(),
                ceilings=c)
    try:
        import triton
        full["triton"] = triton.__version__
    except Exception:
        full["triton"] = None
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in full.items()
                      if k != "ceilings"}))
    os.makedirs(RESULTS, exist_ok=True)
    tag = device_name(device).replace(" ", "_").replace("/", "_")
    path = os.path.join(RESULTS, f"{name}-{tag}.json")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = json.load(f)
    rows.append(full)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    return full
