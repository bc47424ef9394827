"""Heads of the RCA network (DESIGN §2): CAM heads, the contrast projector, prototype aggregation.

Shapes: features F (B, D, h, w); CAMs (B, L, h, w); prototypes (L, K, D).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops

AGGREGATIONS = ("softmax", "linear", "none")
# softmax temperature: 1/sqrt(D), 1, a learned scalar (init 1/sqrt(D))
ATTENTION_SCALES = ("sqrt", "one", "learned")


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
        softmax(scale * q k^T) v with ``scale`` from ``attention_scale``: ``"sqrt"`` 1/sqrt(D)
        (default: keeps the softmax out of saturation for unnormalised 512-d features; the paper
        writes no scale), ``"one"`` 1 (the paper's formula), ``"learned"`` a trained scalar
        (log-parametrised, starts at 1/sqrt(D)).
      * ``"linear"`` (the public code): no softmax; the public code computes
        ``matmul(q, k^T) / K * 20`` with K the prototypes per class, which Python evaluates left
        to right: scores x 20/K (x 2 at K = 10), multiplying v directly.
      * ``"none"``: no aggregation, F passes through unchanged (ablation).
    """

    def __init__(self, channels: int, mode: str = "softmax", attention_scale: str = "sqrt"):
        super().__init__()
        if mode not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")
        if attention_scale not in ATTENTION_SCALES:
            raise ValueError(f"attention_scale must be one of {ATTENTION_SCALES}, got {attention_scale!r}")
        self.mode = mode
        self.attention_scale = attention_scale
        if mode == "none":
            return
        D = channels
        self.query = nn.Conv2d(D, D, 1)
        self.key = nn.Linear(D, D)
        self.value = nn.Linear(D, D)
        self.out = nn.Conv2d(D, D, 1)
        self.fuse = nn.Conv2d(2 * D, D, 1)
        if mode == "softmax" and attention_scale == "learned":
            self.log_scale = nn.Parameter(torch.tensor(-0.5 * math.log(D)))

    def scale(self, dim: int):
        """The softmax temperature: a float, or a 0-d tensor (learned)."""
        if self.attention_scale == "learned":
            return self.log_scale.exp()
        return 1.0 if self.attention_scale == "one" else dim ** -0.5

    def forward(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """F (B, D, h, w), prototypes (L, K, D) (a buffer: no gradient) -> F-hat (B, D, h, w)."""
        if self.mode == "none":
            return features
        B, D, h, w = features.shape
        if prototypes.dim() != 3 or prototypes.shape[-1] != D:
            raise ValueError(f"PrototypeAggregation: prototypes must be (L, K, {D}), got "
                             f"{tuple(prototypes.shape)}")
        protos = prototypes.detach().reshape(-1, D).to(features.dtype)        # (P = L*K, D)
        key, value = self.key(protos), self.value(protos)
        query = self.query(features).flatten(2).transpose(1, 2)                # (B, hw, D)
        if self.mode == "softmax":
            scale = self.scale(D)
            if isinstance(scale, torch.Tensor):  # learned: the op takes a float scale, so fold it into q
                context = ops.prototype_attention(query * scale, key, value, scale=1.0)
            else:
                context = ops.prototype_attention(query, key, value, scale=scale)
        else:
            K = prototypes.shape[1]
            # the public code's expression, evaluated as Python does: (q k^T) / K * 20
            context = torch.matmul(torch.matmul(query, key.t()) / K * 20, value)
        context = context.transpose(1, 2).reshape(B, D, h, w)
        return self.fuse(torch.cat([features, self.out(context)], dim=1))
