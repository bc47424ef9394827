"""``python -m rca_fast.train``: train RCA, checkpoint every epoch, report the CAM mIoU.

Schedule (DESIGN §2), epochs counted from 1:
  * at the start of every epoch: learning rates set from ``--decay_points`` (x0.1 after each),
    then, when aggregation is on and the epoch is >= ``--aggregation-start-epoch`` (2),
    ``model.refresh_prototypes`` (k-means of the bank, n_init 10; the first epoch keeps the
    randn prototypes, as the public code);
  * every step: forward with the tags, ``rca_loss`` (the contrast term from
    ``--contrast-start-epoch`` = 3 on, as the public code's 0-based ``epoch >= 2``), backward,
    SGD step, then ``model.update_bank(out)`` (the coarse CAM's region rows whose FINAL-head
    class score passes the threshold).  The bank is a
    buffer: it never requires grad (checked every step);
  * after every epoch, every ``--save-every`` steps and at the end: an atomic checkpoint
    ``OUT/checkpoint_step<N>.pt`` (the last ``--keep`` kept; ``OUT/checkpoint.pt`` is the newest)
    with model, bank, optimiser, schedule, sampler position and every RNG state, so
    ``--resume PATH|auto`` continues bit-identically, mid-epoch included;
  * Ctrl-C / SIGTERM: checkpoint after the current step, exit 130; a non-finite loss stops the
    run before its update (the last checkpoint stays the good one);
  * at the end the CAM mIoU of the final head O on images with masks, swept over background
    thresholds as ``rca_fast.evaluate`` does, written to ``OUT/metrics.json``.

Data (``--input-pipeline``): ``public`` = the public loader (square resize, colour jitter with hue,
list order, last partial batch kept); ``augmented`` = rescale/flip/crop, shuffled, full batches.
``--att_dir``: the public max-accumulated training maps, with a map for every tagged class
(``AttentionMaps.fill_missing``).  ``--backbone vgg16|resnet50`` needs ``--pretrained PATH|none``.

Under ``torchrun --nproc_per_node N -m rca_fast.train`` the model runs in DDP (NCCL / gloo),
each rank reads its DistributedSampler share, the bank stays identical through the rank-ordered
gather of ``MemoryBank.update`` (checked every ``--check-bank-every`` steps), only rank 0 writes.
``--amp``: bf16 autocast of the forward; ``--compile``: torch.compile of the model.

Importable: ``rca_fast.train.main(argv) -> metrics dict``; :class:`Trainer` holds the parts.
This package is the training layer (shared by the programs: the profiler's step mode and the
method check build a Trainer); the program is ``rca_fast/train/__main__.py``.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import distributed
from ..data.collate import collate
from ..data.training import build_datasets
from ..model.config import build_model, kaiming_init_, model_config
from ..model.losses import rca_loss
from ..utils.att_maps import AttentionMaps
from ..utils.cams import multiscale_cams, normalise_cams, parse_scales
from ..utils.checkpoint import (
    LATEST_NAME,
    capture_rng_state,
    load_checkpoint,
    load_model_state,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)
from ..utils.metrics import CamSweepMeter, format_iou_table
from ..utils.threads import cpu_threads
from ..utils.train_args import parse_args, require_pretrained

LOSS_KEYS = ("loss", "cls", "coarse_cls", "contrast")




class TrainingInterrupted(Exception):
    """Raised after Ctrl-C (SIGINT) once the checkpoint of the last finished step is written."""

    def __init__(self, path: Optional[str], step: int):
        super().__init__(f"interrupted at step {step}; checkpoint {path} written -- continue with "
                         f"--resume {path} (or --resume auto)")
        self.path, self.step = path, step


class Trainer:
    """Builds data, model and optimiser from parsed flags; :meth:`fit` trains and evaluates.

    Under torchrun (WORLD_SIZE > 1) the model runs in DistributedDataParallel, each rank reads
    its share of every epoch through a DistributedSampler, and only rank 0 writes files.
    """

    def __init__(self, args):
        self.args = args
        self.device, self._created_group, self.rank, self.world, self.log = distributed.start(
            args.device, args.out, "train.log")
        self.is_main = self.rank == 0
        random.seed(args.seed)
        np.random.seed(args.seed % 2 ** 32)
        torch.manual_seed(args.seed)
        self.train_set, self.eval_set, self.class_names = build_datasets(args)
        # --att_dir: running maxima of the training images' final maps (rca_fast.utils.att_maps)
        self.att_maps = AttentionMaps(args.att_dir, self.train_set.names, args.num_classes, args.input_size,
                                      args.epoch) if args.att_dir else None
        self.config = model_config(args)
        # before the model is built: a VGG16/ResNet50 run without ImageNet weights stops here unless
        # it says --pretrained none (or resumes: the checkpoint holds the weights)
        resume = self.resolve_resume(args.resume)
        require_pretrained(args, resuming=bool(resume))
        self.model = build_model(self.config, args.pretrained)
        if args.init == "kaiming" or (args.init == "auto" and args.backbone == "tiny"):
            kaiming_init_(self.model, keep_pretrained=bool(args.pretrained))
        if args.bank_init == "zeros":
            self.model.bank.bank.zero_()
        self.model.to(self.device)
        if self.world > 1:
            # the model is identical everywhere (same seed; DDP also broadcasts rank 0's), but the
            # augmentation and mixup draws should differ between ranks
            torch.manual_seed(args.seed + 1000003 * self.rank)
            np.random.seed((args.seed + 1000003 * self.rank) % 2 ** 32)
            random.seed(args.seed + 1000003 * self.rank)
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
        self.last_saved_step = -1
        self.stop_requested = False
        self.stop_agreed = False  # a stop every rank knows of (train_step's all-reduce)
        if resume:
            self.load(resume)
        self.forward_model = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            # broadcast_buffers=False: the bank is kept identical by MemoryBank.update's rank-ordered
            # gather (checked by --check-bank-every), so re-broadcasting L*S*D every forward is waste.
            # find_unused_parameters: before the contrast term starts the projector gets no gradient.
            self.forward_model = DDP(self.model,
                                     device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                     broadcast_buffers=False, find_unused_parameters=True)
        if args.compile:
            self.forward_model = torch.compile(self.forward_model, backend=args.compile_backend)

    # ---- state ----
    def resolve_resume(self, resume: Optional[str]) -> Optional[str]:
        """``--resume``: a path, or "auto" = the newest checkpoint in ``--out`` (None when there is none)."""
        return resolve_resume(resume, self.args.out, self.log)

    def load(self, path: str) -> None:
        state = load_checkpoint(path, map_location=self.device)
        ckpt_bank = state["model"].get("bank.bank")
        shapes = (f"; memory bank (classes, slots, dim): checkpoint {tuple(ckpt_bank.shape)}, these flags "
                  f"{tuple(self.model.bank.bank.shape)}") if ckpt_bank is not None else ""
        # keys missing from an older checkpoint's config are the public recipe's values
        public = {"attention_scale": "sqrt", "prototype_init": "randn", "first_write": "ema",
                  "kmeans_warm_start": False}
        saved = dict(public, **(state.get("model_config") or {}))
        if state.get("model_config") and saved != self.config:
            diff = {k: (saved.get(k), v) for k, v in self.config.items() if saved.get(k) != v}
            raise ValueError(f"--resume {path}: the checkpoint's model differs from these flags "
                             f"(checkpoint, flags): {diff}{shapes}")
        load_model_state(self.model, state["model"], path)
        if state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.epoch_done = bool(state.get("epoch_done", True))
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        self.seconds = float(state.get("seconds", 0.0))
        if self.att_maps is not None and state.get("att_maps"):
            self.att_maps.load_state_dict(state["att_maps"])
        elif self.att_maps is not None and self.epoch >= self.att_maps.start_epoch:
            self.log.warning(f"--att_dir: {path} was trained without --att_dir through epoch {self.epoch}: "
                             "the "
                             f"maps hold only the epochs from here on, not the maximum since epoch "
                             f"{self.att_maps.start_epoch}")
        self.last_saved_step = self.step
        per_rank = state.get("rng_per_rank") or []
        if len(per_rank) == self.world:
            restore_rng_state(per_rank[self.rank])
        elif state.get("rng") and self.world == 1:
            restore_rng_state(state["rng"])
        else:  # older checkpoint or another world size: fresh draws, not a replay of the first run's
            torch.manual_seed(self.args.seed + self.step + 1000003 * self.rank)
            self.log.warning(f"{path}: no RNG state for {self.world} process(es); the random draws of the "
                             f"continued run are fresh, so it is not bit-identical to an uninterrupted one")
        sampler = state.get("sampler") or {}
        if not self.epoch_done and sampler.get("world_size", self.world) != self.world:
            self.log.warning(f"{path} stopped mid-epoch with {sampler.get('world_size')} processes, resumed "
                             "with "
                             f"{self.world}: the rest of epoch {self.epoch} is skipped by batch count only")
        self.log.info(f"resumed from {path}: epoch {self.epoch} "
                      f"({'done' if self.epoch_done else 'partial'}), "
                      f"step {self.step}")

    def save(self, extra: Optional[Dict] = None, rng: Optional[Dict] = None) -> Optional[str]:
        """Checkpoint (collective under torch.distributed: every rank's RNG state is gathered; rank 0
        writes)."""
        rng = rng if rng is not None else capture_rng_state()
        per_rank = None
        if self.world > 1:
            per_rank = [None] * self.world
            torch.distributed.all_gather_object(per_rank, rng)
        self.last_saved_step = self.step
        if self.att_maps is not None:
            self.att_maps.merge_ranks()  # collective: every rank's maxima into the checkpoint
        if not self.is_main:
            return None
        path = os.path.join(self.args.out, LATEST_NAME)
        scheduler = {"kind": "step-per-epoch", "base_lr": self.args.lr,
                     "decay_points": self.args.decay_points_list,
                     "lr_factor": self.lr_factor(max(self.epoch, 1))}
        sampler = {
            "kind": "DistributedSampler",
            "seed": self.args.seed,
            "epoch": self.epoch,
            "shuffle": self.shuffled(),
            "drop_last": self.shuffled(),
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.world,
        }
        return save_checkpoint(path, model=self.model, optimizer=self.optimizer, epoch=self.epoch,
                               step=self.step, epoch_done=self.epoch_done, batch_in_epoch=self.batch_in_epoch,
                               model_config=self.config, args=vars(self.args), keep=self.args.keep,
                               extra=dict(seconds=self.seconds, class_names=self.class_names,
                                          scheduler=scheduler,
                                          sampler=sampler, rng=rng, rng_per_rank=per_rank,
                                          att_maps=self.att_maps.state_dict() if self.att_maps else None,
                                          **(extra or {})))

    def request_stop(self, signum=None, frame=None) -> None:
        """SIGINT/SIGTERM handler: finish the current step, checkpoint, stop.  A second signal stops at
        once."""
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        name = signal.Signals(signum).name if signum is not None else "stop request"
        self.log.warning(f"{name}: saving a checkpoint after this step (send it again to abort without one)")

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

    # ---- training ----
    def compute_loss(self, batch: Dict, epoch: int):
        images = batch["image"].to(self.device, non_blocking=True)
        tags = batch["label"]
        # 0/1 checked here on the loader's host tensor: RCAModel checks non-bool labels itself, which
        # reads them back from the device (a host sync per step); it gets them as bool instead
        if not bool(((tags == 0) | (tags == 1)).all()):
            raise ValueError("batch labels must be 0/1 multi-hot, got values "
                             f"{sorted(set(tags.flatten().tolist()))}")
        labels = tags.to(self.device, non_blocking=True).float()
        # without contrast and aggregation no bank row is used: no labels, no region pooling
        present = (labels != 0) if self.uses_bank else None
        if self.world > 1 and self.args.contrast:
            # Under DDP, a contrast loss that is computed but not yet in the total (before
            # --contrast-start-epoch) is an output whose parameters (the projector) never get a
            # gradient: DDP waits for them forever.  So it is not computed then (the epoch-1 log
            # shows contrast 0; single-process runs still report it).
            self.model.contrast = epoch >= self.args.contrast_start_epoch
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(self.args.amp)):
            out = self.forward_model(images, present)
        # the loss terms in fp32 (autocast leaves bf16 logits)
        out.logits, out.coarse_logits = out.logits.float(), out.coarse_logits.float()
        if out.contrast_loss is not None:
            out.contrast_loss = out.contrast_loss.float()
        loss, parts = rca_loss(out, labels, epoch, coarse_weight=self.args.coarse_weight,
                               contrast_weight=self.args.contrast_weight,
                               contrast_start_epoch=self.args.contrast_start_epoch)
        return out, loss, parts

    def train_step(self, batch: Dict, epoch: int) -> Dict[str, float]:
        out, loss, parts = self.compute_loss(batch, epoch)
        bad = not all(math.isfinite(parts[k]) for k in LOSS_KEYS)
        bad_anywhere, stop_anywhere = distributed.any_rank([bad, self.stop_requested])
        # after_step acts on the agreed flag only: a signal landing on one rank after this
        # all-reduce is taken up at the next step, or that rank alone would enter the save's
        # collective while the others train on
        self.stop_agreed = stop_anywhere
        self.stop_requested = self.stop_requested or stop_anywhere
        if bad_anywhere:
            where = "" if bad else f" on another rank (rank {self.rank} had terms {parts})"
            raise FloatingPointError(
                f"non-finite loss at epoch {epoch}, step {self.step + 1}{where}: terms {parts}; stopped "
                f"before the update, the last good checkpoint (step {max(self.last_saved_step, 0)}) is kept. "
                f"Lower --lr?")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        rows = self.model.update_bank(out) if self.uses_bank else 0
        if self.att_maps is not None:
            self.att_maps.update(out.cams, out.logits, batch["label"], batch["index"], epoch,
                                 batch["image"].shape[-2:], batch.get("view"))
        if self.model.bank.bank.requires_grad:
            raise RuntimeError("the memory bank requires grad after the update; it must stay a buffer")
        parts["bank_rows"] = float(rows)
        return parts

    def after_step(self) -> None:
        """Bank consistency check, periodic checkpoint, Ctrl-C checkpoint (in that order)."""
        args = self.args
        if self.world > 1 and args.check_bank_every and self.step % args.check_bank_every == 0:
            distributed.check_bank_consistent(self.model.bank.bank, self.model.bank.ptr, self.step)
        if self.stop_agreed:
            path = self.save()
            raise TrainingInterrupted(path, self.step)
        if args.save_every and self.step % args.save_every == 0:
            self.save()

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

    def fit(self) -> Dict:
        """Train (Ctrl-C / SIGTERM: checkpoint and :class:`TrainingInterrupted`), evaluate on rank 0,
        write metrics."""
        # SIGTERM too: schedulers (SLURM) and torchrun's shutdown send it before killing a job
        signals = (signal.SIGINT,
                   signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
        previous = {sig: signal.signal(sig, self.request_stop) for sig in signals}
        try:
            return self._fit()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
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


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Parse ``argv`` (default: sys.argv[1:]), train, evaluate; returns the metrics dict."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return Trainer(args).fit()
    finally:
        torch.set_num_threads(threads)  # --threads may change it; leave callers as they were

