"""The epoch loop of :class:`rca_fast.train.Trainer` with its schedules: the learning rate per
epoch (``--decay_points``), the data order and batches (``--input-pipeline``), the k-means refresh
of the prototypes at an epoch's start, the run over the epochs (``fit``: checkpoint per epoch,
``--att_dir`` maps, evaluation, ``metrics.json``) and the SIGINT / SIGTERM handling.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Dict

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import distributed
from ..data.collate import collate
from ..utils.checkpoint import capture_rng_state
from ..utils.program import stop_signals
from .step import LOSS_KEYS


class EpochLoop:
    """Mixin of :class:`rca_fast.train.Trainer`: schedules, data order, epochs, the whole run.  Uses the
    trainer's ``args``, ``optimizer``, ``model``, ``train_set`` / ``eval_set``, ``att_maps``, the
    position (``epoch``, ``epoch_done``, ``batch_in_epoch``, ``step``), ``train_step`` /
    ``after_step`` (the step), ``save`` (checkpointing) and ``evaluate`` (evaluation)."""

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

    # ---- data order (--input-pipeline) ----
    # public: the public loader's order -- the list order every epoch (shuffle=False) and the last
    #   partial batch kept, so every image is seen every epoch (under DDP the DistributedSampler
    #   pads the list with its first images to an equal share per rank, so all ranks step alike);
    # augmented: a fresh shuffle per (seed, epoch), full batches only.
    def shuffled(self) -> bool:
        return getattr(self.args, "input_pipeline", "public") != "public"

    def batches(self, epoch: int, skip: int = 0) -> DataLoader:
        """This rank's batches of the epoch (:func:`distributed.rank_batches`: the partial last one
        kept (public) or dropped (augmented)), the first ``skip`` left out."""
        batches = distributed.rank_batches(
            len(self.train_set), self.args.batch_size, self.args.seed, epoch, skip, shuffle=self.shuffled()
        )
        # own generator: the loader's base seed must not come from (and advance) the global RNG,
        # or a resumed run would draw differently from an uninterrupted one
        loader_gen = torch.Generator().manual_seed(self.args.seed * 100003 + epoch * 101 + self.rank)
        return DataLoader(self.train_set, batch_sampler=batches, num_workers=self.args.num_workers,
                          collate_fn=collate, pin_memory=self.device.type == "cuda",
                          persistent_workers=False, generator=loader_gen)

    def steps_per_epoch(self) -> int:
        bs = self.args.batch_size
        if not self.shuffled():  # public: ceil of the padded share (DistributedSampler, drop_last=False)
            return math.ceil(math.ceil(len(self.train_set) / self.world) / bs)
        return max(1, (len(self.train_set) // self.world) // bs)

    # ---- the epochs (k-means refresh at an epoch's start) ----
    def train_epoch(self, epoch: int, skip: int = 0) -> Dict[str, float]:
        """One epoch (from batch ``skip``); returns the mean loss terms and the bank rows written."""
        self.model.train()
        lr = self.set_lr(epoch)
        if self.att_maps is not None:
            self.att_maps.sync_exists()  # the last-epoch rule needs every rank's "exists" flags
        if self.args.aggregation_mode != "none" and skip == 0 and epoch >= self.args.aggregation_start_epoch:
            # public code: the randn prototypes in the first epoch, k-means of the bank (n_init 10)
            # at the start of every later one.  A resumed partial epoch keeps the prototypes its
            # start computed (restored with the model).  Warm start: one fixed seed (the first fit).
            seed = self.args.seed if self.args.kmeans_warm_start else self.args.seed * 1000 + epoch
            self.model.refresh_prototypes(seed=seed, n_init=self.args.kmeans_n_init,
                                          iters=getattr(self.args, "kmeans_iters", 300))
            zero_start = getattr(self.args, "aggregation_zero_start", False)
            if zero_start and epoch == self.args.aggregation_start_epoch:
                # the first k-means prototypes replace the earlier context at once; with the
                # aggregation's output conv zeroed the fused features do not jump, the context
                # enters as that conv learns (measured: the jump knocked whole runs back)
                with torch.no_grad():
                    self.model.aggregation.out.weight.zero_()
        sums = {k: 0.0 for k in LOSS_KEYS}
        rows, count, start = 0, 0, time.time()
        self.epoch, self.epoch_done, self.batch_in_epoch = epoch, False, skip
        total = self.steps_per_epoch()
        bar = tqdm(self.batches(epoch, skip), total=total, initial=skip,
                   desc=f"epoch {epoch}/{self.args.epoch}",
                   disable=not (self.args.progress and self.is_main), leave=False, dynamic_ncols=True,
                   mininterval=0.5)
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
            if self.batch_in_epoch >= total:
                self.epoch_done, self.batch_in_epoch = True, 0
            self.after_step()
            if self.args.max_steps is not None and self.step >= self.args.max_steps:
                break
        bar.close()
        self.epoch_done = self.epoch_done or self.batch_in_epoch >= total
        if self.epoch_done:
            self.batch_in_epoch = 0
        stats = {k: sums[k] / max(count, 1) for k in LOSS_KEYS}
        stats.update(bank_rows=rows, steps=count, lr=lr, seconds=time.time() - start)
        return stats

    # ---- the run (SIGINT / SIGTERM: checkpoint after the step) ----
    def request_stop(self, signum=None, frame=None) -> None:
        """SIGINT/SIGTERM handler: finish the current step, checkpoint, stop.  A second signal stops at
        once."""
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        name = signal.Signals(signum).name if signum is not None else "stop request"
        self.log.warning(f"{name}: saving a checkpoint after this step (send it again to abort without one)")

    def fit(self) -> Dict:
        """Train (Ctrl-C / SIGTERM: checkpoint and :class:`TrainingInterrupted`), evaluate on rank 0,
        write metrics."""
        try:
            with stop_signals(self.request_stop):
                return self._fit()
        finally:
            distributed.cleanup(self._created_group)

    def _fit(self) -> Dict:
        args = self.args
        start = time.time()
        self.log.info(f"training on {args.dataset} ({len(self.train_set)} images, {args.num_classes} "
                      "classes) "
                      f"on {self.device}" + (f" x {self.world} processes" if self.world > 1 else "") +
                      f": backbone {args.backbone}, contrast {'on' if args.contrast else 'off'}, "
                      f"mixup {'on' if args.mixup else 'off'}, aggregation {args.aggregation_mode}, "
                      f"bank {args.num_classes}x{args.bank_slots}x{self.model.feature_dim} "
                      f"{args.bank_dtype}, "
                      f"amp {'bf16' if args.amp else 'off'}, compile {'on' if args.compile else 'off'}, "
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
            if self.last_saved_step != self.step:
                self.save()
        # the RNG state where training stopped (evaluation below draws from the global RNG too)
        rng_at_stop = capture_rng_state()
        if self.att_maps is not None:
            self.att_maps.merge_ranks()
            if self.is_main:
                # a finished run only (a --max-steps stop is continued later by --resume)
                filled = (
                    self.att_maps.fill_missing(
                        self.model, self.train_set, args.batch_size, self.device, collate
                    )
                    if self.epoch >= args.epoch and self.epoch_done
                    else 0
                )
                if filled:
                    self.log.info(
                        f"--att_dir: {filled} tagged (image, class) pairs had no map after training "
                        f"(images not seen in the last epoch); written from one more forward pass"
                    )
                count = self.att_maps.write_pngs(progress=bool(args.progress))
                self.log.info(f"--att_dir: wrote {count} attention maps to {args.att_dir}")
        train_seconds = time.time() - start
        metrics = {"epochs": self.epoch, "epoch_done": self.epoch_done, "steps": self.step,
                   "train_seconds": round(train_seconds, 2), "history": history}
        if self.eval_set is not None and self.is_main:
            metrics.update(self.evaluate())
        else:
            metrics["cam_miou"] = None
            if self.eval_set is None:
                self.log.info("no images with masks to evaluate (give --test_list and a mask folder)")
        metrics["seconds"] = round(time.time() - start, 2)
        metrics.update(dataset=args.dataset, device=str(self.device), backbone=args.backbone,
                       contrast=bool(args.contrast), mixup=bool(args.mixup),
                       aggregation=args.aggregation_mode,
                       seed=args.seed, world_size=self.world,
                       cpu_threads=torch.get_num_threads() if self.device.type == "cpu" else None)
        self.save(extra={"cam_best_threshold": metrics.get("cam_best_threshold")}, rng=rng_at_stop)
        if self.is_main:
            with open(os.path.join(args.out, "metrics.json"), "w") as f:
                json.dump(metrics, f, indent=2)
        if metrics.get("cam_miou") is not None:
            self.log.info(f"CAM mIoU {100 * metrics['cam_miou']:.2f}% (background threshold "
                          f"{metrics['cam_best_threshold']:.2f}) on {metrics['cam_images']} images; "
                          f"{self.step} steps in {metrics['seconds']:.1f}s; wrote {args.out}/metrics.json")
        return metrics
