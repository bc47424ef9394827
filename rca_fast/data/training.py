"""The training and evaluation sets of ``python -m rca_fast.train`` from its parsed flags."""
from __future__ import annotations

import sys

from .synthetic import SyntheticShapes, class_names as synthetic_class_names
from .transforms import PublicTrainTransform, TrainTransform
from .voc import COCO_CLASSES, VOC_CLASSES, VOCClassification, VOCSegmentation, find_mask_dir


def build_datasets(args):
    """(train set, eval set or None, class names) for ``args.dataset``.

    The training transform follows ``--input-pipeline``: ``public`` = the public loader's (square
    resize, ColorJitter with hue in random order, nothing else; the synthetic scenes are already
    square: jitter only), ``augmented`` = rca_fast's earlier one (rescale, flip, crop; synthetic:
    flip only)."""
    public = getattr(args, "input_pipeline", "public") == "public"
    if args.dataset == "synthetic":
        train = SyntheticShapes(args.num_images, args.num_classes, args.input_size, seed=args.seed,
                                split="train", flip=not public, jitter=public)
        val = SyntheticShapes(args.val_images, args.num_classes, args.input_size, seed=args.seed,
                              split="val") if args.val_images else None
        return train, val, synthetic_class_names(args.num_classes)
    names = VOC_CLASSES if args.num_classes == 20 else COCO_CLASSES if args.num_classes == 80 else \
        [f"class {k}" for k in range(args.num_classes)]
    transform = (
        PublicTrainTransform(args.input_size) if public else TrainTransform(args.input_size, args.crop_size)
    )
    train = VOCClassification(args.train_list, args.img_dir, args.num_classes, transform,
                              cls_labels=args.cls_labels)
    val = None
    mask_dir = args.mask_dir or find_mask_dir(args.data_root)
    if args.test_list and mask_dir:
        val = VOCSegmentation(args.test_list, args.img_dir, args.num_classes, mask_dir=mask_dir,
                              long_side=args.input_size, cls_labels=args.cls_labels,
                              max_images=args.val_images or None)
        if any(label is None for label in val.labels):
            # CAMs are scored for the tagged classes: without tags there is nothing to score
            print(f"{args.test_list} has images without class tags (give the 'name c c ...' format or "
                  f"--cls-labels): CAM evaluation skipped", file=sys.stderr)
            val = None
    return train, val, list(names)
