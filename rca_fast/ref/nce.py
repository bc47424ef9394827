"""Bank NCE with region mixup, eq. 4 of the paper, against the whole memory bank.

For a query q of class c, with s = cos(q, m) / tau for every bank slot m:

    NCE(q, c) = mean over slots j of class c of  -log( e^{s_cj} / (e^{s_cj} + sum_{l != c, i} e^{s_li}) )
              = mean_j [ logaddexp(s_cj, logNeg_c) - s_cj ],   logNeg_c = logsumexp_{l != c, i} s_li

computed exactly and stably in log space (the public code clamps the denominator at 1e-4 after
subtracting the row max; we do not).  With mixup the loss of a row is
``w * NCE(q, target) + (1 - w) * NCE(q, mix_target)``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

EPS = 1e-12  # norm floor of F.normalize: a zero query or slot has similarity 0, never NaN


def class_nce(logits: torch.Tensor, class_lse: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row NCE given all logits (N, L, S) and the per-class logsumexp (N, L)."""
    N, L, S = logits.shape
    rows = torch.arange(N, device=logits.device)
    pos = logits[rows, target]                                            # (N, S)
    if L == 1:  # no negative slots at all: each term is -log(e^s / e^s) = 0
        return pos.sum(-1) * 0
    neg_lse = class_lse.masked_fill(F.one_hot(target, L).bool(), float("-inf")).logsumexp(-1)  # (N,)
    return (torch.logaddexp(pos, neg_lse.unsqueeze(-1)) - pos).mean(-1)


def bank_nce_loss(query: torch.Tensor, bank: torch.Tensor, target: torch.Tensor, *,
                  temperature: float = 0.07, mix_target: Optional[torch.Tensor] = None,
                  mix_weight: Union[float, torch.Tensor, None] = None,
                  reduction: str = "mean") -> torch.Tensor:
    """Eq. 4 (with optional region mixup) of each query row against the whole bank.

    Args:
        query: (N, D) float, differentiable.
        bank: (L, S, D) float; treated as a constant (the memory bank is a buffer).
        target: (N,) int class of each row.
        temperature: tau > 0.
        mix_target: optional (N,) int second class of each (mixed) row.
        mix_weight: with ``mix_target``, the weight w of ``target``: float or (N,) tensor.
        reduction: "mean" -> scalar, "none" -> (N,).
    Returns:
        the loss in float32 (float64 for float64 inputs).
    """
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    q = F.normalize(query.to(acc), dim=-1, eps=EPS)
    L, S, D = bank.shape
    m = bank.detach().reshape(L * S, D).to(acc)
    # cos(q, m) = (q_hat . m) / max(|m|, EPS), as F.normalize: the slot norms scale the (N, L*S)
    # logits instead of dividing the whole (L*S, D) bank, which would write a normalised copy
    # of the bank (20 MB at the public sizes) on every call.
    inv_norm = m.norm(dim=-1).clamp(min=EPS).reciprocal()                   # (L*S,)
    logits = ((q @ m.t()) * (inv_norm / temperature)).reshape(-1, L, S)    # (N, L, S): N x L*S
    class_lse = logits.logsumexp(-1)                                          # (N, L)
    loss = class_nce(logits, class_lse, target.long())
    if mix_target is not None:
        w = torch.as_tensor(mix_weight, dtype=acc, device=query.device)
        loss = w * loss + (1 - w) * class_nce(logits, class_lse, mix_target.long())
    if reduction == "mean":
        return loss.mean()
    return loss
