"""Segmentation networks of step 3 (``python -m rca_fast.segment``), their loss and parameter groups.

``build_segmentation_model(name, num_classes, pretrained=None)``:

* ``deeplabv2-resnet101``: :class:`rca_fast.model.deeplab.DeepLabV2` (dilated ResNet-101, ASPP-v2,
  output stride 8, frozen BatchNorm) -- the WSSS papers' setting;
* ``deeplabv3-resnet50``: torchvision's ``deeplabv3_resnet50(weights=None, weights_backbone=None)``
  (output stride 8, ASPP-v3 head), never downloading anything;
* ``tiny``: :class:`TinySegNet`, a small CPU network (output stride 4) for the synthetic data.

Every model maps (B, 3, H, W) normalised images to logits (B, classes, h, w) at its own output
stride; :func:`upsample_logits` brings them to a label map's size.  ``pretrained`` is a local
ImageNet classification state dict of the backbone (torchvision key names; ``fc.*`` ignored).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import _read_state_dict
from .deeplab import DeepLabV2

SEG_BACKBONES = ("deeplabv2-resnet101", "deeplabv3-resnet50", "tiny")
IGNORE_INDEX = 255


class TinySegNet(nn.Module):
    """conv-BN-ReLU x5 (two of stride 2, two dilated) + 1x1 classifier: output stride 4, ~0.1 M params."""

    def __init__(self, num_classes: int, width: int = 48):
        super().__init__()

        def block(cin, cout, stride=1, dilation=1):
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, width // 2, 2),
            *block(width // 2, width, 2),
            *block(width, width),
            *block(width, width, dilation=2),
            *block(width, width, dilation=4),
        )
        self.classifier = nn.Conv2d(width, num_classes, 1)
        for m in self.modules():  # He init: no pretrained weights here, the net trains from scratch
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.classifier.bias)

    def new_modules(self) -> List[nn.Module]:
        return []  # nothing is pretrained: every layer trains at the base learning rate

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


class TorchvisionDeepLabV3(nn.Module):
    """torchvision's DeepLab-v3 ResNet-50 returning the logits tensor (its forward returns a dict)."""

    def __init__(self, num_classes: int):
        super().__init__()
        from torchvision.models.segmentation import deeplabv3_resnet50

        net = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
        self.backbone, self.classifier = net.backbone, net.classifier

    def new_modules(self) -> List[nn.Module]:
        return [self.classifier]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(images)["out"])


def load_backbone_weights(model: nn.Module, path: str) -> None:
    """Load a local ImageNet state dict (torchvision names) into ``model.backbone``.

    ``fc.*`` is ignored; a missing, unexpected or mis-shaped key is a ValueError listing them.
    """
    state = {k: v for k, v in _read_state_dict(path).items() if not k.startswith("fc.")}
    own = model.backbone.state_dict()
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in own if k in state and state[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        parts = [
            f"{what} keys: {', '.join(keys[:6])}" + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape-mismatched", mismatched),
            )
            if keys
        ]
        raise ValueError(
            f"--pretrained {path!r} does not fit the {type(model).__name__} backbone: " + "; ".join(parts)
        )
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))


def build_segmentation_model(name: str, num_classes: int, pretrained: Optional[str] = None, *,
                             freeze_bn: Optional[bool] = None) -> nn.Module:
    """One of :data:`SEG_BACKBONES` with ``num_classes`` outputs (background included).

    ``freeze_bn`` (deeplabv2 only; default: frozen when ``pretrained`` is given).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes (background included) must be an int >= 2, got {num_classes!r}")
    if name == "deeplabv2-resnet101":
        model = DeepLabV2(num_classes, freeze_bn=bool(pretrained) if freeze_bn is None else freeze_bn)
    elif name == "deeplabv3-resnet50":
        model = TorchvisionDeepLabV3(num_classes)
    elif name == "tiny":
        model = TinySegNet(num_classes)
    else:
        raise ValueError(f"--backbone must be one of {SEG_BACKBONES}, got {name!r}")
    if pretrained:
        if name == "tiny":
            raise ValueError("--pretrained: the tiny network has no pretrained backbone")
        load_backbone_weights(model, pretrained)
        if getattr(model, "freeze_bn", False):  # loading replaced the BN tensors: freeze them again
            model.train(model.training)
    return model


def seg_param_groups(
    model: nn.Module, lr: float, weight_decay: float, new_lr_mult: float = 10.0
) -> List[Dict]:
    """SGD groups: pretrainable layers at ``lr``, the new ones (``model.new_modules()``) at
    ``new_lr_mult * lr``; each group carries its ``lr_mult`` for the schedule.  Frozen parameters
    (requires_grad False) are left out."""
    new_ids = {id(p) for m in model.new_modules() for p in m.parameters()}
    old = [p for p in model.parameters() if p.requires_grad and id(p) not in new_ids]
    new = [p for p in model.parameters() if p.requires_grad and id(p) in new_ids]
    groups = []
    for params, mult in ((old, 1.0), (new, new_lr_mult)):
        if params:
            groups.append({"params": params, "lr": lr * mult, "lr_mult": mult, "weight_decay": weight_decay})
    return groups


def upsample_logits(logits: torch.Tensor, size) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H, W) bilinear (align_corners False); unchanged when already that size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Pixel cross-entropy, mean over the pixels whose label is not ``ignore_index``.

    Args:
        logits: (B, C, h, w) float, upsampled bilinearly to the target's size when smaller.
        target: (B, H, W) int64 in [0, C) or ``ignore_index``.
    Returns:
        a scalar; 0 (with a graph) when every pixel is ignored -- torch's mean would be 0/0 = NaN,
        and proxy labels do mark whole images 255.
    """
    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0]:
        raise ValueError(
            f"segmentation_loss: logits must be (B, C, h, w) and target (B, H, W) with the same B, "
            f"got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    logits = upsample_logits(logits, target.shape[-2:]).float()
    valid = target != ignore_index
    total = F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="sum")
    return total / valid.sum().clamp_min(1)
