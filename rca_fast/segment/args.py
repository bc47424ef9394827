"""Flags of ``python -m rca_fast.segment`` and their dataset-dependent defaults."""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import torch

from ..model.segmentation import SEG_BACKBONES
from ..utils.cams import parse_scales
from ..utils.program import check_at_least

# DeepLab-v2 on VOC as the WSSS papers train it: batch 10 crops of 321, SGD lr 2.5e-4 (x10 on
# the ASPP), momentum 0.9, wd 5e-4, poly 0.9 over 20k iterations, scales 0.5-1.5.  The synthetic
# defaults train the tiny net in a couple of minutes on one CPU thread.
DATASET_DEFAULTS = {
    "synthetic": dict(num_classes=6, backbone="tiny", crop_size=96, batch_size=8, lr=0.02, steps=800,
                      scales="0.75,1.0,1.25", save_every=400, num_workers=0),
    "voc": dict(num_classes=20, backbone="deeplabv2-resnet101", crop_size=321, batch_size=10, lr=2.5e-4,
                steps=20000, scales="0.5,0.75,1.0,1.25,1.5", save_every=1000, num_workers=4),
    "coco": dict(num_classes=80, backbone="deeplabv2-resnet101", crop_size=321, batch_size=10, lr=2.5e-4,
                 steps=100000, scales="0.5,0.75,1.0,1.25,1.5", save_every=2000, num_workers=4),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rca_fast.segment",
        description="Step 3 of the workflow: train a segmentation network on proxy labels "
                    "(rca_fast.pseudo's PNGs, 255 = ignore) and report its mIoU on the validation images.")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=tuple(DATASET_DEFAULTS), default="voc")
    d.add_argument("--images", required=True, help="folder of <name>.jpg images (train and val)")
    d.add_argument("--labels", default=None, help="folder of the training label PNGs (the proxy labels)")
    d.add_argument("--train_list", default=None, help="training image names (first token of each line)")
    d.add_argument("--val_list", default=None, help="validation image names")
    d.add_argument("--gt", default=None, help="folder of the validation ground-truth PNGs")
    d.add_argument("--out", required=True, help="folder for checkpoints, metrics.json, predictions")
    d.add_argument(
        "--num-classes", type=int, default=None, help="foreground classes (synthetic 6, voc 20, coco 80)"
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--backbone",
        choices=SEG_BACKBONES,
        default=None,
        help="deeplabv2-resnet101 (voc/coco default), deeplabv3-resnet50 (torchvision), tiny (synthetic)",
    )
    m.add_argument(
        "--pretrained", default=None, help="local ImageNet state dict of the backbone (never downloaded)"
    )
    m.add_argument("--freeze-bn", choices=("auto", "on", "off"), default="auto",
                   help="deeplabv2: frozen BatchNorm (auto: on with --pretrained)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=None, help="training iterations = the poly schedule's length "
                                                           "(voc 20000, coco 100000, synthetic 800)")
    o.add_argument("--max-steps", type=int, default=None,
                   help="stop at this step (checkpoint written, schedule unchanged; --resume continues)")
    o.add_argument("--batch-size", type=int, default=None, help="per process (voc 10)")
    o.add_argument("--crop-size", type=int, default=None, help="square training crop (voc 321)")
    o.add_argument("--scale-range", default="0.5,1.5", help="random scale range of the training images")
    o.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flip")
    o.add_argument("--lr", type=float, default=None, help="base learning rate (voc 2.5e-4)")
    o.add_argument("--new-lr-mult", type=float, default=10.0, help="learning-rate factor of the new layers")
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--weight-decay", type=float, default=5e-4)
    o.add_argument("--poly-power", type=float, default=0.9, help="lr = base * (1 - step / steps) ** power")
    o.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("running")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    r.add_argument("--num-workers", type=int, default=None)
    r.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    r.add_argument("--amp", action="store_true", help="bf16 autocast of the forward passes")
    r.add_argument("--compile", action="store_true", help="torch.compile the network")
    r.add_argument(
        "--save-every", type=int, default=None, help="checkpoint every N steps (0 = only at the end)"
    )
    r.add_argument("--keep", type=int, default=2, help="numbered checkpoints kept")
    r.add_argument("--resume", default=None, help="checkpoint path, or 'auto' = the newest in --out")
    r.add_argument("--eval-only", action="store_true", help="only evaluate the --resume checkpoint")
    r.add_argument("--no-progress", dest="progress", action="store_false")
    e = p.add_argument_group("evaluation")
    e.add_argument("--scales", default=None, help="multi-scale evaluation scales (voc 0.5,0.75,1.0,1.25,1.5)")
    e.add_argument("--no-eval-flip", dest="eval_flip", action="store_false", help="multi-scale without flips")
    e.add_argument(
        "--crf", action="store_true", help='dense CRF on the multi-scale scores (pip install ".[crf]")'
    )
    e.add_argument("--overlays", type=int, default=16, help="overlay pictures written (-1 all, 0 none)")
    return p


def _floats(text: str, flag: str) -> tuple:
    """Comma-separated positive numbers (rca_fast.utils.cams.parse_scales), errors naming ``flag``."""
    try:
        return parse_scales(text)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the dataset defaults and check the values; ValueError naming the flag."""
    for key, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")
    args.scale_range = _floats(args.scale_range, "--scale-range")
    if len(args.scale_range) != 2 or args.scale_range[0] > args.scale_range[1]:
        raise ValueError(f"--scale-range must be 'low,high' with low <= high, got {args.scale_range}")
    args.scales = _floats(args.scales, "--scales")
    check_at_least((("--num-classes", args.num_classes, 1), ("--steps", args.steps, 1),
                    ("--batch-size", args.batch_size, 1), ("--crop-size", args.crop_size, 8),
                    ("--num-workers", args.num_workers, 0), ("--save-every", args.save_every, 0),
                    ("--keep", args.keep, 1), ("--threads", args.threads, 0)))
    if args.max_steps is not None and args.max_steps < 0:
        raise ValueError(f"--max-steps must be >= 0, got {args.max_steps}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.eval_only:
        if not args.resume:
            raise ValueError("--eval-only needs --resume PATH (the checkpoint to evaluate)")
    else:
        for flag, value in (("--labels", args.labels), ("--train_list", args.train_list)):
            if value is None:
                raise ValueError(f"{flag} is required for training (or give --eval-only --resume PATH)")
    if (args.val_list is None) != (args.gt is None):
        raise ValueError("--val_list and --gt go together (the validation images and their ground truth)")
    if args.eval_only and args.val_list is None:
        raise ValueError("--eval-only needs --val_list and --gt")
    for flag, folder in (("--images", args.images), ("--labels", args.labels), ("--gt", args.gt)):
        if folder is not None and not os.path.isdir(folder):
            raise FileNotFoundError(f"{flag} folder not found: {folder}")
    args.freeze_bn = None if args.freeze_bn == "auto" else args.freeze_bn == "on"
    return args


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return resolve_args(build_parser().parse_args(argv))
