"""Plain-PyTorch reference of every rca_fast op.

These functions are the oracle the kernels are tested against, the CPU path of ``rca_fast.ops``
and the baseline of the benchmarks.  They are vectorised (no Python loop per region, image, class
or bank slot) but make no attempt at fusion: the NCE, for instance, materialises the full
N x (L*S) similarity matrix.  They do not validate their inputs (``rca_fast.ops`` does) and must
never import ``rca_fast.ops`` or ``rca_fast.kernels``.

``supports`` is what this backend (``torch`` in ``rca_fast.ops``) says it can run: everything.
"""
from typing import Optional, Sequence

import torch

from .attention import prototype_attention
from .ema import ema_update_
from .kmeans import kmeans
from .map import masked_average_pool
from .nce import bank_nce_loss


def supports(op: str, device: torch.device, dtypes: Sequence[torch.dtype]) -> Optional[str]:
    """None: the reference runs every op on every device in every float dtype (float64 natively)."""
    return None


__all__ = ["masked_average_pool", "bank_nce_loss", "prototype_attention", "ema_update_", "kmeans", "supports"]
