"""Class activation maps from a trained model: multi-scale + flip, upsampled, normalised.

The CAM is the final head's output O (``RCAOutput.cams``).  For each scale the image is
resized, run through the model, the ReLU of O upsampled (bilinear) to the output size, and the
flipped image's maps flipped back; all are summed.  Each class's map is then divided by its
maximum (IRN's convention), so values lie in [0, 1] and one background threshold fits all.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def scaled_size(h: int, w: int, scale: float, multiple: int = 1) -> Tuple[int, int]:
    """(h, w) x scale rounded up, at least ``multiple`` and a multiple of it (the size of a scaled
    CAM input; defined here, not in rca_fast.data: utils sit below data and import nothing of it)."""
    def one(n):
        return max(multiple, int(math.ceil(n * scale / multiple)) * multiple)
    return one(h), one(w)


def parse_scales(text: str) -> Tuple[float, ...]:
    """``"1.0,0.5,1.5"`` -> (1.0, 0.5, 1.5); every scale must be > 0."""
    try:
        scales = tuple(float(s) for s in str(text).split(",") if s.strip())
    except ValueError:
        raise ValueError(f"scales must be comma-separated numbers, got {text!r}") from None
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive numbers, got {text!r}")
    return scales


@torch.no_grad()
def multiscale_cams(model: torch.nn.Module, images: torch.Tensor, *, scales: Sequence[float] = (1.0,),
                    flip: bool = False, out_size: Optional[Tuple[int, int]] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed ReLU CAMs over scales (and flips), upsampled to ``out_size``.

    Args:
        model: an RCAModel (put in eval mode by the caller).
        images: (B, 3, H, W) normalised float on the model's device.
        scales: image scale factors; flip: add horizontally flipped copies.
        out_size: (H_out, W_out), default (H, W).
    Returns:
        cams (B, L, H_out, W_out) float32, not normalised; logits (B, L) mean over the passes.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"multiscale_cams: images must be (B, 3, H, W), got {got}")
    H, W = images.shape[-2:]
    out_size = tuple(out_size) if out_size is not None else (H, W)
    total, logits, passes = None, None, 0
    for scale in scales:
        size = scaled_size(H, W, scale) if scale != 1.0 else (H, W)
        x = images if size == (H, W) else F.interpolate(images, size=size, mode="bilinear",
                                                        align_corners=False)
        batch = torch.cat([x, x.flip(-1)]) if flip else x
        out = model(batch)
        cams = F.interpolate(F.relu(out.cams.float()), size=out_size, mode="bilinear", align_corners=False)
        if flip:
            b = images.shape[0]
            cams = cams[:b] + cams[b:].flip(-1)
            lg = (out.logits[:b].float() + out.logits[b:].float()) / 2
        else:
            lg = out.logits.float()
        total = cams if total is None else total + cams
        logits = lg if logits is None else logits + lg
        passes += 1
    return total, logits / passes


def normalise_cams(cams: torch.Tensor, present: Optional[torch.Tensor] = None,
                   eps: float = 1e-5) -> torch.Tensor:
    """Divide each (b, l) map by its maximum; classes not ``present`` (B, L) become 0."""
    peak = cams.flatten(2).amax(dim=2).clamp_min(0)[..., None, None]
    cams = cams.clamp_min(0) / (peak + eps)
    if present is not None:
        cams = cams * (present > 0).to(cams.dtype)[..., None, None]
    return cams


def present_classes(label: Optional[torch.Tensor], logits: torch.Tensor) -> List[int]:
    """0-based classes of one image: from its tags when known, else where the logit is > 0."""
    if label is not None:
        return torch.nonzero(label > 0).flatten().tolist()
    return torch.nonzero(logits > 0).flatten().tolist()
