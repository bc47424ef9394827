"""Shared benchmark machinery over the profiler's: one timer, one cost model, one roofline.

* time: ``rca_fast.profile.timing.Timer`` -- CUDA events with the L2 flushed before each call on
  a GPU, the host clock on the CPU; the median of the timed calls;
* cost: ``rca_fast.profile.counts`` -- the minimum bytes and FLOPs of one call of an op at a
  :class:`~rca_fast.profile.counts.ProfileShape` (forward, plus backward for ``fwd_bwd`` rows);
  the same formulas the profiler's op mode reports, tested there against tensor sizes and loops;
* roofline: ``rca_fast.profile.ceilings`` -- copy bandwidth and matmul rates measured in the same
  run (once per device and dtype), roofline time = max(bytes / bandwidth, FLOPs / matmul rate).

Rows are appended to ``benchmarks/results/<name>-<device>.json``; each names the device, torch,
Triton and CUDA versions and the commit.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import platform
from typing import Callable, Dict, Hashable, Mapping, Optional, Sequence, Tuple

import pytest
import torch

from rca_fast.profile import ceilings as _ceilings, counts
from rca_fast.profile.timing import Timer, device_name, environment, git_commit, sync

__all__ = ["RESULTS", "sync", "time_ms", "device_name", "git_commit", "ceilings", "work", "record",
           "grid", "pick_case", "provider_fn", "forward_backward", "time_step", "add_speedups",
           "extra_memory_mb"]

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GPU_BUDGET_MS = 100.0   # on a GPU, at least ``reps`` calls and more up to about this much time


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of ``fn()`` by the profiler's Timer: ``reps`` timed calls on the CPU; on a
    GPU at least ``reps`` and up to 500 within :data:`GPU_BUDGET_MS`."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    timer = Timer(device, warmup=warmup, min_reps=reps, max_reps=max(reps, 500) if gpu else reps,
                  budget_ms=GPU_BUDGET_MS if gpu else 0.0)
    return timer.time(fn).ms


@functools.lru_cache(maxsize=None)
def ceilings(device_str: str, dtype_name: str = "fp32") -> Dict[str, float]:
    """The device's measured ceilings (``rca_fast.profile.ceilings.measure``), once per run."""
    return _ceilings.measure(torch.device(device_str), dtypes=(dtype_name,))


def dtype_name(dtype: torch.dtype) -> str:
    """The ceilings' name of a dtype: bf16 for bfloat16 (and float16, both on the half-precision
    tensor cores), fp32 otherwise."""
    return "bf16" if dtype in (torch.bfloat16, torch.float16) else "fp32"


def work(op: str, shape: counts.ProfileShape, dtype: torch.dtype, mode: str, **kwargs) -> Tuple[int, int]:
    """(bytes, FLOPs) of one ``mode`` ("fwd" or "fwd_bwd") call of ``op`` at ``shape``, from
    ``counts.work`` (keyword arguments go to it, e.g. ``cam_dtype``)."""
    if mode not in ("fwd", "fwd_bwd"):
        raise ValueError(f"mode must be 'fwd' or 'fwd_bwd', got {mode!r}")
    nbytes, flops = counts.work(op, "fwd", shape, dtype, **kwargs)
    if mode == "fwd_bwd":
        b, f = counts.work(op, "bwd", shape, dtype, **kwargs)
        nbytes, flops = nbytes + b, flops + f
    return nbytes, flops


def grid(cases, dtypes, modes: Sequence[str], providers: Sequence[str]):
    """The op benchmarks' parametrization: every (case_name, dtype_name, mode, provider), the
    provider varying fastest (so rca_fast, listed last, runs after the rows it is compared with)."""
    def apply(fn):
        for name, values in (("case_name", list(cases)), ("dtype_name", list(dtypes)), ("mode", list(modes)),
                             ("provider", list(providers))):
            fn = pytest.mark.parametrize(name, values)(fn)
        return fn
    return apply


def provider_fn(provider: str, reference: Callable, kernel: str) -> Callable:
    """The function a row times: ``ref`` the eager reference, ``ref_compiled`` torch.compile of it,
    ``rca_fast`` the Triton provider ``kernel`` ("module:function", imported only then)."""
    if provider == "ref":
        return reference
    if provider == "ref_compiled":
        return torch.compile(reference)
    module, name = kernel.split(":")
    return getattr(importlib.import_module(module), name)


def pick_case(device: torch.device, gpu_cases: Mapping, cpu_cases: Mapping, case: Hashable, provider: str,
              dtypes: Mapping[str, torch.dtype], dtype_name: str):
    """(case, dtype) of this device's table, or a pytest skip: the CPU runs its own (smaller)
    cases, and there only the eager reference (``ref``) in fp32."""
    cases = gpu_cases if device.type == "cuda" else cpu_cases
    if case not in cases:
        pytest.skip("this case is benchmarked on CUDA only")
    if device.type != "cuda" and (provider != "ref" or dtype_name != "fp32"):
        pytest.skip("on CPU only the eager reference in fp32 is benchmarked")
    return cases[case], dtypes[dtype_name]


def forward_backward(forward: Callable[[], torch.Tensor], backward: bool, inputs,
                     grad_outputs=None) -> Callable[[], None]:
    """A step: ``forward()``, then (``backward``) the gradients of its output w.r.t. ``inputs``
    (``grad_outputs``: the upstream gradient; None for a scalar loss)."""
    def step():
        out = forward()
        if backward:
            torch.autograd.grad(out, inputs, grad_outputs)
    return step


def time_step(benchmark, timed: Callable[[], object], group: str, device: torch.device,
              rounds: int) -> Tuple[Callable[[], object], float]:
    """Run ``timed`` once untimed (torch.compile, Triton autotuning), then time it under
    pytest-benchmark (host clock: a step that also synchronises the device) and by
    :func:`time_ms` (the Timer synchronises itself); returns (the synchronising step, median ms)."""
    def step():
        timed()
        sync(device)
    step()
    benchmark.group = group
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=2, iterations=1)
    return step, time_ms(timed, device, reps=rounds)


_medians: Dict[tuple, float] = {}   # (key..., provider) -> ms of the rows timed in this run


def add_speedups(row: dict, key: tuple, provider: str, providers: Sequence[str], ms: float) -> None:
    """Remember this row's median; for the last of ``providers`` (rca_fast: parametrized last, so
    the others of the same ``key`` ran before it) add ``speedup_vs_<other>`` = other's ms / ms."""
    _medians[tuple(key) + (provider,)] = ms
    if provider != providers[-1]:
        return
    for other in providers[:-1]:
        if tuple(key) + (other,) in _medians:
            row[f"speedup_vs_{other}"] = _medians[tuple(key) + (other,)] / ms


def extra_memory_mb(step: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak device memory one ``step()`` allocates above what was allocated before it, in MiB
    (None on the CPU, where torch keeps no such count)."""
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def _file_tag(device: torch.device) -> str:
    """The device part of a results file name (short, stable: the files already committed)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()}"
    return name.replace(" ", "_").replace("/", "_")


def record(name: str, row: dict, device: torch.device, *, nbytes: Optional[float] = None,
           flops: Optional[float] = None, dtype: str = "fp32") -> dict:
    """Complete ``row`` (which holds at least ``ms``) with GB/s, TFLOP/s, the fractions of the
    measured ceilings and, given both bytes and FLOPs, the roofline (``roofline_ms``, ``bound``,
    ``frac_roofline`` = roofline / measured, 1 = at the device's limit) for work in ``dtype``
    ("fp32" / "bf16"); print it and append it to ``results/<name>-<device>.json``."""
    device = torch.device(device)
    c = ceilings(str(device), dtype)
    ms = row["ms"]
    full = dict(row)
    if nbytes is not None:
        full["bytes"] = int(nbytes)
        full["GBps"] = nbytes / ms / 1e6
        full["frac_copy_bw"] = full["GBps"] / c["copy_GBps"]
    if flops is not None:
        full["flops"] = int(flops)
        full["TFLOPs"] = flops / ms / 1e9
    if nbytes is not None and flops is not None:
        full["roofline_ms"], full["bound"] = _ceilings.roofline_ms(nbytes, flops, c, dtype)
        full["frac_roofline"] = full["roofline_ms"] / ms
    full.update(environment(device), ceilings=c)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in full.items()
                      if k != "ceilings"}))
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}-{_file_tag(device)}.json")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = json.load(f)
    rows.append(full)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    return full
