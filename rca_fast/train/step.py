"""The training step of :class:`rca_fast.train.Trainer`: forward with the tags, the loss terms
(``rca_loss``), the non-finite / stop agreement across ranks, backward, the SGD step, the bank and
``--att_dir`` updates, then the checks after the step (bank consistency, periodic and Ctrl-C
checkpoints).  Also the loss terms' names (``LOSS_KEYS``) and :class:`TrainingInterrupted`.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from .. import distributed
from ..model.losses import rca_loss

LOSS_KEYS = ("loss", "cls", "coarse_cls", "contrast")


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C (SIGINT) once the checkpoint of the last finished step is written."""

    def __init__(self, path: Optional[str], step: int):
        super().__init__(f"interrupted at step {step}; checkpoint {path} written -- continue with "
                         f"--resume {path} (or --resume auto)")
        self.path, self.step = path, step


class TrainStep:
    """Mixin of :class:`rca_fast.train.Trainer`: one step.  Uses the trainer's ``args``, ``device``,
    ``model`` / ``forward_model``, ``optimizer``, ``uses_bank``, ``att_maps``, ``world`` / ``rank``,
    the counters ``step`` / ``last_saved_step``, the stop flags and ``save`` (checkpointing)."""

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
