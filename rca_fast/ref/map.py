"""Masked average pooling (MAP), eq. 2 of the paper: the mean feature under each class's mask."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def region_masks(cams: torch.Tensor) -> torch.Tensor:
    """(..., H, W) activation maps -> bool masks ``cam > spatial mean of cam``.

    The comparison is made in float64 on the map minus its first pixel: a mean taken in the
    map's own precision rounds, and on a constant map it lands below the constant about a third
    of the time in float32, which would turn "no region" into "every pixel".  Shifting by a pixel
    of the map makes a constant map exactly 0 (empty mask) for every input dtype, and the float64
    difference of two float32/16 values is exact, so the shift changes nothing else.
    """
    x = cams.to(torch.float64)
    x = x - x[..., :1, :1]
    return x > x.mean(dim=(-2, -1), keepdim=True)


def pooled_sums(flat: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B, D, HW) features, (B, M, HW) 0/1 masks -> (B, M, D) sums of the features under each mask.

    Computed as ``flat @ masks^T`` and transposed (a view): autograd's gradient for ``flat`` is
    then ``grad^T @ masks``, produced directly in the (B, D, HW) layout of the features.  The
    other orientation (``masks @ flat^T``) yields a (B, HW, D) gradient that autograd must copy
    into the features' layout -- a transposing copy of the whole feature map that cost more than
    the rest of the op at the public sizes (B=8, D=512, 46x46) on CPU.
    """
    return torch.bmm(flat, masks.transpose(1, 2)).transpose(1, 2)


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
    Sums are accumulated in float32 for half-precision features (float64 for float64), and the
    counts are integer sums of the bool masks (a bf16 sum is not exact past 256 pixels).
    """
    B, D, H, W = features.shape
    L = cams.shape[1]
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    flat = features.reshape(B, D, H * W).to(acc)
    if labels is None:
        masks = region_masks(cams).reshape(B, L, H * W)
        count = masks.sum(-1)                                              # int64, exact
        sums = pooled_sums(flat, masks.to(acc))                            # (B, L, D)
        emb = sums / count.clamp(min=1).unsqueeze(-1).to(acc)
        return emb.to(features.dtype), count
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
             & valid.unsqueeze(-1))
    cnt = masks.sum(-1)                                                    # int64, exact
    sums = pooled_sums(flat, masks.to(acc))                                # (B, Lp, D)
    vals = (sums / cnt.clamp(min=1).unsqueeze(-1).to(acc)).to(features.dtype)
    # Padding columns are all-zero, so scattering with "add" leaves absent classes at 0.
    emb = emb.scatter_add(1, order.unsqueeze(-1).expand(B, Lp, D), vals)
    count = count.scatter_add(1, order, cnt)
    return emb, count
