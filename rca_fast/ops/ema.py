"""Public in-place EMA update of the memory bank (DESIGN §3)."""
from __future__ import annotations

import torch

from . import _dispatch
from ._validate import FLOAT_DTYPES, INT_DTYPES, check_dim, check_finite, check_index, check_tensor

OP = "ema_update_"


def ema_update_(bank: torch.Tensor, ptr: torch.Tensor, emb: torch.Tensor, target: torch.Tensor, *,
                gamma: float = 0.99) -> torch.Tensor:
    """Write each row into its class's ring of slots with an exponential moving average, in place.

    For each row i in order: ``c = target[i]; bank[c, ptr[c]] = gamma * bank[c, ptr[c]] +
    (1 - gamma) * emb[i]; ptr[c] = (ptr[c] + 1) % S`` -- exactly the sequential loop, also when a
    class has several rows (consecutive slots) or more than S rows (slots revisited in order).
    The arithmetic is float32 (float64 for a float64 bank) with one rounding to the bank's dtype
    per update; ``rca_fast.ref.ema`` spells it out for bit-exact backends.

    Args:
        bank: (L, S, D) float buffer, updated in place.
        ptr: (L,) int64 ring pointers, advanced in place.
        emb: (N, D) float rows (finite).   target: (N,) integer classes in [0, L).
        gamma: momentum in [0, 1].
    Returns:
        ``bank``.
    """
    check_tensor(OP, "bank", bank, ndim=(3,), layout="(L, S, D)", dtypes=FLOAT_DTYPES)
    dev = bank.device
    L, S, D = bank.shape
    check_tensor(OP, "ptr", ptr, ndim=(1,), layout="(L,)", dtypes=(torch.int64,), device=dev)
    check_dim(OP, "ptr", ptr, 0, L, "class count L of bank")
    check_tensor(OP, "emb", emb, ndim=(2,), layout="(N, D)", dtypes=FLOAT_DTYPES, device=dev)
    check_dim(OP, "emb", emb, 1, D, "feature size D of bank")
    check_tensor(OP, "target", target, ndim=(1,), layout="(N,)", dtypes=INT_DTYPES, device=dev)
    check_dim(OP, "target", target, 0, emb.shape[0], "row count N of emb")
    check_index(OP, "target", target, L)
    check_index(OP, "ptr", ptr, S)
    check_finite(OP, "emb", emb)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"{OP}: gamma must be a float in [0, 1], got {type(gamma).__name__}")
    if not 0.0 <= gamma <= 1.0:  # also rejects NaN
        raise ValueError(f"{OP}: gamma must be a float in [0, 1], got {gamma!r}")
    if bank.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{OP}: bank must be a buffer (requires_grad=False); an in-place update of "
                         "a tensor that requires grad breaks autograd")
    if not bank.is_contiguous():
        raise ValueError(f"{OP}: bank must be contiguous (it is updated in place), got strides "
                         f"{bank.stride()}")
    if emb.shape[0] == 0:
        return bank
    if emb.untyped_storage().data_ptr() == bank.untyped_storage().data_ptr():
        # rows that are views of the bank itself (e.g. bank[c, :2]): every backend reads them as
        # they were before the call (the one-launch kernels would race with their own writes)
        emb = emb.clone()
    run = _dispatch.implementation(OP, dev, (bank.dtype, emb.dtype))
    return run(bank, ptr, emb, target, gamma=float(gamma))
