"""Plain-PyTorch reference of every rca_fast op.

These functions are the oracle the kernels are tested against, the CPU path of ``rca_fast.ops``
and the baseline of the benchmarks.  They are vectorised (no Python loop per region, image, class
or bank slot) but make no attempt at fusion: the NCE, for instance, materialises the full
N x (L*S) similarity matrix.  They do not validate their inputs (``rca_fast.ops`` does) and must
never import ``rca_fast.ops`` or ``rca_fast.kernels``.
"""
from .attention import prototype_attention
from .ema import ema_update_
from .kmeans import kmeans
from .map import masked_average_pool
from .nce import bank_nce_loss

__all__ = ["masked_average_pool", "bank_nce_loss", "prototype_attention", "ema_update_", "kmeans"]
