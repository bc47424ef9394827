"""Public bank NCE loss with region mixup (DESIGN §3)."""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import _dispatch
from ._validate import (FLOAT_DTYPES, INT_DTYPES, check_dim, check_index, check_positive, check_range,
                        check_tensor)

OP = "bank_nce_loss"


def bank_nce_loss(query: torch.Tensor, bank: torch.Tensor, target: torch.Tensor, *,
                  temperature: float = 0.07, mix_target: Optional[torch.Tensor] = None,
                  mix_weight: Union[float, torch.Tensor, None] = None,
                  reduction: str = "mean") -> torch.Tensor:
    """Region contrast of eq. 4 against the whole memory bank, with optional region mixup.

    Each row ``q`` of class ``c`` is pulled to the S slots of class c and pushed from all slots of
    every other class, with cosine similarity over ``temperature``; the loss averages over the S
    positive slots.  With mixup, a row's loss is ``w * NCE(q, target) + (1 - w) * NCE(q, mix_target)``.
    Computed exactly and stably in log space (the public code clamps its denominator instead).

    Args:
        query: (N, D) float; gradients flow to it.
        bank: (L, S, D) float (fp32 or bf16), a constant: no gradient.
        target: (N,) integer class in [0, L).
        temperature: tau > 0 (paper: 0.07).
        mix_target: optional (N,) integer second class of each mixed row.
        mix_weight: required with ``mix_target``: float or (N,) float tensor in [0, 1].
        reduction: "mean" (scalar) or "none" ((N,)).
    Returns:
        float32 loss (float64 for float64 inputs).
    """
    check_tensor(OP, "query", query, ndim=(2,), layout="(N, D)", dtypes=FLOAT_DTYPES)
    dev = query.device
    check_tensor(OP, "bank", bank, ndim=(3,), layout="(L, S, D)", dtypes=FLOAT_DTYPES, device=dev)
    check_dim(OP, "bank", bank, 2, query.shape[1], "feature size D of query")
    L = bank.shape[0]
    if bank.shape[1] == 0 or L == 0:
        raise ValueError(f"{OP}: bank must have at least one class and one slot, got shape "
                         f"{tuple(bank.shape)}")
    check_tensor(OP, "target", target, ndim=(1,), layout="(N,)", dtypes=INT_DTYPES, device=dev)
    check_dim(OP, "target", target, 0, query.shape[0], "row count N of query")
    check_index(OP, "target", target, L)
    check_positive(OP, "temperature", temperature)
    if reduction not in ("mean", "none"):
        raise ValueError(f"{OP}: reduction must be 'mean' or 'none', got {reduction!r}")
    if query.shape[0] == 0 and reduction == "mean":
        raise ValueError(f"{OP}: query must have at least one row for reduction='mean', got shape "
                         f"{tuple(query.shape)}")
    if (mix_target is None) != (mix_weight is None):
        raise ValueError(f"{OP}: mix_target and mix_weight must be given together, got "
                         f"mix_target={'None' if mix_target is None else 'tensor'}, "
                         f"mix_weight={'None' if mix_weight is None else type(mix_weight).__name__}")
    if mix_target is not None:
        check_tensor(OP, "mix_target", mix_target, ndim=(1,), layout="(N,)", dtypes=INT_DTYPES, device=dev)
        check_dim(OP, "mix_target", mix_target, 0, query.shape[0], "row count N of query")
        check_index(OP, "mix_target", mix_target, L)
        if isinstance(mix_weight, torch.Tensor):
            check_tensor(OP, "mix_weight", mix_weight, ndim=(0, 1), layout="() or (N,)",
                         dtypes=FLOAT_DTYPES, device=dev)
            if mix_weight.dim() == 1:
                check_dim(OP, "mix_weight", mix_weight, 0, query.shape[0], "row count N of query")
            check_range(OP, "mix_weight", mix_weight, 0.0, 1.0)   # no host sync on a GPU (_validate)
        elif isinstance(mix_weight, (int, float)) and not isinstance(mix_weight, bool):
            if not 0.0 <= float(mix_weight) <= 1.0:
                raise ValueError(f"{OP}: mix_weight must lie in [0, 1], got values in "
                                 f"[{float(mix_weight)}, {float(mix_weight)}]")
        else:
            raise TypeError(f"{OP}: mix_weight must be a float or a tensor, got {type(mix_weight).__name__}")
    return _dispatch.implementation(OP, dev, (query.dtype, bank.dtype))(
        query, bank, target, temperature=float(temperature), mix_target=mix_target,
        mix_weight=mix_weight, reduction=reduction)
