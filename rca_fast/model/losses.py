"""The total training loss of RCA (DESIGN §2)."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F


def rca_loss(out, labels: torch.Tensor, epoch: int, *, coarse_weight: float = 0.4,
             contrast_weight: float = 0.01, contrast_start_epoch: int = 3) -> Tuple[torch.Tensor,
                                                                                    Dict[str, float]]:
    """``MLSM(O) + coarse_weight * MLSM(P) [+ contrast_weight * contrast]``.

    MLSM is the multilabel soft margin loss on the GAP class scores (mean over classes and
    images).  The contrast term is added when ``epoch >= contrast_start_epoch`` and
    ``out.contrast_loss`` is not None; epochs count from 1, so the default adds it from the
    third epoch on, as the public code (which skips it while its 0-based epoch is < 2).

    Args:
        out: an ``RCAOutput`` (logits (B, L), coarse_logits (B, L), contrast_loss scalar or None).
        labels: (B, L) 0/1 multi-hot (float, int or bool).
        epoch: the current epoch (1-based).
    Returns:
        (total loss scalar, {"loss", "cls", "coarse_cls", "contrast"} as floats); "contrast" is
        the unweighted contrast loss (0.0 when it was not computed), also before it is added.
    """
    for name in ("logits", "coarse_logits", "contrast_loss"):
        if not hasattr(out, name):
            raise TypeError(f"rca_loss: out must be an RCAOutput (no attribute {name!r}), got "
                            f"{type(out).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"rca_loss: labels must be a torch.Tensor (B, L), got {type(labels).__name__}")
    if tuple(labels.shape) != tuple(out.logits.shape):
        raise ValueError(f"rca_loss: labels must have the shape (B, L) = {tuple(out.logits.shape)} "
                         f"of out.logits, got {tuple(labels.shape)}")
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise TypeError(f"rca_loss: epoch must be an int (1-based), got {type(epoch).__name__}")
    for name, value in (("coarse_weight", coarse_weight), ("contrast_weight", contrast_weight)):
        if not value >= 0:
            raise ValueError(f"rca_loss: {name} must be >= 0, got {value}")
    target = labels.to(device=out.logits.device, dtype=out.logits.dtype)
    cls = F.multilabel_soft_margin_loss(out.logits, target)
    coarse = F.multilabel_soft_margin_loss(out.coarse_logits, target.to(out.coarse_logits.dtype))
    total = cls + coarse_weight * coarse
    contrast = out.contrast_loss
    if contrast is not None and epoch >= contrast_start_epoch:
        total = total + contrast_weight * contrast
    parts = {"loss": float(total.detach()), "cls": float(cls.detach()), "coarse_cls": float(coarse.detach()),
             "contrast": float(contrast.detach()) if contrast is not None else 0.0}
    return total, parts
