"""The training loop of ``python -m rca_fast.segment``: SGD + poly schedule, checkpoints, resume, DDP.

Step-based, as DeepLab trainers are: ``--steps`` iterations (the poly schedule's length); the
learning rate of step t (0-based, set before its update) is ``lr * lr_mult * (1 - t / steps) **
power``.  Iteration t belongs to epoch ``t // steps_per_epoch``: the epoch's order is the
DistributedSampler's for (seed, epoch) (full batches only), and each item's augmentation is
drawn from (seed, epoch, index) (rca_fast.data.seg_pairs).  So a run stopped at any step (``--max-steps``,
Ctrl-C, SIGTERM) and resumed from its checkpoint with ``--resume`` sees the same batches and
ends with the same weights as one that was never stopped; the checkpoint holds the model, the
optimiser (momentum), the step and every RNG state (torchvision's DeepLab-v3 head has dropout).
"""
from __future__ import annotations

import math
import os
import random
import time
from typing import Dict, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import distributed
from ..data.seg_pairs import SegmentationPairs
from ..model.segmentation import build_segmentation_model, seg_param_groups, segmentation_loss
from ..utils.checkpoint import (LATEST_NAME, capture_rng_state, load_checkpoint, load_model_state,
                                resolve_resume, restore_rng_state, save_checkpoint)
from ..utils.program import stop_signals


def poly_factor(step: int, total: int, power: float = 0.9) -> float:
    """``(1 - step / total) ** power`` for 0 <= step < total (0 from ``total`` on)."""
    if total < 1:
        raise ValueError(f"poly_factor: total must be >= 1, got {total}")
    return max(0.0, 1.0 - min(step, total) / total) ** power


class SegmentationInterrupted(Exception):
    """Raised after SIGINT / SIGTERM once the checkpoint of the last finished step is written."""

    def __init__(self, path: Optional[str], step: int):
        super().__init__(
            f"interrupted at step {step}; checkpoint {path} written -- continue with --resume auto"
        )
        self.path, self.step = path, step


class SegTrainer:
    """Data, model, optimiser and the loop; :meth:`fit` trains up to ``--max-steps`` / ``--steps``."""

    def __init__(self, args):
        self.args = args
        self.device, self._created_group, self.rank, self.world, self.log = distributed.start(
            args.device, args.out, "segment.log")
        self.is_main = self.rank == 0
        if self.device.type == "cpu" and args.threads:
            torch.set_num_threads(args.threads)
        random.seed(args.seed)
        np.random.seed(args.seed % 2 ** 32)
        torch.manual_seed(args.seed)
        self.num_classes = args.num_classes + 1  # background included
        self.train_set = None
        if not args.eval_only:
            self.train_set = SegmentationPairs(
                args.train_list,
                args.images,
                args.labels,
                self.num_classes,
                train=True,
                crop_size=args.crop_size,
                scale_range=args.scale_range,
                flip=args.flip,
                seed=args.seed,
            )
        # frozen BatchNorm (deeplabv2): "auto" means frozen when a pretrained backbone is loaded
        freeze = bool(args.pretrained) if args.freeze_bn is None else bool(args.freeze_bn)
        self.config = {"backbone": args.backbone, "num_classes": self.num_classes, "freeze_bn": freeze}
        self.step = 0
        state = None
        path = resolve_resume(args.resume, args.out, self.log)
        if path:
            state = load_checkpoint(path, map_location="cpu")
            saved = state.get("model_config") or {}
            if args.eval_only:  # the checkpoint says what network it is
                self.config = {k: saved.get(k, v) for k, v in self.config.items()}
            elif {k: saved.get(k) for k in self.config} != self.config:
                diff = {k: (saved.get(k), v) for k, v in self.config.items() if saved.get(k) != v}
                raise ValueError(f"--resume {path}: the checkpoint's network differs from these flags "
                                 f"(checkpoint, flags): {diff}")
        # weights come from the checkpoint when resuming: the pretrained file is not read then
        self.model = build_segmentation_model(
            self.config["backbone"],
            self.config["num_classes"],
            None if state else args.pretrained,
            freeze_bn=self.config["freeze_bn"],
        )
        self.model.to(self.device)
        self.optimizer = torch.optim.SGD(
            seg_param_groups(self.model, args.lr, args.weight_decay, args.new_lr_mult),
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
        )
        if self.world > 1:
            # the model above is the same on every rank (same seed); the dropout draws (deeplabv3)
            # should differ.  Augmentation draws are per item (seg_pairs), not from this RNG.
            torch.manual_seed(args.seed + 1000003 * self.rank)
        if state is not None:
            self.load(path, state)
        self.forward_model = self.model
        if self.world > 1 and not args.eval_only:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.forward_model = DDP(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if args.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.stop_requested = False

    # ---- state ----
    def load(self, path: str, state: Dict) -> None:
        load_model_state(self.model, state["model"], path)
        if self.model.training:
            self.model.train()  # re-apply frozen BatchNorm after the load
        if state.get("optimizer") and not self.args.eval_only:
            self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        per_rank = state.get("rng_per_rank") or []
        if len(per_rank) == self.world:
            restore_rng_state(per_rank[self.rank])
        self.log.info(f"resumed from {path}: step {self.step}")

    def save(self) -> Optional[str]:
        """Checkpoint (collective under DDP: every rank's RNG state is gathered; rank 0 writes)."""
        rng = capture_rng_state()
        per_rank = [rng]
        if self.world > 1:
            per_rank = [None] * self.world
            torch.distributed.all_gather_object(per_rank, rng)
        if not self.is_main:
            return None
        spe = self.steps_per_epoch()
        return save_checkpoint(
            os.path.join(self.args.out, LATEST_NAME),
            model=self.model,
            optimizer=self.optimizer,
            epoch=self.step // spe,
            step=self.step,
            epoch_done=self.step % spe == 0,
            batch_in_epoch=self.step % spe,
            model_config=self.config,
            args=vars(self.args),
            keep=self.args.keep,
            extra={"kind": "segmentation", "rng_per_rank": per_rank, "world_size": self.world},
        )

    def request_stop(self, signum=None, frame=None) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        self.log.warning(
            "stop requested: saving a checkpoint after this step (send it again to abort without one)"
        )

    # ---- data ----
    def steps_per_epoch(self) -> int:
        return max(1, (len(self.train_set) // self.world) // self.args.batch_size)

    def batches(self, epoch: int, skip: int) -> DataLoader:
        """This rank's batches of ``epoch`` (keys (index, epoch)), the first ``skip`` left out."""
        batches = [
            [(i, epoch) for i in batch]
            for batch in distributed.rank_batches(
                len(self.train_set), self.args.batch_size, self.args.seed, epoch, skip
            )
        ]
        return DataLoader(self.train_set, batch_sampler=batches, num_workers=self.args.num_workers,
                          pin_memory=self.device.type == "cuda")

    # ---- training ----
    def set_lr(self) -> float:
        factor = poly_factor(self.step, self.args.steps, self.args.poly_power)
        for group in self.optimizer.param_groups:
            group["lr"] = self.args.lr * group.get("lr_mult", 1.0) * factor
        return self.args.lr * factor

    def train_step(self, batch: Dict) -> float:
        lr = self.set_lr()
        images = batch["image"].to(self.device, non_blocking=True)
        target = batch["label"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(self.args.amp)):
            logits = self.forward_model(images)
        loss = segmentation_loss(logits.float(), target)
        value = float(loss.detach())
        bad, stop = distributed.any_rank([not math.isfinite(value), self.stop_requested])
        self.stop_requested = stop
        if bad:
            raise FloatingPointError(
                f"non-finite loss at step {self.step + 1} (lr {lr:.3g}); stopped before the "
                f"update, the last checkpoint is kept. Lower --lr?"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return value

    def fit(self) -> Dict:
        """Train to ``min(--max-steps, --steps)``; returns {steps, train_seconds, last_loss}.

        SIGINT / SIGTERM: checkpoint after the current step, then :class:`SegmentationInterrupted`."""
        with stop_signals(self.request_stop):
            return self._fit()

    def _fit(self) -> Dict:
        args = self.args
        stop = args.steps if args.max_steps is None else min(args.max_steps, args.steps)
        spe = self.steps_per_epoch()
        self.log.info(
            f"segmentation: {args.backbone} on {len(self.train_set)} images ({self.num_classes} classes) "
            f"on {self.device}"
            + (f" x {self.world} processes" if self.world > 1 else "")
            + f", steps {self.step} -> {stop} of {args.steps} ({spe} per epoch), batch {args.batch_size}, "
            f"crop {args.crop_size}, lr {args.lr:g} (x{args.new_lr_mult:g} new layers, poly "
            f"{args.poly_power:g}), amp {'bf16' if args.amp else 'off'}, compile "
            f"{'on' if args.compile else 'off'}, out {args.out}"
        )
        self.model.train()
        start, losses, last_saved = time.time(), [], self.step
        bar = tqdm(
            total=stop,
            initial=self.step,
            desc="segment",
            disable=not (args.progress and self.is_main),
            dynamic_ncols=True,
            mininterval=0.5,
        )
        while self.step < stop:
            epoch = self.step // spe
            for batch in self.batches(epoch, self.step % spe):
                losses.append(self.train_step(batch))
                bar.update(1)
                bar.set_postfix(
                    {"loss": f"{losses[-1]:.3f}", "lr": f"{self.optimizer.param_groups[0]['lr']:.2e}"},
                    refresh=False,
                )
                if self.stop_requested:
                    bar.close()
                    raise SegmentationInterrupted(self.save(), self.step)
                if args.save_every and self.step % args.save_every == 0 and self.step < stop:
                    self.save()
                    last_saved = self.step
                if self.step >= stop:
                    break
        bar.close()
        if self.step != last_saved or not os.path.exists(os.path.join(args.out, LATEST_NAME)):
            self.save()
        seconds = time.time() - start
        tail = losses[-max(1, spe):]
        self.log.info(f"trained to step {self.step} in {seconds:.1f}s; mean loss of the last "
                      f"{len(tail)} steps {np.mean(tail) if tail else float('nan'):.4f}")
        return {"steps": self.step, "train_seconds": round(seconds, 2),
                "final_loss": float(np.mean(tail)) if tail else None}
