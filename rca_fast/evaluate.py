"""``python -m rca_fast.evaluate``: mIoU of pseudo labels or CAMs against ground-truth masks.

    python -m rca_fast.evaluate --pred runs/infer/pseudo --gt VOC2012/SegmentationClass \\
        --list VOC2012/train_cls.txt --num-classes 21 --out runs/eval

``--pred`` holds, per listed name, either ``<name>.png`` label maps (0 background, class c ->
c + 1, 255 ignore) or ``<name>.npy`` CAM dicts (``keys``, ``high_res``, as rca_fast.infer and
IRN write them); an infer output folder (with ``pseudo/`` and ``cams/``) works too, its CAMs
preferred.  For CAMs, every background threshold 0.00, 0.01, ..., 0.60 is scored and the best
reported (as SEAM does); ``--bg-threshold`` scores one threshold instead.
Ground-truth 255 is ignored; a pixel predicted 255 counts as a miss of its true class.
Prints a per-class IoU table; writes ``OUT/metrics.json`` (``miou``, ``per_class_iou``, and
for CAMs ``best_threshold`` and the whole curve) and, for a sweep, ``OUT/sweep.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence

import numpy as np
from tqdm import tqdm

from .data.voc import COCO_CLASSES, VOC_CLASSES, DataFileError, load_mask, read_class_list
from .utils.metrics import CamSweepMeter, ConfusionMeter, default_thresholds, format_iou_table
from .utils.program import run_program


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rca_fast.evaluate",
                                description="mIoU of label maps (PNG) or CAMs (npy, threshold sweep).")
    p.add_argument("--pred", required=True, help="folder of <name>.png or <name>.npy (or an infer output)")
    p.add_argument("--gt", required=True, help="folder of ground-truth <name>.png label maps")
    p.add_argument("--list", required=True, help="image names (first token of each line)")
    p.add_argument("--num-classes", type=int, default=21, help="classes including background (VOC 21)")
    p.add_argument("--out", required=True, help="output folder for metrics.json and sweep.png")
    p.add_argument("--type", choices=("auto", "png", "npy"), default="auto", help="prediction format")
    p.add_argument("--bg-threshold", type=float, default=None, help="npy: score this threshold only")
    p.add_argument("--class-names", default=None, help="comma-separated names of the foreground classes")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def _names_from_infer(pred: str, num_fg: int) -> Optional[List[str]]:
    """Class names recorded by rca_fast.infer in ``infer.json`` next to (or above) ``pred``."""
    for folder in (pred, os.path.dirname(os.path.normpath(pred))):
        path = os.path.join(folder, "infer.json")
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    names = json.load(f).get("class_names") or []
            except (OSError, ValueError):
                return None
            return list(names) if len(names) == num_fg else None
    return None


def class_names(num_classes: int, given: Optional[str] = None, pred: Optional[str] = None) -> List[str]:
    """Background + foreground names: ``given``, else those infer recorded, else VOC for 21
    classes, COCO for 81, else 'class k'."""
    if not given and pred:
        found = _names_from_infer(pred, num_classes - 1)
        if found:
            return ["background"] + found
    if given:
        names = [n.strip() for n in given.split(",")]
        if len(names) != num_classes - 1:
            raise ValueError(f"--class-names has {len(names)} names, expected num_classes - 1 = "
                             f"{num_classes - 1}")
        return ["background"] + names
    if num_classes == 21:
        return ["background"] + list(VOC_CLASSES)
    if num_classes == 81:
        return ["background"] + list(COCO_CLASSES)
    return ["background"] + [f"class {k}" for k in range(num_classes - 1)]


def _resolve_pred(pred: str, first: str, kind: str):
    """(folder, kind) holding the predictions of the first listed image ``first``."""
    candidates = []
    for folder in (pred, os.path.join(pred, "cams"), os.path.join(pred, "pseudo")):
        for ext in (("npy", "png") if kind == "auto" else (kind,)):
            candidates.append((folder, ext))
    for folder, ext in candidates:
        if os.path.isfile(os.path.join(folder, f"{first}.{ext}")):
            return folder, ext
    want = " or ".join(sorted({f"{first}.{e}" for _, e in candidates}))
    raise DataFileError(f"prediction not found: {os.path.join(pred, first)} ({want}, also under cams/ and "
                        "pseudo/)")


def load_cam_file(path: str):
    """(keys (k,) int64, high_res (k, H, W)) of an IRN-style CAM dict; DataFileError naming ``path``."""
    if not os.path.isfile(path):
        raise DataFileError(f"prediction not found: {path}")
    try:
        data = np.load(path, allow_pickle=True).item()
        keys = np.asarray(data["keys"], np.int64).reshape(-1)
        cams = np.asarray(data["high_res"], np.float32)
    except Exception as exc:
        raise DataFileError(f"cannot read CAM file {path} (expected a dict with 'keys' and 'high_res'): "
                            f"{exc}") from exc
    if cams.ndim != 3 or cams.shape[0] != keys.shape[0]:
        raise DataFileError(f"CAM file {path}: high_res must be (k, H, W) with k = len(keys) = "
                            f"{keys.shape[0]}, "
                            f"got {cams.shape}")
    return keys, cams


def evaluate(pred: str, gt: str, names: Sequence[str], num_classes: int, *, kind: str = "auto",
             bg_threshold: Optional[float] = None, progress: bool = True) -> dict:
    """Score predictions; returns the metrics dict (see the module doc)."""
    if not names:
        raise ValueError("the list holds no images")
    folder, kind = _resolve_pred(pred, names[0], kind)
    if kind == "png":
        meter = ConfusionMeter(num_classes)
    else:
        thresholds = default_thresholds() if bg_threshold is None else np.array([float(bg_threshold)])
        meter = CamSweepMeter(num_classes, thresholds)
    for name in tqdm(names, desc="evaluate", disable=not progress, dynamic_ncols=True):
        gt_path = os.path.join(gt, name + ".png")
        truth = load_mask(gt_path)
        path = os.path.join(folder, f"{name}.{kind}")
        try:
            if kind == "png":
                meter.update(load_mask(path), truth)
            else:
                keys, cams = load_cam_file(path)
                meter.update(cams, keys, truth)
        except ValueError as exc:
            raise ValueError(f"{path} vs {gt_path}: {exc}") from exc
    if kind == "png":
        iou = meter.iou()
        per_class = [None if not np.isfinite(v) else float(v) for v in iou]
        return {"type": "png", "miou": meter.miou(), "per_class_iou": per_class, "images": len(names),
                "pred_dir": folder}
    res = meter.result()
    res.update(type="npy", images=len(names), pred_dir=folder)
    return res


def plot_sweep(metrics: dict, path: str) -> Optional[str]:
    """mIoU vs background threshold as a PNG; None (with a message) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: sweep.png not written", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(metrics["thresholds"], [100 * m for m in metrics["miou_per_threshold"]], marker=".")
    ax.axvline(metrics["best_threshold"], color="grey", linestyle="--")
    ax.set_xlabel("background threshold")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(f"best {100 * metrics['miou']:.2f}% at {metrics['best_threshold']:.2f}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.num_classes < 2:
        raise ValueError(f"--num-classes counts the background too and must be >= 2, got {args.num_classes}")
    names = [n for n, _ in read_class_list(args.list, args.num_classes - 1)]
    if not os.path.isdir(args.gt):
        raise DataFileError(f"ground-truth folder not found: {args.gt}")
    metrics = evaluate(args.pred, args.gt, names, args.num_classes, kind=args.type,
                       bg_threshold=args.bg_threshold, progress=args.progress)
    labels = class_names(args.num_classes, args.class_names, args.pred)
    metrics["class_names"] = labels
    os.makedirs(args.out, exist_ok=True)
    header = f"{metrics['images']} images, {metrics['type']} predictions from {metrics['pred_dir']}"
    if metrics["type"] == "npy":
        header += f"; best background threshold {metrics['best_threshold']:.2f}"
        if len(metrics["thresholds"]) > 1:
            metrics["sweep_png"] = plot_sweep(metrics, os.path.join(args.out, "sweep.png"))
    print(header)
    print(format_iou_table(metrics["per_class_iou"], labels, metrics["miou"]))
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


if __name__ == "__main__":
    run_program(main)
