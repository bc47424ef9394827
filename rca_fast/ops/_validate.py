"""Input checks shared by the public ops.

Every message names the op, the argument, what was expected and what was given, so a user
never meets an opaque kernel failure or a silent NaN instead.

Value checks (index ranges, finiteness, weight ranges, 0/1 labels) read tensor values, and on a
GPU reading a value on the host waits for the device: several stalls per op call, every training
step.  So they depend on where the tensor lives:

* CPU tensors, or any tensor when ``RCA_FAST_CHECK_VALUES=1``: full checks on the host, raising a
  ValueError that names the argument and the values found;
* CUDA tensors otherwise: the same conditions as device-side asserts (``torch._assert_async``), which
  never block the host; a violation stops the process at a later CUDA call with the same message
  (a device assert cannot be caught: rerun with ``RCA_FAST_CHECK_VALUES=1`` for the ValueError);
* other devices (meta / fake tensors while tracing): no value checks.
Shape, dtype and device checks read no values and run everywhere.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(op: str, name: str, t, *, ndim: Optional[Sequence[int]] = None,
                 layout: str = "", dtypes: Optional[Sequence[torch.dtype]] = None,
                 device: Optional[torch.device] = None) -> None:
    """Raise TypeError/ValueError unless ``t`` is a tensor of the given rank, dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor{' ' + layout if layout else ''}, "
                        f"got {type(t).__name__}")
    if ndim is not None and t.dim() not in tuple(ndim):
        want = " or ".join(f"{n}-D" for n in ndim)
        raise ValueError(f"{op}: {name} must be a {want} tensor {layout}, got shape {_shape(t)}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        got = str(t.dtype).replace("torch.", "")
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {got}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} must be on {device} like the other inputs, got {t.device}")


def check_dim(op: str, name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    """Raise ValueError unless ``t.shape[dim] == expected`` (``what`` names the size)."""
    if t.shape[dim] != expected:
        raise ValueError(f"{op}: {name} must have {what} = {expected} at dim {dim}, "
                         f"got shape {_shape(t)}")


def check_nonempty(op: str, name: str, t: torch.Tensor) -> None:
    if t.numel() == 0:
        raise ValueError(f"{op}: {name} must not be empty, got shape {_shape(t)}")


CHECK_VALUES_ENV = "RCA_FAST_CHECK_VALUES"


def host_value_checks(t: torch.Tensor) -> bool:
    """Whether ``t``'s values are checked on the host (CPU tensors, or RCA_FAST_CHECK_VALUES=1)."""
    if os.environ.get(CHECK_VALUES_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return t.device.type == "cpu"


def _device_assert(ok: torch.Tensor, message: str) -> None:
    """``ok`` (a 0-d bool tensor) asserted on the device, without a host synchronisation."""
    if ok.device.type != "cuda":
        return                       # meta / fake tensors (tracing): nothing to check
    try:
        torch._assert_async(ok, message)
    except TypeError:                # a torch whose _assert_async takes no message
        torch._assert_async(ok)


def check_true(op: str, name: str, ok: torch.Tensor, message: str) -> None:
    """Raise ValueError ``f"{op}: {name} {message}"`` unless every entry of the bool tensor ``ok``
    is true (host check or device assert, see the module note)."""
    if ok.numel() == 0:
        return
    if host_value_checks(ok):
        if not bool(ok.all()):
            raise ValueError(f"{op}: {name} {message}")
    else:
        _device_assert(ok.all(), f"{op}: {name} {message}")


def check_finite(op: str, name: str, t: torch.Tensor) -> None:
    """Reject NaN/Inf inputs (a cheap reduction; keeps NaN from spreading into the bank)."""
    if not t.is_floating_point() or not t.numel():
        return
    if host_value_checks(t):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{op}: {name} contains NaN or Inf")
    else:
        _device_assert(torch.isfinite(t).all(), f"{op}: {name} contains NaN or Inf")


def check_index(op: str, name: str, t: torch.Tensor, high: int) -> None:
    """Raise ValueError unless every entry of the integer tensor ``t`` is in [0, high)."""
    if not t.numel():
        return
    if host_value_checks(t):
        if int(t.min()) < 0 or int(t.max()) >= high:
            raise ValueError(f"{op}: {name} entries must be in [0, {high}), "
                             f"got values in [{int(t.min())}, {int(t.max())}]")
    else:
        _device_assert(((t >= 0) & (t < high)).all(), f"{op}: {name} entries must be in [0, {high})")


def check_range(op: str, name: str, t: torch.Tensor, lo: float, hi: float) -> None:
    """Raise ValueError unless every entry of ``t`` lies in [lo, hi] (NaN does not)."""
    if not t.numel():
        return
    if host_value_checks(t):
        t_lo, t_hi = float(t.min()), float(t.max())
        if not (lo <= t_lo and t_hi <= hi) or bool(torch.isnan(t).any()):
            raise ValueError(f"{op}: {name} must lie in [{lo}, {hi}], got values in [{t_lo}, {t_hi}]")
    else:
        _device_assert(((t >= lo) & (t <= hi)).all(), f"{op}: {name} must lie in [{lo}, {hi}]")


def check_positive(op: str, name: str, value, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    if not (value >= 0 if allow_zero else value > 0) or value != value:
        raise ValueError(f"{op}: {name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
