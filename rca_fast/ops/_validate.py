"""Input checks shared by the public ops.

Every message names the op, the argument, what was expected and what was given, so a user
never meets an opaque kernel failure or a silent NaN instead.
"""
from __future__ import annotations

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
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
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


def check_finite(op: str, name: str, t: torch.Tensor) -> None:
    """Reject NaN/Inf inputs (a cheap reduction; keeps NaN from spreading into the bank)."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{op}: {name} contains NaN or Inf")


def check_index(op: str, name: str, t: torch.Tensor, high: int) -> None:
    """Raise ValueError unless every entry of the integer tensor ``t`` is in [0, high)."""
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= high):
        raise ValueError(f"{op}: {name} entries must be in [0, {high}), "
                         f"got values in [{int(t.min())}, {int(t.max())}]")


def check_positive(op: str, name: str, value, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    if not (value >= 0 if allow_zero else value > 0) or value != value:
        raise ValueError(f"{op}: {name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
