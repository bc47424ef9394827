"""Data tools: ``python -m rca_fast.data {class-list,synthetic,saliency} ...``.

* ``class-list``: write the public list format (``name c c ...``, 0-based) from segmentation masks::

      python -m rca_fast.data class-list --data-root VOC2012 \\
          --names ImageSets/Segmentation/train.txt --out VOC2012/train_cls.txt

* ``synthetic``: write the built-in synthetic scenes as a VOC-format folder::

      python -m rca_fast.data synthetic --out data/synthetic_voc --train 200 --val 50

* ``saliency``: stand-in saliency maps from ground-truth masks -- the foreground (classes, not 0
  or 255) box-blurred over ``--blur`` pixels and noised (Gaussian, std ``--noise`` of the 0-1
  range), grey 0-255 ``OUT/<name>.png`` -- for testing ``rca_fast.pseudo --saliency`` where no
  saliency model's output is at hand (real runs use a saliency detector's maps)::

      python -m rca_fast.data saliency --masks data/synthetic_voc/SegmentationClass \
          --list data/synthetic_voc/train_cls.txt --out data/synthetic_voc/saliency
"""
from __future__ import annotations

import argparse
import os

from ..utils.program import run_program
from .synthetic import class_names, export_voc
from .voc import DataFileError, find_mask_dir, read_class_list, write_class_list


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rca_fast.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cl = sub.add_parser("class-list", help="write 'name c c ...' lines from segmentation masks")
    cl.add_argument("--data-root", required=True, help="folder holding SegmentationClass[Aug]/")
    cl.add_argument("--names", required=True, help="file with one image name per line (first token); "
                                                   "relative paths are also tried under --data-root")
    cl.add_argument("--out", required=True, help="list file to write")
    cl.add_argument("--num-classes", type=int, default=20)
    cl.add_argument("--mask-dir", default=None, help="mask folder (default: found under --data-root)")
    syn = sub.add_parser("synthetic", help="write the synthetic dataset as a VOC-format folder")
    syn.add_argument("--out", required=True, help="folder to write")
    syn.add_argument("--train", type=int, default=200)
    syn.add_argument("--val", type=int, default=50)
    syn.add_argument("--num-classes", type=int, default=6)
    syn.add_argument("--image-size", type=int, default=96)
    syn.add_argument("--seed", type=int, default=0)
    sal = sub.add_parser("saliency", help="blurred + noised ground-truth foreground as saliency maps")
    sal.add_argument("--masks", required=True, help="folder of <name>.png ground-truth label maps")
    sal.add_argument("--list", required=True, help="image names (first token of each line)")
    sal.add_argument("--out", required=True, help="folder for <name>.png saliency maps")
    sal.add_argument("--blur", type=int, default=7, help="box-blur size in pixels (odd; 1 = none)")
    sal.add_argument("--noise", type=float, default=0.1, help="Gaussian noise std on the 0-1 scale")
    sal.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "class-list":
        mask_dir = args.mask_dir or find_mask_dir(args.data_root)
        if mask_dir is None:
            raise DataFileError(f"no SegmentationClassAug/ or SegmentationClass/ under {args.data_root}")
        names_path = args.names
        if not os.path.isfile(names_path) and os.path.isfile(os.path.join(args.data_root, names_path)):
            names_path = os.path.join(args.data_root, names_path)
        names = [n for n, _ in read_class_list(names_path, args.num_classes)]
        rows = write_class_list(mask_dir, names, args.out, args.num_classes)
        print(f"wrote {len(rows)} images to {args.out}")
    elif args.command == "saliency":
        written = write_gt_saliency(args.masks, args.list, args.out, blur=args.blur, noise=args.noise,
                                    seed=args.seed)
        print(f"wrote {written} saliency maps to {args.out}")
    else:
        paths = export_voc(args.out, train=args.train, val=args.val, num_classes=args.num_classes,
                           image_size=args.image_size, seed=args.seed)
        print("wrote", ", ".join(f"{k}={v}" for k, v in paths.items()))
        print("classes:", ", ".join(f"{i}={n}" for i, n in enumerate(class_names(args.num_classes))))


def write_gt_saliency(masks: str, list_path: str, out: str, *, blur: int = 7, noise: float = 0.1,
                      seed: int = 0) -> int:
    """Saliency stand-ins from masks (see the module doc); returns the number written."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from .voc import load_mask

    if blur < 1 or blur % 2 == 0:
        raise ValueError(f"--blur must be an odd int >= 1, got {blur}")
    if noise < 0:
        raise ValueError(f"--noise must be >= 0, got {noise}")
    os.makedirs(out, exist_ok=True)
    names = [n for n, _ in read_class_list(list_path, 255)]
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        mask = load_mask(os.path.join(masks, name + ".png"))
        fg = torch.from_numpy(((mask > 0) & (mask < 255)).astype(np.float32))[None, None]
        r = blur // 2
        soft = F.avg_pool2d(F.pad(fg, (r, r, r, r), mode="replicate"), blur, stride=1)[0, 0]
        soft = (soft + noise * torch.randn(soft.shape, generator=gen)).clamp(0, 1)
        Image.fromarray((soft * 255).round().to(torch.uint8).numpy()).save(os.path.join(out, name + ".png"))
    return len(names)


if __name__ == "__main__":
    run_program(main)
