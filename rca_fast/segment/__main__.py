"""``python -m rca_fast.segment``: train a segmentation network on proxy labels, report its mIoU.

    python -m rca_fast.segment --dataset voc --images VOC2012/JPEGImages --labels runs/voc/proxy \\
        --train_list train_cls.txt --val_list val_cls.txt --gt VOC2012/SegmentationClassAug \\
        --backbone deeplabv2-resnet101 --pretrained resnet101_imagenet.pth --out runs/voc/seg

Trains ``--steps`` SGD iterations (poly schedule, 10x lr on the new layers, random scale / crop /
flip, 255 ignored) with atomic checkpoints (``OUT/checkpoint.pt``, ``--resume auto``), then on the
validation list writes ``OUT/metrics.json`` (mIoU and per-class IoU: single scale, multi-scale +
flip, and with ``--crf`` the dense CRF), ``OUT/pred/<name>.png`` (VOC palette) and
``OUT/overlays/<name>.jpg``.  Under ``torchrun --nproc_per_node N -m rca_fast.segment`` it trains
with DDP (each rank its share of every epoch; rank 0 writes and evaluates).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, Optional, Sequence

import torch

from .. import distributed
from ..data.seg_pairs import SegmentationPairs
from ..data.synthetic import class_names as synthetic_class_names
from ..data.voc import COCO_CLASSES, VOC_CLASSES
from ..utils.palette import class_names_for
from .args import parse_args
from .predict import evaluate
from .trainer import SegmentationInterrupted, SegTrainer


def class_names(dataset: str, num_fg: int) -> list:
    """Background + the dataset's class names (``class k`` where none are known)."""
    known = {"synthetic": synthetic_class_names(num_fg), "voc": VOC_CLASSES, "coco": COCO_CLASSES}.get(
        dataset
    )
    return class_names_for(num_fg, known)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Parse ``argv``, train (unless ``--eval-only``), evaluate on rank 0; returns the metrics dict."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    trainer = SegTrainer(args)
    try:
        metrics: Dict = {
            "dataset": args.dataset,
            "backbone": trainer.config["backbone"],
            "device": str(trainer.device),
            "world_size": trainer.world,
            "steps_planned": args.steps,
        }
        if not args.eval_only:
            metrics.update(trainer.fit())
        else:
            metrics["steps"] = trainer.step
        if args.val_list and trainer.is_main:
            val = SegmentationPairs(args.val_list, args.images, args.gt, trainer.num_classes, train=False)
            metrics["eval"] = evaluate(
                trainer.model,
                val,
                args.out,
                class_names(args.dataset, args.num_classes),
                device=trainer.device,
                scales=args.scales,
                flip=args.eval_flip,
                crf=args.crf,
                amp=args.amp,
                overlays=args.overlays,
                progress=args.progress,
                log=trainer.log,
            )
            metrics["miou"] = metrics["eval"]["miou"]
        if trainer.is_main:
            metrics["cpu_threads"] = torch.get_num_threads() if trainer.device.type == "cpu" else None
            with open(os.path.join(args.out, "metrics.json"), "w") as f:
                json.dump(metrics, f, indent=2)
        if distributed.is_distributed():
            torch.distributed.barrier()  # the other ranks wait for rank 0's evaluation
        return metrics
    finally:
        distributed.cleanup(trainer._created_group)
        torch.set_num_threads(threads)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except SegmentationInterrupted as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        sys.exit(130)
    except FloatingPointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
