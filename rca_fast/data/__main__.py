"""Data tools: ``python -m rca_fast.data {class-list,synthetic} ...``.

* ``class-list``: write the public list format (``name c c ...``, 0-based) from segmentation masks::

      python -m rca_fast.data class-list --data-root VOC2012 \\
          --names ImageSets/Segmentation/train.txt --out VOC2012/train_cls.txt

* ``synthetic``: write the built-in synthetic scenes as a VOC-format folder::

      python -m rca_fast.data synthetic --out data/synthetic_voc --train 200 --val 50
"""
from __future__ import annotations

import argparse
import os
import sys

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
    else:
        paths = export_voc(args.out, train=args.train, val=args.val, num_classes=args.num_classes,
                           image_size=args.image_size, seed=args.seed)
        print("wrote", ", ".join(f"{k}={v}" for k, v in paths.items()))
        print("classes:", ", ".join(f"{i}={n}" for i, n in enumerate(class_names(args.num_classes))))


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
