"""The :class:`Trainer`: builds data, model and optimiser from the parsed flags (seeds, ``--att_dir``
maps, ``--pretrained`` check, ``--init``, ``--bank-init``, resume, DDP / ``torch.compile`` wrap) and
composes the parts: the step (``step.py``), the epoch loop with its schedules (``loop.py``),
checkpoint / resume (``checkpointing.py``) and the CAM evaluation (``evaluation.py``).
"""
from __future__ import annotations

import random

import numpy as np
import torch

from .. import distributed
from ..data.training import build_datasets
from ..model.config import build_model, kaiming_init_, model_config
from ..utils.att_maps import AttentionMaps
from ..utils.threads import cpu_threads
from ..utils.train_args import require_pretrained
from .checkpointing import Checkpointing
from .evaluation import CamEvaluation
from .loop import EpochLoop
from .step import TrainStep


class Trainer(TrainStep, EpochLoop, Checkpointing, CamEvaluation):
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
