"""Public prototype attention (DESIGN §3)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _dispatch
from ._validate import FLOAT_DTYPES, check_dim, check_nonempty, check_positive, check_tensor

OP = "prototype_attention"


def prototype_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                        scale: Optional[float] = None) -> torch.Tensor:
    """``softmax(scale * query @ key.T) @ value``: each of the N queries of every image attends over
    the same P prototypes (regional semantic aggregation).

    Args:
        query: (B, N, D) float.   key: (P, D).   value: (P, Dv).  All differentiable, one dtype.
        scale: finite positive number multiplying the scores; defaults to 1/sqrt(D).
    Returns:
        (B, N, Dv) in the inputs' dtype.
    """
    check_tensor(OP, "query", query, ndim=(3,), layout="(B, N, D)", dtypes=FLOAT_DTYPES)
    dev = query.device
    check_tensor(OP, "key", key, ndim=(2,), layout="(P, D)", dtypes=(query.dtype,), device=dev)
    check_tensor(OP, "value", value, ndim=(2,), layout="(P, Dv)", dtypes=(query.dtype,), device=dev)
    check_dim(OP, "key", key, 1, query.shape[2], "feature size D of query")
    check_dim(OP, "value", value, 0, key.shape[0], "prototype count P of key")
    check_nonempty(OP, "key", key)
    if scale is not None:
        check_positive(OP, "scale", scale)
        if not math.isfinite(scale):  # inf * a zero score is NaN, and softmax of several infs is NaN
            raise ValueError(f"{OP}: scale must be finite, got {scale}")
    return _dispatch.implementation(OP, dev, (query.dtype,))(query, key, value, scale=scale)
