"""The device's ceilings, measured in the same run as the ops they judge.

* copy bandwidth: device-to-device copies (GPU: 1 GiB; CPU: 64 MiB, a memcpy) and copies of the
  sizes the profiled ops move, counting the bytes read plus the bytes written, in GB/s (1e9 bytes);
* matmul rate: products through torch (cuBLAS / the CPU BLAS) in TFLOP/s (1e12 FLOP/s): square
  ones (GPU 8192, CPU 1024) and the ops' own matrix products (``counts.gemm_shapes``); GPU bf16,
  tf32 (fp32 inputs on the tensor cores) and fp32 (IEEE); CPU fp32 (and bf16 when the profile runs
  in bf16).  On the CPU every probe runs with torch's thread count and with 1 thread.

A ceiling is the device's best: the fastest call of the best probe, not a median (a shared or
throttled machine makes some calls slow; none makes one faster than the device can go).  Square
products alone are not enough: a small CPU run measured 0.07 TFLOP/s on its square product while
the ops' own products ran faster, and the table showed rows at 170-280% of their "roofline".

An op's *roofline time* is the larger of bytes / bandwidth and FLOPs / matmul rate: no version of
the op can be much faster, and measured time over it says how far from the device's limits it is.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .timing import Timer

RATE_KEYS = {"bf16": "bf16_TFLOPs", "tf32": "tf32_TFLOPs", "fp32": "fp32_TFLOPs"}
DTYPES = {"bf16": torch.bfloat16, "tf32": torch.float32, "fp32": torch.float32}
Gemm = Tuple[int, int, int, int]     # (batch, M, K, N): batch products of (M, K) @ (K, N)


def probe_timer(device: torch.device) -> Timer:
    """The Timer of the probes: few calls (their fastest is the result), no L2 flush."""
    return Timer(device, warmup=1, min_reps=5, max_reps=50, budget_ms=100.0, flush_l2=False)


def thread_settings(device: torch.device) -> List[int]:
    """CPU thread counts to probe: torch's and 1 (on a busy machine one thread can beat two)."""
    if torch.device(device).type != "cpu":
        return [torch.get_num_threads()]
    return sorted({torch.get_num_threads(), 1}, reverse=True)


def _with_threads(threads: int, fn):
    before = torch.get_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def gemm_tflops(timer: Timer, gemm: Gemm, kind: str, device: torch.device) -> float:
    """TFLOP/s of the product ``gemm`` in ``kind`` (fp32 IEEE, tf32, bf16): 2*batch*M*K*N FLOPs
    over the fastest timed call."""
    batch, m, k, n = gemm
    dtype = DTYPES[kind]
    gen = torch.Generator(device=device).manual_seed(0)
    # Random operands: a product over zeros can run faster than over real data.
    a = torch.randn(batch, m, k, device=device, generator=gen).to(dtype)
    b = torch.randn(batch, k, n, device=device, generator=gen).to(dtype)
    out = torch.empty(batch, m, n, device=device, dtype=dtype)
    call = (lambda: torch.mm(a[0], b[0], out=out[0])) if batch == 1 else (lambda: torch.bmm(a, b, out=out))
    if device.type == "cuda":
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = kind == "tf32"
        try:
            ms = timer.time(call).min_ms
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
    else:
        ms = timer.time(call).min_ms
    return 2 * batch * m * k * n / (ms * 1e-3) / 1e12


def copy_GBps(timer: Timer, nbytes: int, device: torch.device) -> float:
    """GB/s of a copy of ``nbytes`` (bytes read + bytes written over the fastest timed call)."""
    numel = max(1, nbytes // 4)
    src = torch.rand(numel, device=device, generator=torch.Generator(device=device).manual_seed(0))
    dst = torch.empty_like(src)
    ms = timer.time(lambda: dst.copy_(src)).min_ms
    return 2 * numel * 4 / (ms * 1e-3) / 1e9


def measure(device: torch.device, *, dtypes=("fp32",), copy_bytes: Optional[int] = None,
            matmul_n: Optional[int] = None, timer: Optional[Timer] = None,
            gemms: Iterable[Gemm] = (), copy_sizes: Iterable[int] = (),
            probes: Optional[list] = None) -> Dict[str, float]:
    """Measure the ceilings of ``device``: each the best over its probes.

    Args:
        device: the device the ops run on.
        dtypes: profile dtypes ("fp32", "bf16"); on the CPU a bf16 rate is measured only when asked.
        copy_bytes: size of the large copied buffer (default 1 GiB on GPU, 64 MiB on CPU).
        matmul_n: side of the square products (default 8192 on GPU, 1024 on CPU).
        timer: the Timer of the probes (default: :func:`probe_timer`).
        gemms: the ops' own products, (batch, M, K, N) each, probed in every measured kind.
        copy_sizes: further copy sizes in bytes (the ops' traffic), probed besides ``copy_bytes``.
        probes: a list that receives one dict per probe (kind, size, threads, rate, best).
    Returns:
        {"copy_GBps", "fp32_TFLOPs", ["tf32_TFLOPs"], ["bf16_TFLOPs"], "copy_bytes", "matmul_n"}
        (copy_bytes / matmul_n: the large copy and the square side).
    """
    device = torch.device(device)
    gpu = device.type == "cuda"
    copy_bytes = copy_bytes or ((1 << 30) if gpu else (64 << 20))
    matmul_n = matmul_n or (8192 if gpu else 1024)
    if copy_bytes < 4 or matmul_n < 1:
        raise ValueError(f"ceilings: copy_bytes and matmul_n must be positive, got {copy_bytes}, {matmul_n}")
    gemms = [tuple(int(v) for v in g) for g in gemms]
    for g in gemms:
        if len(g) != 4 or min(g) < 1:
            raise ValueError(f"ceilings: gemms must be (batch, M, K, N) of positive ints, got {g}")
    timer = timer or probe_timer(device)
    kinds = ["fp32"] + (["tf32", "bf16"] if gpu else (["bf16"] if "bf16" in dtypes else []))
    # the ops' products in the kinds that bound them: fp32 runs by fp32 (and tf32), bf16 by bf16
    op_kinds = {k for k in kinds if (k == "bf16") == ("bf16" in dtypes)} or {"fp32"}
    records: List[dict] = []
    sizes = sorted({copy_bytes} | {max(4096, int(b)) for b in copy_sizes}, reverse=True)
    squares: Sequence[Gemm] = [(1, matmul_n, matmul_n, matmul_n)]
    for threads in thread_settings(device):
        for nbytes in sizes:
            rate = _with_threads(threads, lambda: copy_GBps(timer, nbytes, device))
            records.append(dict(kind="copy", key="copy_GBps", bytes=nbytes, threads=threads, rate=rate))
        for kind in kinds:
            own = list(dict.fromkeys(gemms)) if kind in op_kinds else []
            for gemm in list(squares) + own:
                rate = _with_threads(threads, lambda: gemm_tflops(timer, gemm, kind, device))
                records.append(dict(kind=kind, key=RATE_KEYS[kind], gemm=list(gemm), threads=threads,
                                    rate=rate))
    out: Dict[str, float] = {}
    for key in ["copy_GBps"] + [RATE_KEYS[k] for k in kinds]:
        best = max((r for r in records if r["key"] == key), key=lambda r: r["rate"])
        best["best"] = True
        out[key] = best["rate"]
    out["copy_bytes"] = float(copy_bytes)
    out["matmul_n"] = float(matmul_n)
    if probes is not None:
        probes.extend(dict(r, best=r.get("best", False)) for r in records)
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
