"""Backbones of the RCA network: image (B, 3, H, W) -> features F (B, D, H/8, W/8).

* ``vgg16``: the public RCA code's VGG16 -- the 13 conv layers of torchvision's ``vgg16`` with
  pool4 at stride 1 (kernel 3, padding 1), conv5 dilated by 2 and no pool5: output stride 8,
  D = 512 (ReLU-ed).  The layers keep torchvision's names (``features.<i>``), so a
  torchvision-style ``vgg16`` state dict loads as it is (its ``classifier.*`` is ignored).
* ``resnet50``: torchvision's ``resnet50(weights=None, replace_stride_with_dilation=[False,
  True, True])`` (stride 8, 2048 channels) followed by a new conv1x1 2048 -> 512 + ReLU, so the
  heads are those of the VGG model.  Layer names are torchvision's (``fc.*`` ignored on load).
* ``tiny``: four small convs (3 of stride 2), D = 64: a CPU-friendly backbone for tests, demos
  and the synthetic data set.

``pretrained`` is always a local file (never downloaded): see :func:`load_pretrained`.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch
from torch import nn

BACKBONES = ("vgg16", "resnet50", "tiny")

# torchvision's configuration "D" (VGG16): channels of each conv, "M" = max-pool.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class Backbone(nn.Module):
    """Base class: ``out_channels`` (D), ``stride`` (8), and the names used by the loader.

    ``new_layer_prefixes``: parameters created by RCA (not in a pretrained file; trained with the
    new-layer learning-rate multipliers).  ``ignored_pretrained_prefixes``: entries of a
    torchvision state dict that the backbone drops (the classifier).
    """

    out_channels: int = 0
    stride: int = 8
    new_layer_prefixes: Tuple[str, ...] = ()
    ignored_pretrained_prefixes: Tuple[str, ...] = ()

    def is_new_layer(self, name: str) -> bool:
        return name.startswith(self.new_layer_prefixes) if self.new_layer_prefixes else False


class VGG16Backbone(Backbone):
    """VGG16 as the public RCA code uses it (DeepLab-LargeFOV style), output stride 8, 512 channels."""

    out_channels = 512
    ignored_pretrained_prefixes = ("classifier.",)

    def __init__(self):
        super().__init__()
        layers, in_ch, pools = [], 3, 0
        for item in _VGG16_CFG:
            if item == "M":
                pools += 1
                # pools 1-3 halve the size (stride 8 in all); pool4 keeps it so conv5 sees more
                # pixels, and conv5 is dilated by 2 to keep its receptive field.
                layers.append(nn.MaxPool2d(2, 2) if pools <= 3 else nn.MaxPool2d(3, stride=1, padding=1))
                continue
            dilation = 2 if pools == 4 else 1
            layers += [nn.Conv2d(in_ch, item, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True)]
            in_ch = item
        # Same indices as torchvision's vgg16().features[:30] (pool5 at index 30 is dropped).
        self.features = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # torchvision's VGG initialisation
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 512, H//8, W//8)."""
        return self.features(images)


class ResNet50Backbone(Backbone):
    """torchvision ResNet-50 dilated to stride 8, then a new conv1x1 2048 -> 512 (+ ReLU)."""

    out_channels = 512
    new_layer_prefixes = ("reduce.",)
    ignored_pretrained_prefixes = ("fc.",)

    def __init__(self):
        super().__init__()
        import torchvision  # imported here so `import rca_fast` does not pull torchvision in

        net = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
        # Keep torchvision's attribute names so its state dict keys match ours.
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.reduce = nn.Sequential(nn.Conv2d(2048, 512, 1), nn.ReLU(inplace=True))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 512, ceil(H/8), ceil(W/8))."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.reduce(x)


class TinyBackbone(Backbone):
    """Four convs 3x3 (three of stride 2): output stride 8, 64 channels, for CPU runs."""

    out_channels = 64

    def __init__(self, width: int = 64):
        super().__init__()
        self.out_channels = width
        half = max(width // 2, 1)
        self.features = nn.Sequential(
            nn.Conv2d(3, half, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(half, width, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 64, ceil(H/8), ceil(W/8))."""
        return self.features(images)


def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from a local file (plain, or wrapped in {"state_dict": ...} / {"model": ...})."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"pretrained must be a path to a local weights file, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file not found: {path!r} (rca_fast never downloads "
                                "weights; pass the path of a local torchvision-style state dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"pretrained weights file {path!r} could not be read as a torch state dict: "
                         f"{type(exc).__name__}: {exc}") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"pretrained weights file {path!r} does not hold a state dict of tensors "
                         f"(got {type(state).__name__})")
    # Checkpoints saved from DataParallel/DDP prefix every key with "module.".
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_pretrained(backbone: Backbone, path: str) -> None:
    """Load a local torchvision-style state dict into ``backbone`` (its pretrained layers).

    Keys of RCA's new layers are not expected; the torchvision classifier keys are ignored.
    Raises FileNotFoundError naming the path when the file is missing, and ValueError listing the
    missing, unexpected and shape-mismatched keys when the file does not fit the backbone.
    """
    state = _read_state_dict(path)
    own = {k: v for k, v in backbone.state_dict().items() if not backbone.is_new_layer(k)}
    given = {k: v for k, v in state.items()
             if not k.startswith(backbone.ignored_pretrained_prefixes or ("\0",))}
    # Old BatchNorm checkpoints lack num_batches_tracked; BatchNorm loads fine without it.
    missing = sorted(k for k in own if k not in given and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in given if k not in own)
    mismatched = sorted(f"{k}: file {tuple(given[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in own if k in given and given[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        def show(keys):
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
        parts = [f"{name} keys: {show(keys)}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)) if keys]
        raise ValueError(f"pretrained weights file {os.fspath(path)!r} does not fit the "
                         f"{type(backbone).__name__}: " + "; ".join(parts))
    with torch.no_grad():
        for k, v in given.items():
            own[k].copy_(v.to(own[k].dtype))


def build_backbone(name: str, pretrained: Optional[str] = None) -> Backbone:
    """``vgg16`` | ``resnet50`` | ``tiny``, optionally loaded from a local weights file."""
    builders = {"vgg16": VGG16Backbone, "resnet50": ResNet50Backbone, "tiny": TinyBackbone}
    if name not in builders:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
    backbone = builders[name]()
    if pretrained is not None:
        load_pretrained(backbone, pretrained)
    return backbone
