"""Masked average pooling (MAP), eq. 2 of the paper: the mean feature under each class's mask."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def region_masks(cams: torch.Tensor) -> torch.Tensor:
    """(..., H, W) activation maps -> bool masks ``cam > spatial mean of cam``."""
    return cams > cams.mean(dim=(-2, -1), keepdim=True)


def masked_average_pool(features: torch.Tensor, cams: torch.Tensor,
                        labels: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``features`` under ``cams[b, l] > mean(cams[b, l])``.

    Args:
        features: (B, D, H, W) float.
        cams: (B, L, H, W) float.
        labels: optional (B, L) bool/0-1; only the present (b, l) pairs are computed.
    Returns:
        emb (B, L, D) in ``features.dtype`` (0 for absent pairs and empty masks) and
        count (B, L) int64 (mask pixels; 0 for absent pairs).
    """
    B, D, H, W = features.shape
    L = cams.shape[1]
    flat = features.reshape(B, D, H * W)
    if labels is None:
        masks = region_masks(cams).reshape(B, L, H * W).to(features.dtype)
        sums = torch.bmm(masks, flat.transpose(1, 2))                      # (B, L, D)
        count = masks.sum(-1).round().long()                              # exact: <= 2^24 pixels
        emb = sums / count.clamp(min=1).unsqueeze(-1).to(features.dtype)
        return emb, count
    # Only the present classes: pack each image's present classes into Lp <= L columns
    # (Lp = most present classes in one image), pool those with one bmm, scatter back.
    present = labels.bool()
    per_image = present.sum(1)
    Lp = int(per_image.max()) if B else 0
    emb = features.new_zeros(B, L, D)
    count = torch.zeros(B, L, dtype=torch.long, device=features.device)
    if Lp == 0:
        return emb, count
    # Column j of image b holds its j-th present class; the columns past its count hold absent
    # classes and are masked out, so each row of ``order`` is a set of distinct classes.
    order = torch.sort((~present).to(torch.int8), dim=1, stable=True).indices[:, :Lp]   # (B, Lp)
    valid = torch.arange(Lp, device=features.device).unsqueeze(0) < per_image.unsqueeze(1)
    picked = torch.gather(cams.reshape(B, L, H * W), 1, order.unsqueeze(-1).expand(B, Lp, H * W))
    masks = (region_masks(picked.reshape(B, Lp, H, W)).reshape(B, Lp, H * W)
             & valid.unsqueeze(-1)).to(features.dtype)
    sums = torch.bmm(masks, flat.transpose(1, 2))                          # (B, Lp, D)
    cnt = masks.sum(-1).round().long()
    vals = sums / cnt.clamp(min=1).unsqueeze(-1).to(features.dtype)
    # Padding columns are all-zero, so scattering with "add" leaves absent classes at 0.
    emb = emb.scatter_add(1, order.unsqueeze(-1).expand(B, Lp, D), vals)
    count = count.scatter_add(1, order, cnt)
    return emb, count
