"""Heads of the RCA network (DESIGN §2): CAM heads, the contrast projector, prototype aggregation.

Shapes: features F (B, D, h, w); CAMs (B, L, h, w); prototypes (L, K, D).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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


# How PerClassCAMHead runs its L branches (the parameters are the same whichever runs, so a state
# dict loads into every implementation):
#   grouped                 one conv D -> L*W, then grouped convs (groups = L): 4 convolutions
#   loop                    per class its dense 3x3, 3x3, 3x3, 1x1 convs on that class's slices of
#                           the weights: the public code's loop of dense convs
#   grouped_channels_last   grouped, input and activations in channels_last (NHWC) memory format
#   loop_channels_last      loop, in channels_last
FINAL_HEAD_IMPLS = ("grouped", "loop", "grouped_channels_last", "loop_channels_last")
# impl="auto": the implementation per device type.  CPU: measured (README, "Final CAM heads":
# grouped was the fastest or within 1% of it in each case on the 2-core CPU; channels_last
# 1.2-1.4x slower).  CUDA: provisional until benchmarks/bench_final_heads.py has run on the GPU
# (gpu_check.sh's final_heads step; its summary says whether this pick is within 5% of the
# fastest): dense convs in channels_last, because a 512 -> 512 3x3 conv in NHWC is the case
# cuDNN's tensor-core kernels are tuned for, and grouped convs with wide groups are reported
# slower than the same convs run one by one (pytorch/pytorch#73764).
FINAL_HEAD_AUTO = {"cpu": "grouped", "cuda": "loop_channels_last"}
FINAL_HEAD_AUTO_DEFAULT = "grouped"   # any other device type


def resolve_final_head_impl(impl: str, device: torch.device) -> str:
    """The implementation ``impl`` names on ``device``: itself, or for ``"auto"`` the per-device
    rule ``FINAL_HEAD_AUTO`` (``FINAL_HEAD_AUTO_DEFAULT`` for a device type it does not name)."""
    if impl == "auto":
        return FINAL_HEAD_AUTO.get(torch.device(device).type, FINAL_HEAD_AUTO_DEFAULT)
    if impl not in FINAL_HEAD_IMPLS:
        raise ValueError(f"final head impl must be 'auto' or one of {FINAL_HEAD_IMPLS}, got {impl!r}")
    return impl


class PerClassCAMHead(nn.Module):
    """L independent branches, each 3 x (conv3x3 + ReLU) + conv1x1 -> 1 map, as the public code's
    final CAM head -- held as ONE network instead of L: the first conv of every branch reads the
    same input, so the L first convs stack into one conv D -> L*width; the later convs are grouped
    convs (groups = L), which keep the branches independent.

    Branch l owns output channels [l*width, (l+1)*width) of every conv and map l of the last one;
    each grouped conv has the fan-in of one branch, so the default initialisation is that of L
    separate heads.

    ``impl`` ("auto" or one of ``FINAL_HEAD_IMPLS``) says how the branches run; every
    implementation computes the same function from the same parameters (names and shapes do not
    depend on it, so checkpoints load whichever runs).  "auto" picks per device at each forward
    (``resolve_final_head_impl``); the attribute may be changed after construction.
    """

    def __init__(self, in_channels: int, width: int, num_classes: int, impl: str = "auto"):
        super().__init__()
        L, W = num_classes, width
        self.num_classes, self.width = L, W
        self.impl = impl
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, L * W, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(L * W, L * W, 3, padding=1, groups=L), nn.ReLU(inplace=True),
            nn.Conv2d(L * W, L * W, 3, padding=1, groups=L), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(L * W, L, 1, groups=L)

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if not isinstance(value, str) or (value != "auto" and value not in FINAL_HEAD_IMPLS):
            raise ValueError(
                f"PerClassCAMHead: impl must be 'auto' or one of {FINAL_HEAD_IMPLS}, got {value!r}"
            )
        self._impl = value

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, L, h, w): map l comes from branch l only."""
        impl = resolve_final_head_impl(self.impl, features.device)
        if impl.endswith("_channels_last"):
            features = features.contiguous(memory_format=torch.channels_last)
        if impl.startswith("grouped"):
            maps = self.classifier(self.body(features))   # grouped: one conv + grouped convs
        else:
            maps = self._loop(features)
        # the maps leave in the default (NCHW) layout whatever ran: GAP, the att_dir maps and the
        # kernels downstream see one layout (a copy of B*L*h*w values, small next to the convs)
        return maps.contiguous()

    def _loop(self, features: torch.Tensor) -> torch.Tensor:
        """Per class its dense 3x3, 3x3, 3x3, 1x1 convs (the public code's loop) on this module's
        parameters, cut with ``split`` (whose backward is one concatenation; L slices of a weight
        would each write a zero-filled full-size gradient).  The first convs run per class too, as
        in the public code: stacked into one D -> L*W conv they measured no faster on the CPU."""
        W = self.width
        convs = (self.body[0], self.body[2], self.body[4])
        weights = [(conv.weight.split(W), conv.bias.split(W)) for conv in convs]  # L x (W, ., 3, 3), L x (W,)
        wc, bc = self.classifier.weight.split(1), self.classifier.bias.split(1)   # L x (1, W, 1, 1), L x (1,)
        maps = []
        for l in range(self.num_classes):
            y = features
            for w, b in weights:
                y = F.relu(F.conv2d(y, w[l], b[l], padding=1), inplace=True)
            maps.append(F.conv2d(y, wc[l], bc[l]))
        return torch.cat(maps, dim=1)


class Projector(nn.Module):
    """conv3x3 (with bias, as the public code's) + BN + ReLU + conv3x3 on the backbone features:
    the contrast-query features.  (The bias before BN only shifts what BN's mean removes in
    training mode, but it gets weight decay and the x20 lr like every public bias, and it is in
    the public state dict.)"""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels),
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
