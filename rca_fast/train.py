"""``python -m rca_fast.train``: train RCA, checkpoint every epoch, report the CAM mIoU.

Schedule (DESIGN §2), epochs counted from 1:
  * at the start of every epoch: learning rates set from ``--decay_points`` (x0.1 after each),
    then ``model.refresh_prototypes`` (k-means of the bank) when aggregation is on;
  * every step: forward with the tags, ``rca_loss`` (the contrast term from
    ``--contrast-start-epoch`` = 2 on), backward, SGD step, then ``model.update_bank(out)``
    (the coarse CAM's region rows whose class score passes the threshold).  The bank is a
    buffer: it never requires grad (checked every step -- the public code crashed on that);
  * after every epoch and at the end: ``OUT/checkpoint.pt``; at the end the CAM mIoU of the
    final head O on images with masks, swept over background thresholds as
    ``rca_fast.evaluate`` does, written to ``OUT/metrics.json``.

Importable: ``rca_fast.train.main(argv) -> metrics dict``; :class:`Trainer` holds the parts.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data import (SyntheticShapes, TrainTransform, VOCClassification, VOCSegmentation, find_mask_dir,
                   synthetic_class_names, COCO_CLASSES, VOC_CLASSES)
from .model.losses import rca_loss
from .utils.cams import multiscale_cams, normalise_cams, parse_scales
from .utils.checkpoint import load_checkpoint, save_checkpoint, dtype_name
from .utils.logs import get_logger
from .utils.metrics import CamSweepMeter, format_iou_table
from .utils.train_args import parse_args

LOSS_KEYS = ("loss", "cls", "coarse_cls", "contrast")


def collate(items: List[Dict]) -> Dict:
    """Stack tensor fields; keep names, indices, sizes (and missing labels) as lists."""
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if all(isinstance(v, torch.Tensor) for v in values):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


def model_config(args) -> Dict:
    """RCAModel keyword arguments from the flags (plain values: stored in checkpoints)."""
    return dict(num_classes=args.num_classes, backbone=args.backbone, bank_slots=args.bank_slots,
                prototypes=args.prototypes, gamma=args.gamma, score_threshold=args.score_threshold,
                temperature=args.temperature, contrast=bool(args.contrast), mixup=bool(args.mixup),
                mixup_alpha=args.mixup_alpha, aggregation=args.aggregation_mode,
                shared_final_head=bool(args.shared_final_head), bank_dtype=dtype_name(torch.float32))


def build_model(config: Dict, pretrained: Optional[str] = None):
    """An RCAModel from a :func:`model_config` dict (as stored in a checkpoint)."""
    from .model.rca import RCAModel
    from .utils.checkpoint import dtype_from_name

    kwargs = dict(config)
    kwargs["bank_dtype"] = dtype_from_name(kwargs.get("bank_dtype", "float32"))
    return RCAModel(pretrained=pretrained, **kwargs)


def kaiming_init_(model: torch.nn.Module) -> None:
    """He-normal (fan-in, ReLU) weights and zero biases for every conv and linear layer.

    Why: the tiny backbone and the CAM heads have no normalisation layers; under PyTorch's
    default init each conv + ReLU shrinks the signal about 2.4x, so across the 8 layers from
    image to CAM it all but vanishes and SGD stays at the class prior.  He-normal keeps the
    scale, and the network learns.  (VGG16/ResNet50 come with their own init or weights.)
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)


def cpu_threads(requested: int) -> int:
    """Threads for torch on the CPU: ``requested``, or (0) the cores other processes leave free.

    On a shared machine, more threads than free cores make every OpenMP barrier wait on a
    descheduled thread: measured here, 2 threads on 2 busy cores ran 7x slower than 1.
    """
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def build_datasets(args):
    """(train set, eval set or None, class names) for ``args.dataset``."""
    if args.dataset == "synthetic":
        train = SyntheticShapes(args.num_images, args.num_classes, args.input_size, seed=args.seed,
                                split="train", flip=True)
        val = SyntheticShapes(args.val_images, args.num_classes, args.input_size, seed=args.seed,
                              split="val") if args.val_images else None
        return train, val, synthetic_class_names(args.num_classes)
    names = VOC_CLASSES if args.num_classes == 20 else COCO_CLASSES if args.num_classes == 80 else \
        [f"class {k}" for k in range(args.num_classes)]
    transform = TrainTransform(args.input_size, args.crop_size)
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


class Trainer:
    """Builds data, model and optimiser from parsed flags; :meth:`fit` trains and evaluates."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        os.makedirs(args.out, exist_ok=True)
        self.log = get_logger(os.path.join(args.out, "train.log"))
        random.seed(args.seed)
        np.random.seed(args.seed % 2 ** 32)
        torch.manual_seed(args.seed)
        self.train_set, self.eval_set, self.class_names = build_datasets(args)
        self.config = model_config(args)
        self.model = build_model(self.config, args.pretrained)
        if args.init == "kaiming" or (args.init == "auto" and args.backbone == "tiny" and not args.pretrained):
            kaiming_init_(self.model)
        if args.bank_init == "zeros":
            self.model.bank.bank.zero_()
        self.model.to(self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(args.threads))
        self.optimizer = torch.optim.SGD(self.model.param_groups(args.lr, args.weight_decay), lr=args.lr,
                                         momentum=0.9, weight_decay=args.weight_decay, nesterov=True)
        self.uses_bank = bool(args.contrast) or args.aggregation_mode != "none"
        self.epoch = 0            # last epoch (1-based) that ran, fully or partly
        self.epoch_done = True    # whether it finished
        self.batch_in_epoch = 0   # batches of it that ran when it did not
        self.step = 0
        self.seconds = 0.0        # training time of earlier runs (resume)
        if args.resume:
            self.load(args.resume)

    # ---- state ----
    def load(self, path: str) -> None:
        state = load_checkpoint(path, map_location=self.device)
        if state.get("model_config") and state["model_config"] != self.config:
            diff = {k: (state["model_config"].get(k), v) for k, v in self.config.items()
                    if state["model_config"].get(k) != v}
            raise ValueError(f"--resume {path}: the checkpoint's model differs from these flags "
                             f"(checkpoint, flags): {diff}")
        self.model.load_state_dict(state["model"])
        if state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.epoch_done = bool(state.get("epoch_done", True))
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        self.seconds = float(state.get("seconds", 0.0))
        torch.manual_seed(self.args.seed + self.step)  # fresh mixup draws, not a replay of the first run's
        self.log.info(f"resumed from {path}: epoch {self.epoch} ({'done' if self.epoch_done else 'partial'}), "
                      f"step {self.step}")

    def save(self, extra: Optional[Dict] = None) -> str:
        path = os.path.join(self.args.out, "checkpoint.pt")
        return save_checkpoint(path, model=self.model, optimizer=self.optimizer, epoch=self.epoch,
                               step=self.step, epoch_done=self.epoch_done, batch_in_epoch=self.batch_in_epoch,
                               model_config=self.config, args=vars(self.args),
                               extra=dict(seconds=self.seconds, class_names=self.class_names, **(extra or {})))

    # ---- schedule ----
    def lr_factor(self, epoch: int) -> float:
        """0.1 ** (number of decay points the epoch is past): decay "5,10" -> epochs 1-5 x1,
        6-10 x0.1, 11- x0.01 (the public code's steps, counted from 1)."""
        return 0.1 ** sum(epoch > d for d in self.args.decay_points_list)

    def set_lr(self, epoch: int) -> float:
        factor = self.lr_factor(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = self.args.lr * group.get("lr_mult", 1.0) * factor
        return self.args.lr * factor

    def batches(self, epoch: int, skip: int = 0) -> DataLoader:
        """The epoch's batches in a shuffled order fixed by (seed, epoch), the first ``skip`` left out."""
        n, bs = len(self.train_set), self.args.batch_size
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.args.seed * 100003 + epoch)).tolist()
        usable = (n // bs) * bs if n >= bs else n  # full batches only (BatchNorm in the projector)
        batches = [order[i:i + bs] for i in range(0, usable, bs)][skip:]
        return DataLoader(self.train_set, batch_sampler=batches, num_workers=self.args.num_workers,
                          collate_fn=collate, pin_memory=self.device.type == "cuda",
                          persistent_workers=False)

    def steps_per_epoch(self) -> int:
        n, bs = len(self.train_set), self.args.batch_size
        return max(1, n // bs)

    # ---- training ----
    def train_step(self, batch: Dict, epoch: int) -> Dict[str, float]:
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True).float()
        out = self.model(images, labels)
        loss, parts = rca_loss(out, labels, epoch, coarse_weight=self.args.coarse_weight,
                               contrast_weight=self.args.contrast_weight,
                               contrast_start_epoch=self.args.contrast_start_epoch)
        if not math.isfinite(parts["loss"]):
            raise FloatingPointError(f"loss is {parts['loss']} at epoch {epoch}, step {self.step + 1} "
                                     f"(terms: {parts}); lower --lr?")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        rows = self.model.update_bank(out) if self.uses_bank else 0
        if self.model.bank.bank.requires_grad:
            raise RuntimeError("the memory bank requires grad after the update; it must stay a buffer")
        parts["bank_rows"] = float(rows)
        return parts

    def train_epoch(self, epoch: int, skip: int = 0) -> Dict[str, float]:
        """One epoch (from batch ``skip``); returns the mean loss terms and the bank rows written."""
        self.model.train()
        lr = self.set_lr(epoch)
        if self.args.aggregation_mode != "none":
            self.model.refresh_prototypes(seed=self.args.seed * 1000 + epoch)
        sums = {k: 0.0 for k in LOSS_KEYS}
        rows, count, start = 0, 0, time.time()
        self.epoch, self.epoch_done, self.batch_in_epoch = epoch, False, skip
        total = self.steps_per_epoch()
        bar = tqdm(self.batches(epoch, skip), total=total, initial=skip, desc=f"epoch {epoch}/{self.args.epoch}",
                   disable=not self.args.progress, leave=False, dynamic_ncols=True, mininterval=0.5)
        for batch in bar:
            parts = self.train_step(batch, epoch)
            self.step += 1
            self.batch_in_epoch += 1
            count += 1
            rows += int(parts["bank_rows"])
            for k in LOSS_KEYS:
                sums[k] += parts[k]
            bar.set_postfix({"loss": f"{parts['loss']:.3f}", "cls": f"{parts['cls']:.3f}",
                             "coarse": f"{parts['coarse_cls']:.3f}", "nce": f"{parts['contrast']:.3f}"},
                            refresh=False)
            if self.args.max_steps is not None and self.step >= self.args.max_steps:
                break
        bar.close()
        self.epoch_done = self.batch_in_epoch >= total
        if self.epoch_done:
            self.batch_in_epoch = 0
        stats = {k: sums[k] / max(count, 1) for k in LOSS_KEYS}
        stats.update(bank_rows=rows, steps=count, lr=lr, seconds=time.time() - start)
        return stats

    def fit(self) -> Dict:
        args = self.args
        start = time.time()
        self.log.info(f"training on {args.dataset} ({len(self.train_set)} images, {args.num_classes} classes) "
                      f"on {self.device}: backbone {args.backbone}, contrast {'on' if args.contrast else 'off'}, "
                      f"mixup {'on' if args.mixup else 'off'}, aggregation {args.aggregation_mode}, "
                      f"bank {args.num_classes}x{args.bank_slots}x{self.model.feature_dim}, "
                      f"{args.epoch} epochs x {self.steps_per_epoch()} steps, out {args.out}"
                      + (f", {torch.get_num_threads()} CPU threads" if self.device.type == "cpu" else ""))
        first = self.epoch + 1 if self.epoch_done else max(self.epoch, 1)
        skip = 0 if self.epoch_done else self.batch_in_epoch
        history = []
        for epoch in range(first, args.epoch + 1):
            if args.max_steps is not None and self.step >= args.max_steps:
                break
            stats = self.train_epoch(epoch, skip)
            skip = 0
            self.seconds += stats["seconds"]
            history.append(dict(epoch=epoch, **stats))
            self.log.info(f"epoch {epoch}/{args.epoch}  loss {stats['loss']:.4f}  cls {stats['cls']:.4f}  "
                          f"coarse_cls {stats['coarse_cls']:.4f}  contrast {stats['contrast']:.4f}  "
                          f"lr {stats['lr']:.2e}  bank rows {stats['bank_rows']}  steps {self.step}  "
                          f"{stats['seconds']:.1f}s")
            self.save()
        train_seconds = time.time() - start
        metrics = {"epochs": self.epoch, "epoch_done": self.epoch_done, "steps": self.step,
                   "train_seconds": round(train_seconds, 2), "history": history}
        if self.eval_set is not None:
            metrics.update(self.evaluate())
        else:
            metrics["cam_miou"] = None
            self.log.info("no images with masks to evaluate (give --test_list and a mask folder)")
        metrics["seconds"] = round(time.time() - start, 2)
        metrics.update(dataset=args.dataset, device=str(self.device), backbone=args.backbone,
                       contrast=bool(args.contrast), mixup=bool(args.mixup), aggregation=args.aggregation_mode,
                       seed=args.seed)
        self.save(extra={"cam_best_threshold": metrics.get("cam_best_threshold")})
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        if metrics.get("cam_miou") is not None:
            self.log.info(f"CAM mIoU {100 * metrics['cam_miou']:.2f}% (background threshold "
                          f"{metrics['cam_best_threshold']:.2f}) on {metrics['cam_images']} images; "
                          f"{self.step} steps in {metrics['seconds']:.1f}s; wrote {args.out}/metrics.json")
        return metrics

    # ---- evaluation ----
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
        for batch in tqdm(loader, desc="CAM eval", disable=not args.progress, leave=False, dynamic_ncols=True):
            images = batch["image"].to(self.device)
            out_size = tuple(batch["mask"].shape[-2:])
            labels = batch["label"]
            cams, _ = multiscale_cams(self.model, images, scales=scales, flip=True, out_size=out_size)
            cams = normalise_cams(cams, labels.to(cams.device)).cpu().numpy()
            for i in range(images.shape[0]):
                keys = np.flatnonzero(labels[i].numpy() > 0)
                meter.update(cams[i, keys], keys, batch["mask"][i].numpy())
                if args.att_dir:
                    self._write_attention(batch["name"][i], cams[i], keys)
        res = meter.result()
        self.model.train()
        names = ["background"] + list(self.class_names)
        self.log.info("per-class IoU at the best threshold:\n" + format_iou_table(res["per_class_iou"], names,
                                                                                  res["miou"]))
        return {"cam_miou": res["miou"], "cam_best_threshold": res["best_threshold"],
                "cam_per_class_iou": dict(zip(names, res["per_class_iou"])),
                "cam_miou_per_threshold": res["miou_per_threshold"], "cam_images": len(self.eval_set),
                "eval_seconds": round(time.time() - start, 2)}

    def _write_attention(self, name: str, cams: np.ndarray, keys: Sequence[int]) -> None:
        from PIL import Image

        os.makedirs(self.args.att_dir, exist_ok=True)
        for c in keys:
            Image.fromarray((cams[c] * 255 + 0.5).clip(0, 255).astype(np.uint8)).save(
                os.path.join(self.args.att_dir, f"{name}_{c}.png"))


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Parse ``argv`` (default: sys.argv[1:]), train, evaluate; returns the metrics dict."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return Trainer(args).fit()
    finally:
        torch.set_num_threads(threads)  # the trainer may lower it on a busy CPU; leave callers as they were


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
