"""Timing with device synchronisation, and the facts that name a run (device, versions, commit).

On a GPU every call is bracketed by CUDA events and the L2 cache is flushed before each call
(a 256 MiB write, outside the events), so repeated calls over one buffer do not measure the cache;
on the CPU a host clock brackets each call.  The first call is timed on its own (it holds
compilation, autotuning and module loading), then warm-up calls, then many timed calls whose
median is the result.  Nothing here imports benchmarks/: the benchmark harness could reuse it.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

L2_FLUSH_BYTES = 256 << 20   # larger than the L2 of every current GPU (H100: 50 MiB)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Milliseconds per call: median, fastest, 20th and 80th percentile, of ``reps`` timed calls
    after warm-up; ``first_ms`` is the very first call (compilation, autotuning, caches)."""
    ms: float
    min_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    first_ms: float

    def as_dict(self) -> dict:
        return asdict(self)


def _quantile(sorted_values, q: float) -> float:
    idx = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return float(sorted_values[idx])


class Timer:
    """Times callables on one device.

    Args:
        device: where the work runs.
        warmup: calls after the first one, untimed, before measuring.
        min_reps / max_reps: bounds on the timed calls.
        budget_ms: the timed calls aim at about this much time in total (between the bounds).
        flush_l2: flush the GPU's L2 before every timed call (ignored on the CPU).
    """

    def __init__(self, device: torch.device, *, warmup: int = 3, min_reps: int = 10,
                 max_reps: int = 500, budget_ms: float = 300.0, flush_l2: bool = True):
        if min_reps < 1 or max_reps < min_reps:
            raise ValueError(f"Timer: need 1 <= min_reps <= max_reps, got {min_reps}, {max_reps}")
        if warmup < 0:
            raise ValueError(f"Timer: warmup must be >= 0, got {warmup}")
        self.device = torch.device(device)
        self.warmup, self.min_reps, self.max_reps, self.budget_ms = warmup, min_reps, max_reps, budget_ms
        self._flush_buf: Optional[torch.Tensor] = None
        if self.device.type == "cuda" and flush_l2:
            self._flush_buf = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=self.device)

    def _once_ms(self, fn: Callable, setup: Optional[Callable[[], object]]) -> float:
        state = setup() if setup is not None else None
        call = (lambda: fn(state)) if setup is not None else fn
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            stream = torch.cuda.current_stream(self.device)  # not the current device's (cuda:N)
            start.record(stream)
            call()
            end.record(stream)
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        call()
        return (time.perf_counter() - t0) * 1e3

    def time(self, fn: Callable, setup: Optional[Callable[[], object]] = None) -> Timing:
        """Time ``fn()`` -- or ``fn(setup())`` when ``setup`` is given: ``setup`` runs before every
        call, outside the timed region (e.g. the forward pass whose backward ``fn`` times)."""
        sync(self.device)
        first = self._once_ms(fn, setup)
        estimates = [self._once_ms(fn, setup) for _ in range(self.warmup)]
        est = max(min(estimates) if estimates else first, 1e-3)
        reps = int(min(self.max_reps, max(self.min_reps, self.budget_ms // est)))
        if self.device.type == "cuda":
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            stream = torch.cuda.current_stream(self.device)
            for s, e in zip(starts, ends):
                state = setup() if setup is not None else None
                if self._flush_buf is not None:
                    self._flush_buf.zero_()
                s.record(stream)
                fn(state) if setup is not None else fn()
                e.record(stream)
                del state  # a forward graph per call: free it before the next one is built
            torch.cuda.synchronize(self.device)
            times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        else:
            times = [self._once_ms(fn, setup) for _ in range(reps)]
        times.sort()
        return Timing(ms=float(statistics.median(times)), min_ms=float(times[0]),
                      p20_ms=_quantile(times, 0.2), p80_ms=_quantile(times, 0.8), reps=reps,
                      first_ms=float(first))


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with its core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:  # Linux names the model in /proc/cpuinfo; platform.processor() is often empty there
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} (CPU x{os.cpu_count()}, {torch.get_num_threads()} torch threads)"


def git_commit() -> str:
    """The commit of the source tree rca_fast runs from ('unknown' outside a git checkout);
    '+dirty' when it has uncommitted changes to tracked files."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=root, text=True,
                                      stderr=subprocess.DEVNULL, timeout=10).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=root,
                               stderr=subprocess.DEVNULL, timeout=10).returncode != 0
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def environment(device: torch.device) -> dict:
    """Device name, torch / Triton / CUDA versions and git commit, for the JSON outputs."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {"device": device_name(device), "device_type": torch.device(device).type,
            "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "python": platform.python_version(), "git_commit": git_commit()}
