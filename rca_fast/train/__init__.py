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

Importable: ``rca_fast.train.main(argv) -> metrics dict``; :class:`Trainer` (``trainer.py``) builds
everything and composes the parts: the step (``step.py``), the epoch loop with its schedules and
signal handling (``loop.py``), checkpoint / resume (``checkpointing.py``), the CAM evaluation
(``evaluation.py``).
This package is the training layer (shared by the programs: the profiler's step mode and the
method check build a Trainer); the program is ``rca_fast/train/__main__.py``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from ..utils.train_args import parse_args
from .step import LOSS_KEYS, TrainingInterrupted
from .trainer import Trainer

__all__ = ["LOSS_KEYS", "Trainer", "TrainingInterrupted", "main"]


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Parse ``argv`` (default: sys.argv[1:]), train, evaluate; returns the metrics dict."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return Trainer(args).fit()
    finally:
        torch.set_num_threads(threads)  # --threads may change it; leave callers as they were

