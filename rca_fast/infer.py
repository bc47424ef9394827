"""``python -m rca_fast.infer``: CAMs and pseudo labels from a trained checkpoint.

    python -m rca_fast.infer --checkpoint runs/pascal/model/checkpoint.pt --dataset voc \\
        --data-root VOC2012 --list VOC2012/train_cls.txt --out runs/pascal/infer --overlays

For every listed image and its present classes (the list's tags; the classifier's positive
logits when the list has none): multi-scale (``--scales``, default 1.0,0.5,1.5,2.0) + flip CAMs
of the final head O, upsampled to the image size, each class divided by its maximum.  Writes
  * ``OUT/cams/<name>.npy``: IRN-style dict ``{"keys": (k,) int64 0-based classes,
    "high_res": (k, H, W) float32 in [0, 1]}``;
  * ``OUT/pseudo/<name>.png``: VOC-palette label map, 0 background, class c -> c + 1 where the
    best class's CAM is above ``--bg-threshold``; with ``--ignore-margin m`` pixels within m of
    the threshold are 255 (ignore);
  * ``OUT/overlays/<name>.jpg`` with ``--overlays``: image | heat map per class | pseudo label;
  * ``OUT/list.txt`` (``name c c ...``) and ``OUT/infer.json``; for ``--dataset synthetic`` also
    ``OUT/gt/<name>.png`` (the generated masks), so ``rca_fast.evaluate`` can score the result.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .data import SyntheticShapes, VOCSegmentation
from .data.collate import collate
from .model.config import build_model
from .utils.cams import multiscale_cams, normalise_cams, parse_scales, present_classes
from .utils.checkpoint import load_checkpoint, load_model_state
from .utils.metrics import cam_to_label
from .utils.palette import overlay_strip, save_label_png
from .utils.program import run_program
from .utils.threads import cpu_threads

DEFAULT_BG_THRESHOLD = 0.15


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rca_fast.infer",
                                description="Multi-scale CAMs, pseudo labels and overlays from a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by rca_fast.train")
    p.add_argument("--dataset", choices=("synthetic", "voc", "coco"), default=None,
                   help="default: the checkpoint's training dataset")
    p.add_argument("--data-root", default=None, help="VOC/COCO folder (default: the checkpoint's)")
    p.add_argument("--img_dir", "--img-dir", dest="img_dir", default=None,
                   help="default: DATA_ROOT/JPEGImages")
    p.add_argument("--list", default=None, help="images to process: 'name c c ...' or bare names "
                   "(synthetic: optional subset of the generated split)")
    p.add_argument("--cls-labels", default=None, help="IRN cls_labels.npy for a list of bare names")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--scales", default="1.0,0.5,1.5,2.0", help="comma-separated image scales")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no horizontal-flip pass")
    p.add_argument("--bg-threshold", type=float, default=None,
                   help=f"background threshold of the pseudo labels (default: the best threshold the "
                        f"training evaluation found, else {DEFAULT_BG_THRESHOLD})")
    p.add_argument("--ignore-margin", type=float, default=0.0,
                   help="pixels whose best CAM value is within this of the threshold become 255")
    p.add_argument("--overlays", action="store_true", help="also write heat-map overlays")
    p.add_argument("--long-side", type=int, default=None, help="resize images to this longer side first")
    p.add_argument("--split", choices=("train", "val", "test"), default="val", help="synthetic split")
    p.add_argument("--num-images", type=int, default=None, help="synthetic: images of the split (default: "
                   "the training run's --val-images); voc/coco: process only the first N")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images per forward for same-size images (synthetic); real images go one by one")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (0 = torch's default, fixed by the machine)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def _dataset(args, train_args: dict, num_classes: int):
    """The images to process, and whether ground-truth masks come with them."""
    if args.dataset == "synthetic":
        n = args.num_images or train_args.get("val_images") or 160
        ds = SyntheticShapes(n, num_classes, int(train_args.get("input_size", 96)),
                             seed=int(train_args.get("seed", 0)), split=args.split)
        if args.list:
            from .data import read_class_list
            wanted = [name for name, _ in read_class_list(args.list, num_classes)]
            known = {name: i for i, name in enumerate(ds.names)}
            missing = [n for n in wanted if n not in known]
            if missing:
                raise ValueError(f"{args.list}: {missing[0]} is not an image of the synthetic {args.split} "
                                 "split "
                                 f"({len(ds)} images)")
            return torch.utils.data.Subset(ds, [known[n] for n in wanted]), ds
        return ds, ds
    root = args.data_root or train_args.get("data_root") or "data"
    img_dir = args.img_dir or os.path.join(root, "JPEGImages")
    if not args.list:
        raise ValueError("--list is required for voc/coco")
    cls_labels = args.cls_labels
    if cls_labels is None and os.path.isfile(os.path.join(root, "cls_labels.npy")):
        cls_labels = os.path.join(root, "cls_labels.npy")
    ds = VOCSegmentation(args.list, img_dir, num_classes, long_side=args.long_side, cls_labels=cls_labels,
                         max_images=args.num_images)
    return ds, ds


def write_outputs(args, name: str, cams: np.ndarray, keys: np.ndarray, source, index: int,
                  synthetic: bool) -> None:
    """cams/<name>.npy, pseudo/<name>.png, and gt/ (synthetic) and overlays/ (asked) of one image."""
    np.save(os.path.join(args.out, "cams", name + ".npy"), {"keys": keys, "high_res": cams})
    label = cam_to_label(cams, keys, args.bg_threshold)
    if args.ignore_margin > 0 and keys.size:
        label[np.abs(cams.max(axis=0) - args.bg_threshold) < args.ignore_margin] = 255
    save_label_png(os.path.join(args.out, "pseudo", name + ".png"), label)
    if synthetic:
        save_label_png(os.path.join(args.out, "gt", name + ".png"), source.masks[index])
    if args.overlays:
        Image.fromarray(overlay_strip(source.raw_image(index), cams, label)).save(
            os.path.join(args.out, "overlays", name + ".jpg"), quality=90)


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    state = load_checkpoint(args.checkpoint, map_location="cpu")
    config, train_args = state.get("model_config") or {}, state.get("args") or {}
    if not config:
        raise ValueError(f"{args.checkpoint} has no model_config: was it written by rca_fast.train?")
    model = build_model(config)
    load_model_state(model, state["model"], args.checkpoint)  # shapes checked, both named
    model.to(device).eval()
    num_classes = int(config["num_classes"])
    args.dataset = args.dataset or train_args.get("dataset", "synthetic")
    if args.bg_threshold is None:
        stored = state.get("cam_best_threshold")
        args.bg_threshold = float(stored) if stored is not None else DEFAULT_BG_THRESHOLD
    scales = parse_scales(args.scales)
    items, source = _dataset(args, train_args, num_classes)
    synthetic = args.dataset == "synthetic"
    dirs = ["cams", "pseudo"] + (["overlays"] if args.overlays else []) + (["gt"] if synthetic else [])
    for d in dirs:
        os.makedirs(os.path.join(args.out, d), exist_ok=True)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(args.threads))
    batch_size = max(1, args.batch_size) if synthetic else 1  # real images differ in size
    lines = []
    bar = tqdm(total=len(items), desc="CAMs", disable=not args.progress, dynamic_ncols=True)
    for first in range(0, len(items), batch_size):
        batch = collate([items[i] for i in range(first, min(first + batch_size, len(items)))])
        images = batch["image"].to(device)
        size = tuple(batch["size"][0]) if "size" in batch else tuple(images.shape[-2:])
        cams_all, logits = multiscale_cams(model, images, scales=scales, flip=args.flip, out_size=size)
        cams_all = normalise_cams(cams_all).cpu().numpy()
        for j, (name, index) in enumerate(zip(batch["name"], batch["index"])):
            keys = np.asarray(present_classes(batch["label"][j], logits[j].cpu()), np.int64)
            write_outputs(args, name, cams_all[j, keys].astype(np.float32), keys, source, index, synthetic)
            lines.append(" ".join([name] + [str(int(c)) for c in keys]))
        bar.update(len(batch["name"]))
    bar.close()
    with open(os.path.join(args.out, "list.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    summary = {"checkpoint": args.checkpoint, "dataset": args.dataset, "images": len(lines),
               "scales": list(scales), "flip": bool(args.flip), "bg_threshold": args.bg_threshold,
               "ignore_margin": args.ignore_margin, "num_classes": num_classes, "device": str(device),
               "class_names": list(state.get("class_names") or [])}
    with open(os.path.join(args.out, "infer.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote CAMs and pseudo labels of {len(lines)} images to {args.out} "
          f"(background threshold {args.bg_threshold:.2f})")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> dict:
    threads = torch.get_num_threads()
    try:
        return run(build_parser().parse_args(argv))
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    run_program(main)
