"""Checkpoint and resume of :class:`rca_fast.train.Trainer`: ``--resume PATH|auto`` resolved, a
checkpoint loaded (model config checked, model, bank, optimiser, position, ``--att_dir`` maxima,
every RNG state) and one written (atomic; collective under torch.distributed, rank 0 writes) with
the schedule and sampler position, so a resumed run continues bit-identically.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from ..utils.checkpoint import (LATEST_NAME, capture_rng_state, load_checkpoint, load_model_state,
                                resolve_resume, restore_rng_state, save_checkpoint)


class Checkpointing:
    """Mixin of :class:`rca_fast.train.Trainer`: resolve / load / save.  Uses the trainer's ``args``,
    ``log``, ``device``, ``model``, ``config``, ``optimizer``, ``att_maps``, ``class_names``,
    ``world`` / ``rank`` / ``is_main``, its position and ``lr_factor`` / ``shuffled`` (the loop's
    schedule and data order, recorded in the checkpoint)."""

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
