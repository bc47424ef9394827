"""In-place EMA update of the memory bank at per-class ring pointers."""
from __future__ import annotations

import torch


def slot_plan(ptr: torch.Tensor, target: torch.Tensor, slots: int):
    """Where each row goes: (slot (N,), round (N,), rows per class (L,)).

    Row i of class c is the r-th row of class c in this call (r = its rank among the earlier rows
    of c); it lands on slot ``(ptr[c] + r) % S`` in round ``r // S``.  Inside one round no two rows
    share a (class, slot), so a round can be applied with one indexed write.
    """
    N = target.shape[0]
    L = ptr.shape[0]
    onehot = torch.nn.functional.one_hot(target, L)                        # (N, L)
    rank = (onehot.cumsum(0) - 1).gather(1, target.unsqueeze(1)).squeeze(1)  # earlier rows of c
    slot = (ptr[target] + rank) % slots
    return slot, torch.div(rank, slots, rounding_mode="floor"), onehot.sum(0) if N else ptr * 0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The EMA is computed in float64 for float64 banks, in float32 for every other dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def ema_update_(bank: torch.Tensor, ptr: torch.Tensor, emb: torch.Tensor, target: torch.Tensor, *,
                gamma: float = 0.99) -> torch.Tensor:
    """``bank[c, ptr[c]] = gamma * bank[c, ptr[c]] + (1 - gamma) * emb[i]; ptr[c] += 1`` for each row
    in order, exactly as the sequential loop (same arithmetic, so bit-for-bit equal).

    The arithmetic, which any other backend must reproduce to be bit-exact: with ``cd`` float32
    (float64 for a float64 bank), ``a = cd(gamma)`` and ``b = cd(1 - gamma)`` (``1 - gamma``
    taken in double, then rounded), ``new = (a * cd(old)) + (b * cd(emb[i]))`` as two rounded
    products and a rounded sum (no fused multiply-add), then one rounding to the bank's dtype.
    A bf16 bank therefore sees a single rounding per update, not one per operation.

    Args:
        bank: (L, S, D) float, updated in place.   ptr: (L,) int64, advanced in place.
        emb: (N, D) rows.   target: (N,) int class of each row.
    Returns:
        ``bank``.
    """
    L, S, D = bank.shape
    target = target.long()
    slot, rnd, per_class = slot_plan(ptr, target, S)
    cd = compute_dtype(bank.dtype)
    rows = emb.to(cd)
    n_rounds = int(rnd.max()) + 1 if rnd.numel() else 0
    for r in range(n_rounds):  # one round unless a class has more than S rows in this call
        sel = rnd == r
        c, s = target[sel], slot[sel]
        bank[c, s] = (gamma * bank[c, s].to(cd) + (1 - gamma) * rows[sel]).to(bank.dtype)
    ptr.copy_((ptr + per_class) % S)
    return bank
