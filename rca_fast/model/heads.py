"""Heads of the RCA network (DESIGN §2): CAM heads, the contrast projector, prototype aggregation.

Shapes: features F (B, D, h, w); CAMs (B, L, h, w); prototypes (L, K, D).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops

AGGREGATIONS = ("softmax", "linear", "none")


class CAMHead(nn.Module):
    """3 x (conv3x3 + ReLU) + conv1x1 -> ``num_classes`` maps: the coarse CAM head P (and the
    shared final head O when ``shared_final_head=True``).

    Args:
        in_channels: D.  width: channels of the three 3x3 convs (512 in the public code).
        num_classes: L output maps.
    """

    def __init__(self, in_channels: int, width: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, L, h, w)."""
        return self.classifier(self.body(features))


class PerClassCAMHead(nn.Module):
    """L independent branches, each 3 x (conv3x3 + ReLU) + conv1x1 -> 1 map, as the public code's
    final CAM head -- run as ONE network instead of L: the first conv of every branch reads the
    same input, so the L first convs stack into one conv D -> L*width; the later convs are grouped
    convs (groups = L), which keep the branches independent.

    Branch l owns output channels [l*width, (l+1)*width) of every conv and map l of the last one;
    each grouped conv has the fan-in of one branch, so the default initialisation is that of L
    separate heads.
    """

    def __init__(self, in_channels: int, width: int, num_classes: int):
        super().__init__()
        L, W = num_classes, width
        self.num_classes, self.width = L, W
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, L * W, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(L * W, L * W, 3, padding=1, groups=L), nn.ReLU(inplace=True),
            nn.Conv2d(L * W, L * W, 3, padding=1, groups=L), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(L * W, L, 1, groups=L)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, L, h, w): map l comes from branch l only."""
        return self.classifier(self.body(features))


class Projector(nn.Module):
    """conv3x3 + BN + ReLU + conv3x3 on the backbone features: the contrast-query features."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, D, h, w)."""
        return self.net(features)


class PrototypeAggregation(nn.Module):
    """Regional semantic aggregation: every pixel attends over the L*K class prototypes of the bank.

    query = conv1x1(F) (B, hw, D); key, value = Linear(prototypes) (L*K, D);
    context = attention(query, key, value) -> conv1x1 -> concatenated with F -> conv1x1 back to D.

    ``mode``:
      * ``"softmax"`` (the paper, default): ``rca_fast.ops.prototype_attention``, i.e.
        softmax(q k^T / sqrt(D)) v (the 1/sqrt(D) temperature keeps the softmax out of saturation
        for unnormalised 512-d features).
      * ``"linear"`` (the public code): no softmax; the scores are scaled by 2 / (K*L) (2/(K*20)
        for VOC) and multiply v directly: context = (q k^T) * 2/(K*L) @ v.
      * ``"none"``: no aggregation, F passes through unchanged (ablation).
    """

    def __init__(self, channels: int, mode: str = "softmax"):
        super().__init__()
        if mode not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")
        self.mode = mode
        if mode == "none":
            return
        D = channels
        self.query = nn.Conv2d(D, D, 1)
        self.key = nn.Linear(D, D)
        self.value = nn.Linear(D, D)
        self.out = nn.Conv2d(D, D, 1)
        self.fuse = nn.Conv2d(2 * D, D, 1)

    def forward(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """F (B, D, h, w), prototypes (L, K, D) (a buffer: no gradient) -> F-hat (B, D, h, w)."""
        if self.mode == "none":
            return features
        B, D, h, w = features.shape
        if prototypes.dim() != 3 or prototypes.shape[-1] != D:
            raise ValueError(f"PrototypeAggregation: prototypes must be (L, K, {D}), got {tuple(prototypes.shape)}")
        protos = prototypes.detach().reshape(-1, D).to(features.dtype)        # (P = L*K, D)
        key, value = self.key(protos), self.value(protos)
        query = self.query(features).flatten(2).transpose(1, 2)                # (B, hw, D)
        if self.mode == "softmax":
            context = ops.prototype_attention(query, key, value)
        else:
            context = torch.matmul(torch.matmul(query, key.t()) * (2.0 / protos.shape[0]), value)
        context = context.transpose(1, 2).reshape(B, D, h, w)
        return self.fuse(torch.cat([features, self.out(context)], dim=1))
