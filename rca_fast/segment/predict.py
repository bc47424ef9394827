"""Evaluation of the segmentation network on the validation images (rank 0, one image at a time).

Per image, class probabilities at the original size:
* single scale: softmax of the logits of the image as it is (bilinearly upsampled);
* multi-scale + flip: the mean of the softmax over ``scales`` x (image, flipped image);
* with ``crf``: the dense CRF of the public pipeline (rca_fast.refine.crf_refine, 10 iterations)
  on the multi-scale probabilities.
Each variant's confusion matrix gives mIoU and per-class IoU (rca_fast.utils.metrics; 255 in the
ground truth is left out).  The last variant's arg-max is written as ``pred/<name>.png`` (VOC
palette) and, for the first ``overlays`` images, ``overlays/<name>.jpg`` = [image | prediction
over the image | ground truth].
"""
from __future__ import annotations

import os
import time
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..data.seg_pairs import SegmentationPairs
from ..model.segmentation import upsample_logits
from ..refine import CRF_EXTRA_HINT, crf_available, crf_refine
from ..utils.metrics import ConfusionMeter, format_iou_table
from ..utils.palette import colorize_label, save_label_png

CRF_ITERS = 10


def _probs(model: torch.nn.Module, x: torch.Tensor, size: Tuple[int, int], amp: bool) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
    return torch.softmax(upsample_logits(logits.float(), size), dim=1)


@torch.no_grad()
def predict_probs(
    model: torch.nn.Module,
    image: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
    amp: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(single-scale, multi-scale + flip) class probabilities of one image.

    Args: image (1, 3, H, W) normalised.  Returns two (C, H, W) float32 tensors on its device.
    """
    size = tuple(image.shape[-2:])
    single = _probs(model, image, size, amp)[0]
    total, count = torch.zeros_like(single), 0
    for s in scales:
        x = (
            image
            if s == 1.0
            else F.interpolate(
                image,
                size=(max(1, round(size[0] * s)), max(1, round(size[1] * s))),
                mode="bilinear",
                align_corners=False,
            )
        )
        total += single if s == 1.0 else _probs(model, x, size, amp)[0]
        count += 1
        if flip:
            total += _probs(model, x.flip(-1), size, amp)[0].flip(-1)
            count += 1
    return single, total / count


def overlay_picture(image: np.ndarray, pred: np.ndarray, gt: np.ndarray, gap: int = 4) -> np.ndarray:
    """[image | prediction colours blended 50% over it | ground-truth colours] as (H, 3W + 2 gap, 3) uint8."""
    blend = (0.5 * image.astype(np.float32) + 0.5 * colorize_label(pred).astype(np.float32) + 0.5).astype(
        np.uint8
    )
    sep = np.full((image.shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([image, sep, blend, sep, colorize_label(gt)], axis=1)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: SegmentationPairs, out: str, class_names: Sequence[str], *,
             device: torch.device, scales: Sequence[float], flip: bool = True, crf: bool = False,
             amp: bool = False, overlays: int = 16, progress: bool = True, log=None) -> Dict:
    """Score ``model`` on ``dataset`` (eval items); write predictions and overlays under ``out``.

    Returns {"miou" (of the last variant), "variant", "single_scale", "multi_scale_flip"[, "crf"]:
    {"miou", "per_class_iou": {name: IoU or None}}, "scales", "flip", "images", "seconds"}.
    """
    if crf and not crf_available():
        raise ImportError(f"--crf needs the dense CRF package pydensecrf: install the optional extra with "
                          f"{CRF_EXTRA_HINT} (pydensecrf2)")
    was_training = model.training
    model.eval()
    C = dataset.num_classes
    variants = ["single_scale", "multi_scale_flip"] + (["crf"] if crf else [])
    meters = {v: ConfusionMeter(C) for v in variants}
    pred_dir, overlay_dir = os.path.join(out, "pred"), os.path.join(out, "overlays")
    os.makedirs(pred_dir, exist_ok=True)
    if overlays:
        os.makedirs(overlay_dir, exist_ok=True)
    start = time.time()
    for i in tqdm(
        range(len(dataset)), desc="segment eval", disable=not progress, leave=False, dynamic_ncols=True
    ):
        item = dataset[i]
        gt = item["label"].numpy()
        single, multi = predict_probs(model, item["image"][None].to(device), scales, flip, amp)
        preds = {
            "single_scale": single.argmax(0).cpu().numpy(),
            "multi_scale_flip": multi.argmax(0).cpu().numpy(),
        }
        raw: Optional[np.ndarray] = None
        if crf:
            raw = dataset.raw(i)[0]
            preds["crf"] = crf_refine(raw, multi.cpu().numpy(), t=CRF_ITERS).argmax(0)
        for v in variants:
            meters[v].update(preds[v], gt)
        final = preds[variants[-1]].astype(np.uint8)
        save_label_png(os.path.join(pred_dir, item["name"] + ".png"), final)
        if overlays < 0 or i < overlays:
            raw = raw if raw is not None else dataset.raw(i)[0]
            Image.fromarray(overlay_picture(raw, final, gt)).save(
                os.path.join(overlay_dir, item["name"] + ".jpg"), quality=90
            )
    if was_training:
        model.train()
    names = list(class_names)
    result: Dict = {
        "variant": variants[-1],
        "scales": list(scales),
        "flip": bool(flip),
        "images": len(dataset),
        "seconds": round(time.time() - start, 2),
    }
    for v in variants:
        iou = meters[v].iou()
        result[v] = {
            "miou": meters[v].miou(),
            "per_class_iou": {n: (None if not np.isfinite(x) else float(x)) for n, x in zip(names, iou)},
        }
    result["miou"] = result[variants[-1]]["miou"]
    if log is not None:
        log.info(
            f"per-class IoU ({variants[-1]}):\n"
            + format_iou_table(list(result[variants[-1]]["per_class_iou"].values()), names, result["miou"])
        )
        log.info("mIoU: " + ", ".join(f"{v} {100 * result[v]['miou']:.2f}%" for v in variants))
    return result
