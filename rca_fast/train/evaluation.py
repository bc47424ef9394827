"""Evaluation of :class:`rca_fast.train.Trainer`: the CAM mIoU of the final head O on the images
with masks (multi-scale with flip), swept over background thresholds as ``rca_fast.evaluate`` does.
"""
from __future__ import annotations

import time
from typing import Dict

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.collate import collate
from ..utils.cams import multiscale_cams, normalise_cams, parse_scales
from ..utils.metrics import CamSweepMeter, format_iou_table


class CamEvaluation:
    """Mixin of :class:`rca_fast.train.Trainer`: ``evaluate``.  Uses the trainer's ``args``, ``model``,
    ``device``, ``eval_set``, ``class_names`` and ``log``."""

    @torch.no_grad()
    def evaluate(self) -> Dict:
        """CAM mIoU of the final head on ``eval_set`` (tags known), best background threshold."""
        args = self.args
        self.model.eval()
        scales = parse_scales(args.eval_scales)
        meter = CamSweepMeter(args.num_classes + 1)
        batch_size = 32 if args.dataset == "synthetic" else 1
        loader = DataLoader(self.eval_set, batch_size=batch_size, shuffle=False, collate_fn=collate,
                            num_workers=0 if args.dataset == "synthetic" else min(args.num_workers, 4))
        start = time.time()
        for batch in tqdm(loader, desc="CAM eval", disable=not args.progress, leave=False,
                          dynamic_ncols=True):
            images = batch["image"].to(self.device)
            out_size = tuple(batch["mask"].shape[-2:])
            labels = batch["label"]
            cams, _ = multiscale_cams(self.model, images, scales=scales, flip=True, out_size=out_size)
            cams = normalise_cams(cams, labels.to(cams.device)).cpu().numpy()
            for i in range(images.shape[0]):
                keys = np.flatnonzero(labels[i].numpy() > 0)
                meter.update(cams[i, keys], keys, batch["mask"][i].numpy())
        res = meter.result()
        self.model.train()
        names = ["background"] + list(self.class_names)
        self.log.info("per-class IoU at the best threshold:\n" + format_iou_table(res["per_class_iou"], names,
                                                                                  res["miou"]))
        return {"cam_miou": res["miou"], "cam_best_threshold": res["best_threshold"],
                "cam_per_class_iou": dict(zip(names, res["per_class_iou"])),
                "cam_miou_per_threshold": res["miou_per_threshold"], "cam_images": len(self.eval_set),
                "eval_seconds": round(time.time() - start, 2)}
