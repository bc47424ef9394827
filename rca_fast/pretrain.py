"""``python -m rca_fast.pretrain``: pretrain the tiny backbone for multi-label classification on
synthetic images, and save it as a local weights file for ``python -m rca_fast.train --pretrained``.

Why: the paper's gains come with an ImageNet-pretrained VGG16, whose region embeddings carry
meaning from the first step, so the memory bank holds data almost at once.  The synthetic data
set has no ImageNet; this step gives the tiny backbone the same head start: it is trained
(backbone + a GAP linear classifier, multilabel soft margin) on separate synthetic scenes -- other
data seeds than the training run's (``--data-seed``, default 1000; the method check trains with
seeds 0-7) -- and only the backbone is saved, as a torchvision-style state dict (``features.*``).

    python -m rca_fast.pretrain --out runs/pretrained/tiny.pt
    python -m rca_fast.train --pretrained runs/pretrained/tiny.pt

The file is written atomically, with ``<out>.json`` beside it (flags, final loss and accuracy).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import SyntheticShapes
from .model.backbones import TinyBackbone
from .utils.program import run_program


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rca_fast.pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="weights file to write (a state dict of the tiny backbone)")
    p.add_argument("--data-seed", type=int, default=1000,
                   help="seed of the synthetic scenes (use other seeds than the training runs')")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order")
    p.add_argument("--num-images", type=int, default=1280)
    p.add_argument("--num-classes", type=int, default=6)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--width", type=int, default=64, help="backbone channels D (64, as rca_fast.train's tiny)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed: results depend on it)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for flag in ("num_images", "num_classes", "epochs", "batch_size", "threads", "width"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.num_images < args.batch_size:  # full batches only: fewer images would train no step
        raise ValueError(f"--num-images ({args.num_images}) must be >= --batch-size ({args.batch_size})")
    if args.image_size < 16:
        raise ValueError(f"--image-size must be >= 16, got {args.image_size}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    return args


class Classifier(torch.nn.Module):
    """Tiny backbone -> GAP -> linear: (B, 3, H, W) -> (B, L) logits."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.backbone = TinyBackbone(width)
        self.fc = torch.nn.Linear(width, num_classes)
        for m in self.modules():  # He-normal, as rca_fast.train's tiny runs (no normalisation layers)
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                torch.nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(images).mean(dim=(2, 3)))


def pretrain(args: argparse.Namespace) -> Dict:
    """Train, save ``args.out`` (backbone state dict) and ``args.out + '.json'``; returns the summary."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        torch.manual_seed(args.seed)
        data = SyntheticShapes(args.num_images, args.num_classes, args.image_size, seed=args.data_seed,
                               split="train", flip=True)
        images = torch.stack([data[i]["image"] for i in range(len(data))])
        labels = torch.as_tensor(data.labels, dtype=torch.float32)
        model = Classifier(args.num_classes, args.width)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        steps = args.epochs * (len(data) // args.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
        start, history = time.time(), []
        bar = tqdm(total=steps, desc="pretrain tiny", disable=not args.progress, dynamic_ncols=True)
        for epoch in range(args.epochs):
            order = torch.randperm(len(data))
            total, correct, seen = 0.0, 0, 0
            for i in range(0, len(data) - args.batch_size + 1, args.batch_size):
                idx = order[i:i + args.batch_size]
                x = images[idx]
                if bool(torch.rand(()) < 0.5):
                    x = x.flip(-1)
                logits = model(x)
                loss = F.multilabel_soft_margin_loss(logits, labels[idx])
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"pretrain: non-finite loss at epoch {epoch + 1}; lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                correct += int(((logits > 0) == (labels[idx] > 0)).all(dim=1).sum())
                seen += len(idx)
                bar.update(1)
            history.append({"epoch": epoch + 1, "loss": total / seen, "exact_match": correct / seen})
            bar.set_postfix(loss=f"{total / seen:.3f}", exact=f"{correct / seen:.2f}")
        bar.close()
        out_dir = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(out_dir, exist_ok=True)
        tmp = args.out + ".tmp"
        torch.save(model.backbone.state_dict(), tmp)
        os.replace(tmp, args.out)
        summary = {"args": vars(args), "history": history, "seconds": round(time.time() - start, 1),
                   "weights": os.path.abspath(args.out)}
        with open(args.out + ".json", "w") as f:
            json.dump(summary, f, indent=1)
        return summary
    finally:
        torch.set_num_threads(threads)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    summary = pretrain(parse_args(argv))
    last = summary["history"][-1]
    print(f"pretrained tiny backbone: loss {last['loss']:.4f}, exact-match accuracy "
          f"{last['exact_match']:.3f} "
          f"(train images) in {summary['seconds']:.0f}s -> {summary['weights']}")
    return summary


if __name__ == "__main__":
    run_program(main)
