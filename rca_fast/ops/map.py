"""Public masked average pooling (DESIGN §3)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _dispatch
from ._validate import FLOAT_DTYPES, INT_DTYPES, check_dim, check_tensor, check_true

OP = "masked_average_pool"


def masked_average_pool(features: torch.Tensor, cams: torch.Tensor,
                        labels: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean feature under each class's region mask ``cams[b, l] > mean(cams[b, l])`` (eq. 2).

    Args:
        features: (B, D, H, W) float; gradients flow to it.
        cams: (B, L, H, W) float activation maps on the same device (no gradient).
        labels: optional (B, L) bool or 0/1 integer: compute only the present (b, l) pairs
            (several times less work); the other pairs are returned as 0.
    Returns:
        emb (B, L, D) in ``features.dtype``: the masked mean, 0 where the mask is empty or the
        class is absent (never NaN); count (B, L) int64: pixels under the mask.
    """
    check_tensor(OP, "features", features, ndim=(4,), layout="(B, D, H, W)", dtypes=FLOAT_DTYPES)
    dev = features.device
    check_tensor(OP, "cams", cams, ndim=(4,), layout="(B, L, H, W)", dtypes=FLOAT_DTYPES, device=dev)
    B, D, H, W = features.shape
    check_dim(OP, "cams", cams, 0, B, "batch size B of features")
    if tuple(cams.shape[2:]) != (H, W):
        raise ValueError(f"{OP}: cams must have the spatial size (H, W) = ({H}, {W}) of features, "
                         f"got shape {tuple(cams.shape)}")
    if labels is not None:
        check_tensor(OP, "labels", labels, ndim=(2,), layout="(B, L)",
                     dtypes=(torch.bool,) + INT_DTYPES + FLOAT_DTYPES, device=dev)
        if tuple(labels.shape) != tuple(cams.shape[:2]):
            raise ValueError(f"{OP}: labels must have shape (B, L) = {tuple(cams.shape[:2])}, "
                             f"got {tuple(labels.shape)}")
        if labels.dtype != torch.bool:
            check_true(OP, "labels", (labels == 0) | (labels == 1), "must be bool or 0/1, got other values")
            labels = labels != 0
    return _dispatch.implementation(OP, dev, (features.dtype,))(features, cams, labels)
