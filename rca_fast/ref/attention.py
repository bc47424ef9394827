"""Prototype attention: every pixel feature attends over all L*K prototypes."""
from __future__ import annotations

from typing import Optional

import torch


def prototype_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                        scale: Optional[float] = None) -> torch.Tensor:
    """softmax(scale * q k^T) v over the P prototypes, keys and values shared by the batch.

    Args:
        query: (B, N, D).  key: (P, D).  value: (P, Dv).
        scale: defaults to 1/sqrt(D).
    Returns:
        (B, N, Dv) in the query's dtype (softmax in at least float32).
    """
    D = query.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    scores = torch.matmul(query, key.t()).to(acc) * scale                  # (B, N, P)
    probs = scores.softmax(-1).to(value.dtype)
    return torch.matmul(probs, value).to(query.dtype)
