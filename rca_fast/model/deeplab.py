"""DeepLab-v2: a dilated ResNet-101 (output stride 8) with the v2 ASPP classifier.

The setting RCA and most WSSS papers report their final mIoU with (Chen et al., TPAMI 2017):

* ResNet-101 bottlenecks (3, 4, 23, 3 blocks); layer3 and layer4 keep stride 1 and use dilation
  2 and 4 instead, so the features are 2048 channels at 1/8 of the input.  The stride of a
  downsampling block sits in its 3x3 conv (torchvision's "v1.5" layout; the original Caffe
  model has it in the first 1x1), and the layer names are torchvision's (``conv1``, ``bn1``,
  ``layer1.0.conv1``, ``layer1.0.downsample.0``, ...), so an ImageNet ``resnet101`` state dict from
  a local file loads as it is (its ``fc.*`` is ignored).
* ASPP-v2: four parallel 3x3 convs 2048 -> classes with dilation 6, 12, 18, 24 whose outputs
  are **summed** (not concatenated as in v3), weights N(0, 0.01), biases 0.
* BatchNorm frozen (statistics and affine) when ``freeze_bn`` -- the usual choice with a
  pretrained backbone and batches of ~10 crops, too few for batch statistics.

Written for rca_fast from the paper's description; nothing is copied from other code.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

RESNET101_BLOCKS = (3, 4, 23, 3)
ASPP_RATES = (6, 12, 18, 24)


class Bottleneck(nn.Module):
    """1x1 (reduce) -> 3x3 (stride, dilation) -> 1x1 (expand x4), plus the (projected) input."""

    expansion = 4

    def __init__(self, in_ch: int, mid: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        out = mid * self.expansion
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + skip)


class DilatedResNet(nn.Module):
    """ResNet with layer3/layer4 dilated (2, 4) instead of strided: (B, 3, H, W) -> (B, 2048, H/8, W/8)."""

    def __init__(self, blocks: Sequence[int] = RESNET101_BLOCKS):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths, strides, dilations = (64, 128, 256, 512), (1, 2, 1, 1), (1, 1, 2, 4)
        in_ch = 64
        for i, (n, mid, s, d) in enumerate(zip(blocks, widths, strides, dilations)):
            layer = []
            for b in range(n):
                layer.append(Bottleneck(in_ch, mid, stride=s if b == 0 else 1, dilation=d))
                in_ch = mid * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.out_channels = in_ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ASPPv2(nn.Module):
    """Sum of parallel dilated 3x3 classifiers: (B, C_in, h, w) -> (B, classes, h, w)."""

    def __init__(self, in_ch: int, num_classes: int, rates: Sequence[int] = ASPP_RATES):
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(in_ch, num_classes, 3, padding=r, dilation=r) for r in rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for conv in self.branches[1:]:
            out = out + conv(x)
        return out


def freeze_batchnorm(module: nn.Module) -> None:
    """Every BatchNorm of ``module`` to eval mode with frozen affine parameters."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


class DeepLabV2(nn.Module):
    """DeepLab-v2 ResNet-101: (B, 3, H, W) -> logits (B, classes, ceil(H/8), ceil(W/8)).

    ``backbone`` holds the pretrainable layers, ``aspp`` the new ones (10x learning rate).
    """

    def __init__(self, num_classes: int, *, freeze_bn: bool = True, blocks: Sequence[int] = RESNET101_BLOCKS):
        super().__init__()
        self.backbone = DilatedResNet(blocks)
        self.aspp = ASPPv2(self.backbone.out_channels, num_classes)
        self.freeze_bn = bool(freeze_bn)
        if self.freeze_bn:
            freeze_batchnorm(self.backbone)

    def train(self, mode: bool = True) -> "DeepLabV2":
        super().train(mode)
        if self.freeze_bn:  # train() would put the frozen statistics back into batch mode
            freeze_batchnorm(self.backbone)
        return self

    def new_modules(self) -> List[nn.Module]:
        return [self.aspp]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.aspp(self.backbone(images))
