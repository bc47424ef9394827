"""Segmentation metrics: confusion matrices, IoU, and the CAM background-threshold sweep.

Conventions (VOC): label maps hold 0 background, class c -> c + 1, 255 ignore.  Ground-truth 255
pixels are left out.  A pixel *predicted* 255 (ignore) counts as a miss of its true class: it
adds to that class's false negatives and to no class's false positives.
mIoU is the mean over the classes whose union (TP + FP + FN) is non-zero.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

IGNORE = 255


def default_thresholds() -> np.ndarray:
    """0.00, 0.01, ..., 0.60 (the SEAM-style sweep)."""
    return np.round(np.arange(0, 61) * 0.01, 2)


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")


class ConfusionMeter:
    """Accumulates a (C, C + 1) confusion matrix: rows true class, columns predicted class, the
    last column counting pixels predicted 255 (ignore)."""

    def __init__(self, num_classes: int):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"ConfusionMeter: num_classes must be an int >= 1, got {num_classes!r}")
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes + 1), np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one (H, W) prediction / ground-truth pair of integer label maps."""
        pred, gt = np.asarray(pred).astype(np.int64), np.asarray(gt).astype(np.int64)
        _check_pair(pred, gt)
        C = self.num_classes
        valid = gt != IGNORE
        if valid.any() and gt[valid].max() >= C:
            raise ValueError(f"ground truth holds class {gt[valid].max()} >= num_classes = {C}")
        p = pred[valid]
        bad = (p != IGNORE) & ((p < 0) | (p >= C))
        if bad.any():
            raise ValueError(f"prediction holds class {p[bad][0]} outside [0, {C}) and is not 255")
        p = np.where(p == IGNORE, C, p)
        self.matrix += np.bincount(gt[valid] * (C + 1) + p, minlength=C * (C + 1)).reshape(C, C + 1)

    def iou(self) -> np.ndarray:
        return iou_from_confusion(self.matrix)

    def miou(self) -> float:
        return mean_iou(self.iou())


def iou_from_confusion(matrix: np.ndarray) -> np.ndarray:
    """Per-class IoU of a (C, C) or (C, C + 1) confusion matrix; NaN where the union is 0."""
    matrix = np.asarray(matrix, np.float64)
    C = matrix.shape[0]
    tp = np.diag(matrix[:, :C])
    union = matrix.sum(axis=1) + matrix[:, :C].sum(axis=0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(iou: np.ndarray) -> float:
    iou = np.asarray(iou, np.float64)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def cam_to_label(cams: np.ndarray, keys: Sequence[int], bg_threshold: float) -> np.ndarray:
    """Label map from normalised CAMs: background where every class is <= the threshold.

    Args: cams (k, H, W) in [0, 1] for the classes ``keys`` (0-based); bg_threshold.
    Returns (H, W) int64: 0 background, keys[i] + 1 where class i wins.
    """
    cams = np.asarray(cams)
    keys = np.asarray(keys, np.int64)
    if cams.ndim != 3 or cams.shape[0] != keys.shape[0]:
        raise ValueError(f"cam_to_label: cams must be (k, H, W) with k = len(keys) = {keys.shape[0]}, "
                         f"got {cams.shape}")
    if cams.shape[0] == 0:
        return np.zeros(cams.shape[1:], np.int64)
    # argmax over [threshold, cams]: ties go to the background, as argmax picks the first
    best = cams.argmax(axis=0)
    top = cams.max(axis=0)
    return np.where(top > bg_threshold, keys[best] + 1, 0)


class CamSweepMeter:
    """mIoU of CAM label maps at every background threshold of a sweep, in one pass per image.

    For a threshold t a pixel is its best class when that class's CAM value is > t, else
    background.  Each pixel is binned by how many thresholds lie strictly below its top CAM
    value, so one bincount per image serves every threshold exactly.
    """

    def __init__(self, num_classes: int, thresholds: Optional[np.ndarray] = None):
        self.num_classes = num_classes  # including background
        self.thresholds = default_thresholds() if thresholds is None else np.asarray(thresholds, np.float64)
        if self.thresholds.ndim != 1 or self.thresholds.size == 0 or np.any(np.diff(self.thresholds) <= 0):
            raise ValueError("CamSweepMeter: thresholds must be a non-empty increasing 1-D array")
        T, C = self.thresholds.size, num_classes
        # counts[g, p, b]: true class g, top class p (0-based fg index + 1), bin b in 0..T
        self.counts = np.zeros((C, C, T + 1), np.int64)

    def update(self, cams: np.ndarray, keys: Sequence[int], gt: np.ndarray) -> None:
        """Add one image: cams (k, H, W) normalised for the 0-based classes ``keys``, gt (H, W)."""
        cams = np.asarray(cams, np.float64)
        keys = np.asarray(keys, np.int64)
        gt = np.asarray(gt).astype(np.int64)
        if cams.ndim != 3 or cams.shape[0] != keys.shape[0]:
            raise ValueError(f"CamSweepMeter: cams must be (k, H, W) with k = len(keys) = {keys.shape[0]}, "
                             f"got {cams.shape}")
        _check_pair(cams[0] if cams.shape[0] else np.zeros(gt.shape), gt)
        C, T = self.num_classes, self.thresholds.size
        if keys.size and (keys.min() < 0 or keys.max() + 1 >= C):
            raise ValueError(f"CamSweepMeter: keys must be 0-based classes < {C - 1}, got {keys.tolist()}")
        valid = gt != IGNORE
        if valid.any() and gt[valid].max() >= C:
            raise ValueError(f"ground truth holds class {gt[valid].max()} >= num_classes = {C}")
        if keys.size:
            top_cls = keys[cams.argmax(axis=0)] + 1
            bins = np.searchsorted(self.thresholds, cams.max(axis=0), side="left")  # thresholds < value
        else:
            top_cls = np.zeros(gt.shape, np.int64)
            bins = np.zeros(gt.shape, np.int64)
        flat = (gt[valid] * C + top_cls[valid]) * (T + 1) + bins[valid]
        self.counts += np.bincount(flat, minlength=C * C * (T + 1)).reshape(C, C, T + 1)

    def confusion(self, index: int) -> np.ndarray:
        """(C, C) confusion at threshold ``thresholds[index]``."""
        C = self.num_classes
        fg = self.counts[:, :, index + 1:].sum(axis=2)  # bins > index: value above the threshold
        bg = self.counts[:, :, :index + 1].sum(axis=2).sum(axis=1)
        matrix = np.zeros((C, C), np.int64)
        matrix[:, 1:] = fg[:, 1:]
        matrix[:, 0] = bg + fg[:, 0]
        return matrix

    def result(self) -> Dict[str, object]:
        """``miou_per_threshold``, ``best_threshold``, ``miou`` (best), ``per_class_iou`` (at best)."""
        mious: List[float] = []
        ious = []
        for i in range(self.thresholds.size):
            iou = iou_from_confusion(self.confusion(i))
            ious.append(iou)
            mious.append(mean_iou(iou))
        arr = np.array(mious)
        best = int(np.nanargmax(arr)) if np.isfinite(arr).any() else 0
        return {"thresholds": self.thresholds.tolist(), "miou_per_threshold": [float(m) for m in mious],
                "best_threshold": float(self.thresholds[best]), "miou": float(arr[best]),
                "per_class_iou": [None if not np.isfinite(v) else float(v) for v in ious[best]]}


def format_iou_table(per_class_iou: Sequence[Optional[float]], names: Sequence[str], miou: float) -> str:
    """A plain-text per-class IoU table (percent)."""
    width = max([len(n) for n in names] + [5])
    lines = [f"{'class':<{width}}  IoU (%)", "-" * (width + 10)]
    for name, iou in zip(names, per_class_iou):
        cell = "   n/a" if iou is None or not np.isfinite(iou) else f"{100 * iou:6.2f}"
        lines.append(f"{name:<{width}}  {cell}")
    lines.append("-" * (width + 10))
    lines.append(f"{'mIoU':<{width}}  {100 * miou:6.2f}")
    return "\n".join(lines)
