"""Command line of ``python -m rca_fast.train``.

The public RCA ``train.py`` flags keep their names and meanings (``--img_dir``, ``--train_list``,
``--test_list``, ``--num_classes``, ``--lr``, ``--weight_decay``, ``--input_size``, ``--crop_size``,
``--batch_size``, ``--decay_points``, ``--snapshot_dir``, ``--att_dir``, ``--epoch``,
``--num_workers``, ``--resume``), so a user of that script switches by changing the program name.
Flags whose default depends on the dataset are ``None`` here and filled by
:func:`resolve_args` from :data:`DATASET_DEFAULTS`: ``--dataset voc`` / ``coco`` follow the public
code (VGG16, 368 px, batch 8, lr 1e-3, 30 epochs, lr steps after epochs 5 and 10, 500 slots);
the synthetic default is sized to train in a few minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional, Sequence

import torch

from .program import check_at_least

DATASET_DEFAULTS = {
    "synthetic": dict(num_classes=6, backbone="tiny", input_size=96, crop_size=96, batch_size=16, lr=0.01,
                      epoch=15, decay_points="12", bank_slots=64, num_workers=0,
                      snapshot_dir="runs/synthetic",
                      num_images=640, val_images=160),
    "voc": dict(num_classes=20, backbone="vgg16", input_size=368, crop_size=368, batch_size=8, lr=1e-3,
                epoch=30, decay_points="5,10", bank_slots=500, num_workers=8,
                snapshot_dir="runs/pascal/model",
                num_images=0, val_images=0),
    "coco": dict(num_classes=80, backbone="vgg16", input_size=368, crop_size=368, batch_size=8, lr=1e-3,
                 epoch=30, decay_points="5,10", bank_slots=500, num_workers=8, snapshot_dir="runs/coco/model",
                 num_images=0, val_images=0),
}


# --recipe: values of the recipe flags left unset.  "public" reproduces the public code (its input
# pipeline, linear aggregation, randn prototypes until epoch 2, EMA first writes); "improved" holds
# the aggregation until the bank holds data (constant context from zero prototypes before
# --aggregation-start-epoch), copies a slot's first write, warm-starts k-means from the previous
# prototypes (fixed seed), zeroes the aggregation's output conv when the k-means prototypes take
# over (--aggregation-zero-start) and uses the paper's softmax aggregation -- measured in
# benchmarks/results/method_check*.md.  Its input pipeline is the public one: the earlier
# "augmented" pipeline was never measured better, so it is only an option.
RECIPES = {
    "public": dict(aggregation="linear", attention_scale="sqrt", prototype_init="randn",
                   aggregation_start_epoch=2, first_write="ema", kmeans_warm_start=False,
                   aggregation_zero_start=False, input_pipeline="public"),
    "improved": dict(aggregation="softmax", attention_scale="sqrt", prototype_init="zeros",
                     aggregation_start_epoch=4, first_write="copy", kmeans_warm_start=True,
                     aggregation_zero_start=True, input_pipeline="public"),
}

# --bank-dtype spellings -> the dtype name stored in checkpoints
BANK_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rca_fast.train",
        description="Train RCA (regional semantic contrast and aggregation). Without arguments: the "
                    "built-in synthetic dataset, a few minutes on a CPU, ends with the CAM mIoU.")
    pub = p.add_argument_group("flags of the public RCA train.py (same names and meanings)")
    pub.add_argument("--img_dir", default=None, help="image folder (default: DATA_ROOT/JPEGImages)")
    pub.add_argument("--train_list", default=None,
                     help="training list 'name c c ...' (0-based) or bare names with --cls-labels "
                          "(default: DATA_ROOT/train_cls.txt, then .../ImageSets/Segmentation/train_cls.txt)")
    pub.add_argument("--test_list", default=None,
                     help="list of images for the CAM evaluation at the end (default: DATA_ROOT/val_cls.txt, "
                          "then .../ImageSets/Segmentation/val_cls.txt; skipped when absent)")
    pub.add_argument("--num_classes", type=int, default=None, help="L (synthetic 6, voc 20, coco 80)")
    pub.add_argument("--lr", type=float, default=None, help="base learning rate (voc/coco 1e-3)")
    pub.add_argument("--weight_decay", type=float, default=5e-4)
    pub.add_argument("--input_size", type=int, default=None,
                     help="training images are resized to input_size x input_size (voc 368; the public "
                          "meaning); with --input-pipeline augmented: the longer side before cropping; "
                          "synthetic: the image size")
    pub.add_argument("--crop_size", type=int, default=None,
                     help="training crop of --input-pipeline augmented (voc 368); unused by the public "
                          "pipeline, as in the public train.py")
    pub.add_argument("--batch_size", type=int, default=None, help="voc 8")
    pub.add_argument("--decay_points", type=str, default=None,
                     help="comma-separated epochs after which the lr is multiplied by 0.1 (voc '5,10')")
    pub.add_argument("--snapshot_dir", "--out", dest="out", default=None,
                     help="output folder: checkpoint.pt, metrics.json, train.log")
    pub.add_argument("--att_dir", default=None,
                     help="if given, accumulate the training images' final maps as the public train.py: "
                          "from the 2nd epoch, per present class with probability >= 0.1, the max over "
                          "epochs (last epoch: written regardless when missing); <name>_<c>.png (grey "
                          "0-255, image size) written here at the end -- the input of rca_fast.pseudo")
    pub.add_argument("--epoch", type=int, default=None, help="number of epochs (voc 30)")
    pub.add_argument("--num_workers", type=int, default=None, help="data-loading processes")
    pub.add_argument("--resume", default=None,
                     help="checkpoint to continue from, or 'auto': the newest in --out (a fresh run when "
                          "there is none); continues exactly where it stopped, mid-epoch included")
    # public, unused there too
    pub.add_argument("--threshold", type=float, default=None, help=argparse.SUPPRESS)

    ours = p.add_argument_group("rca_fast flags")
    ours.add_argument("--dataset", choices=sorted(DATASET_DEFAULTS) + ["pascal_voc"], default=None,
                      help="default: synthetic, or voc (coco with --num_classes 80) when --img_dir, "
                           "--train_list or --test_list is given, as the public script trains on them; "
                           "pascal_voc (the public script's name) = voc")
    ours.add_argument("--data-root", default="data",
                      help="VOC/COCO folder (JPEGImages/, SegmentationClass[Aug]/)")
    ours.add_argument("--cls-labels", default=None, help="IRN cls_labels.npy for lists of bare names")
    ours.add_argument("--mask-dir", default=None,
                      help="ground-truth masks for the final CAM mIoU (default: "
                           "DATA_ROOT/SegmentationClassAug "
                           "or SegmentationClass)")
    ours.add_argument("--backbone", choices=("vgg16", "resnet50", "tiny"), default=None,
                      help="synthetic: tiny; voc/coco: vgg16")
    ours.add_argument("--pretrained", default=None,
                      help="local backbone weights (a torchvision state dict file; nothing is downloaded). "
                           "Required for --backbone vgg16/resnet50 (the public code always starts from "
                           "ImageNet weights); 'none' trains them from scratch on purpose")
    ours.add_argument("--device", default=None, help="cuda / cpu / cuda:1 (default: cuda when available)")
    ours.add_argument("--seed", type=int, default=0,
                      help="seed of the model, the data order and synthetic data")
    ours.add_argument("--max-steps", type=int, default=None,
                      help="stop after this many optimiser steps in all")
    ours.add_argument("--no-contrast", dest="contrast", action="store_false", help="drop the contrast loss")
    ours.add_argument("--no-aggregation", action="store_true", help="drop the prototype aggregation")
    ours.add_argument("--no-mixup", dest="mixup", action="store_false", help="contrast without region mixup")
    ours.add_argument("--aggregation", choices=("softmax", "linear"), default=None,
                      help="linear (public code, --recipe public: matmul(q, k) / K * 20, i.e. scores x 20/K, "
                           "no softmax) or softmax (the paper's form; --recipe improved)")
    ours.add_argument("--input-pipeline", choices=("public", "augmented"), default=None,
                      help="training input: public (both recipes: resize to input_size x input_size, "
                           "ColorJitter(0.3, 0.3, 0.3, 0.1) in random order, no flip/rescale/crop, images in "
                           "list order, last partial batch kept) or augmented (rca_fast's earlier pipeline: "
                           "long side input_size x U(0.9, 1.1), flip, jitter without hue, random crop_size "
                           "crop zero-padded, shuffled, full batches only)")
    ours.add_argument("--recipe", choices=sorted(RECIPES), default="public",
                      help="defaults of the recipe flags below: public (what the public code computes) or "
                           "improved (softmax aggregation held until the bank holds data, first write "
                           "copies, k-means warm start, output conv zeroed at the switch); a recipe flag "
                           "given explicitly wins")
    ours.add_argument("--attention-scale", choices=("sqrt", "one", "learned"), default=None,
                      help="softmax aggregation temperature: 1/sqrt(D) (default), 1 (the paper's formula) or "
                           "a learned scalar")
    ours.add_argument("--prototype-init", choices=("randn", "zeros"), default=None,
                      help="prototypes before the first k-means: randn (public code) or zeros (a constant, "
                           "uniform aggregation context)")
    ours.add_argument("--aggregation-start-epoch", type=int, default=None,
                      help="1-based epoch from which the prototypes are k-means of the bank (refreshed at "
                           "the "
                           "start of every epoch); before it they stay at --prototype-init. Public code: 2")
    ours.add_argument("--first-write", choices=("ema", "copy"), default=None,
                      help="a bank slot's first write: ema (public: 1%% region, 99%% initial noise) or copy")
    ours.add_argument("--kmeans-warm-start", dest="kmeans_warm_start", action="store_const", const=True,
                      default=None, help="k-means after the first from the previous prototypes (Lloyd), "
                                         "first one with the fixed seed --seed")
    ours.add_argument("--aggregation-zero-start", action="store_const", const=True, default=None,
                      help="zero the aggregation's output conv (the public 'aggre') at "
                           "--aggregation-start-epoch, "
                           "so the switch to k-means prototypes does not change the fused features at once")
    ours.add_argument("--no-kmeans-warm-start", dest="kmeans_warm_start", action="store_const", const=False,
                      help="a fresh k-means (new seed) at every refresh, also under --recipe improved")
    ours.add_argument("--no-aggregation-zero-start", dest="aggregation_zero_start", action="store_const",
                      const=False, help="keep the output conv at the switch, also under --recipe improved")
    ours.add_argument(
        "--kmeans-n-init",
        type=int,
        default=10,
        help="k-means restarts per refresh (10: scikit-learn's default in the public code's time)",
    )
    ours.add_argument("--kmeans-iters", type=int, default=300,
                      help="most Lloyd iterations per k-means run (300: scikit-learn's max_iter default, "
                           "which the public code uses)")
    ours.add_argument("--bank-slots", type=int, default=None, help="S per class (voc 500, synthetic 64)")
    ours.add_argument("--bank-init", choices=("randn", "zeros"), default="randn",
                      help="initial bank slots: randn (public code) or zeros (a slot then points along its "
                           "first embedding at once, as cosine similarity ignores the EMA's small scale)")
    ours.add_argument("--prototypes", type=int, default=10, help="K prototypes per class")
    ours.add_argument("--gamma", type=float, default=0.99, help="bank EMA momentum")
    ours.add_argument("--score-threshold", type=float, default=0.7, help="bank rows need sigmoid score above")
    ours.add_argument("--temperature", type=float, default=0.07)
    ours.add_argument("--mixup-alpha", type=float, default=8.0)
    ours.add_argument("--coarse-weight", type=float, default=0.4)
    ours.add_argument("--contrast-weight", type=float, default=0.01)
    ours.add_argument("--contrast-start-epoch", type=int, default=3,
                      help="1-based epoch the contrast term starts (3: the public code skips it while its "
                           "0-based epoch is < 2)")
    ours.add_argument("--shared-final-head", action="store_true",
                      help="one final CAM head, not one per class")
    ours.add_argument("--num-images", type=int, default=None, help="synthetic training images (640)")
    ours.add_argument("--val-images", type=int, default=None,
                      help="images for the final CAM mIoU (synthetic: 160 generated; voc/coco: 0 = all)")
    ours.add_argument("--eval-scales", default="1.0", help="scales of the final CAM evaluation")
    ours.add_argument("--init", choices=("auto", "kaiming", "default"), default="auto",
                      help="weight init: default = the model's own (public code: new convs N(0, 0.01)); "
                           "kaiming = He-normal for every conv/linear layer not loaded from --pretrained "
                           "(what the tiny network without normalisation needs to learn); auto = kaiming "
                           "for the tiny backbone, default otherwise")
    ours.add_argument("--threads", type=int, default=0,
                      help="CPU threads for torch (0 = torch's default, fixed by the machine: its cores or "
                           "OMP_NUM_THREADS); fewer runs faster on a busy machine. The float summation "
                           "order, and so the trained weights, change with the thread count; "
                           "metrics.json records it (cpu_threads)")
    ours.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    run = p.add_argument_group("checkpoints, scale-out and speed")
    run.add_argument("--save-every", type=int, default=0,
                     help="also checkpoint every N optimiser steps (0 = only at epoch ends)")
    run.add_argument("--keep", type=int, default=3,
                     help="numbered checkpoints (checkpoint_step<N>.pt) to keep; checkpoint.pt is the newest")
    run.add_argument("--check-bank-every", type=int, default=100,
                     help="under torch.distributed: compare the ranks' bank checksums every N steps "
                          "(0 = never); differing banks stop the run")
    run.add_argument("--amp", action="store_true",
                     help="bf16 autocast of the forward pass (GPU; also runs on CPU); the bank stays "
                          "--bank-dtype")
    run.add_argument("--bank-dtype", choices=sorted(BANK_DTYPES), default="float32",
                     help="dtype of the memory bank and prototypes (bfloat16 = bf16 halves their memory)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--compile-backend", default="inductor", help="torch.compile backend (inductor)")
    return p


def parse_decay_points(text: str) -> List[int]:
    text = (text or "").strip()
    if not text:
        return []
    try:
        points = sorted(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"--decay_points must be comma-separated epochs, got {text!r}") from None
    return points


def _first_file(*paths: str) -> Optional[str]:
    for path in paths:
        if path and os.path.isfile(path):
            return path
    return None


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill dataset-dependent defaults and check values; raises ValueError naming the flag."""
    if args.dataset == "pascal_voc":
        args.dataset = "voc"
    elif args.dataset is None:
        # a public train.py command line names its data with these flags and no --dataset
        real = any(v is not None for v in (args.img_dir, args.train_list, args.test_list))
        args.dataset = ("coco" if args.num_classes == 80 else "voc") if real else "synthetic"
    for key, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.decay_points_list = parse_decay_points(args.decay_points)
    # --pretrained none: from scratch on purpose (see require_pretrained)
    args.from_scratch = isinstance(args.pretrained, str) and args.pretrained.strip().lower() == "none"
    if args.from_scratch:
        args.pretrained = None
    args.bank_dtype = BANK_DTYPES[args.bank_dtype]
    check_at_least((("--num_classes", args.num_classes, 1), ("--batch_size", args.batch_size, 1),
                    ("--epoch", args.epoch, 1), ("--input_size", args.input_size, 16),
                    ("--crop_size", args.crop_size, 16), ("--bank-slots", args.bank_slots, 1),
                    ("--num_workers", args.num_workers, 0), ("--prototypes", args.prototypes, 1)))
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    check_at_least((("--save-every", args.save_every, 0), ("--keep", args.keep, 1),
                    ("--check-bank-every", args.check_bank_every, 0)))
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.prototypes > args.bank_slots:
        raise ValueError(f"--prototypes ({args.prototypes}) must be <= --bank-slots ({args.bank_slots})")
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.aggregation_mode = "none" if args.no_aggregation else args.aggregation
    for flag, value in (("--aggregation-start-epoch", args.aggregation_start_epoch),
                        ("--kmeans-n-init", args.kmeans_n_init), ("--kmeans-iters", args.kmeans_iters)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.dataset != "synthetic":
        root = args.data_root
        seg = os.path.join(root, "ImageSets", "Segmentation")
        args.img_dir = args.img_dir or os.path.join(root, "JPEGImages")
        if args.train_list is None:
            args.train_list = _first_file(os.path.join(root, "train_cls.txt"),
                                          os.path.join(seg, "train_cls.txt"))
            if args.train_list is None:
                raise FileNotFoundError(f"no training list: give --train_list (looked for "
                                        f"{os.path.join(root, 'train_cls.txt')} and "
                                        f"{os.path.join(seg, 'train_cls.txt')})")
        if args.test_list is None:
            args.test_list = _first_file(os.path.join(root, "val_cls.txt"), os.path.join(seg, "val_cls.txt"))
        if args.cls_labels is None and os.path.isfile(os.path.join(root, "cls_labels.npy")):
            args.cls_labels = os.path.join(root, "cls_labels.npy")
    return args


# torchvision's ImageNet files of the backbones --pretrained takes (download them once, elsewhere)
WEIGHT_FILES = {"vgg16": "vgg16-397923af.pth", "resnet50": "resnet50-0676ba61.pth"}


def require_pretrained(args: argparse.Namespace, resuming: bool = False) -> None:
    """ValueError unless a VGG16/ResNet50 run says where its ImageNet weights are.

    The public code always starts its VGG16 from ImageNet weights; a drop-in command line that
    forgot --pretrained would otherwise train a randomly initialised network for hours.  From
    scratch needs ``--pretrained none`` (``args.from_scratch``); a resumed run takes its weights
    from the checkpoint."""
    if args.backbone in WEIGHT_FILES and args.pretrained is None and not args.from_scratch and not resuming:
        raise ValueError(
            f"--backbone {args.backbone} needs --pretrained: the public code starts from ImageNet weights "
            f"and rca_fast never downloads them. Give a local torchvision state dict, e.g. --pretrained "
            f"~/.cache/torch/hub/checkpoints/{WEIGHT_FILES[args.backbone]} (torchvision's file; "
            f"torchvision.models.{args.backbone}(weights='IMAGENET1K_V1') downloads it there on a machine "
            f"with network), or --pretrained none to train from scratch on purpose"
        )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return resolve_args(build_parser().parse_args(argv))
