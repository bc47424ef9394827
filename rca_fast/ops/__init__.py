"""The public operations of rca_fast (DESIGN §3).

Each function validates its inputs, then runs the backend chosen for the tensors' device by
``rca_fast.ops._dispatch`` (``RCA_FAST_BACKEND=torch|triton|cuda`` forces one).
"""
from ._dispatch import available_backends, backend_for
from .attention import prototype_attention
from .ema import ema_update_
from .kmeans import kmeans
from .map import masked_average_pool
from .nce import bank_nce_loss

__all__ = ["masked_average_pool", "bank_nce_loss", "prototype_attention", "ema_update_", "kmeans",
           "backend_for", "available_backends"]
