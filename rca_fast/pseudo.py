"""``python -m rca_fast.pseudo``: proxy labels from attention maps (+ saliency) -- the public
``gen_labels.py`` as a program (step 2 of the three-step workflow)::

    python -m rca_fast.pseudo --maps runs/pascal/att --list VOC2012/train_cls.txt \\
        --images VOC2012/JPEGImages --saliency VOC2012/saliency_map --out runs/pascal/proxy \\
        --refine par --workers 4

For every list line ``name c1 c2 ...`` (0-based classes) it reads ``MAPS/<name>_<c>.png`` (grey
0-255, e.g. what ``rca_fast.train --att_dir`` writes), ``IMAGES/<name>.jpg`` and, with
``--saliency``, ``SALIENCY/<name>.png`` (grey 0-255), and writes ``OUT/<name>.png`` in the VOC
palette (0 background, class c -> c + 1, 255 ignore).  The rules (the public code's):

1. each class map is scaled to [0, 1] by its own min and max (``(a - min) / (max - min + 1e-8)``);
   the background score is ``(1 - max over the classes) ** alpha`` (alpha = 4);
2. the (background, classes) scores are refined: ``none`` keeps them, ``crf`` is the dense CRF
   (t = 10 iterations, needs ``pip install ".[crf]"``), ``par`` the pixel-adaptive refinement of
   :mod:`rca_fast.refine` (torch, CPU or GPU);
3. planes: background = ``1 - saliency / 255`` with saliency, else the refined background score;
   class c + 1 = the refined map of c (0 for classes not on the line);
4. a pixel where more than one plane is > 0.9 is 255 (conflict); otherwise the arg-max plane;
5. a background pixel whose saliency -- raised to 255 where any refined class map is > 0.8 -- is
   >= 32 is 255 (without saliency the saliency is 0, so only the raised pixels count);
6. an image with fewer than 1% of its pixels labelled with an object class becomes all 255.
A line without classes gives an all-255 label (rule 6).  A missing map, image or saliency file,
or one whose size differs from the image's, is an error naming it.
``python -m rca_fast.evaluate --pred OUT --gt ... --list ...`` scores the result.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .data.voc import DataFileError, find_image, load_image, read_class_list
from .refine import CRF_EXTRA_HINT, DEFAULT_DILATIONS, crf_available, crf_refine, par_refine
from .utils.palette import save_label_png
from .utils.program import run_program

ALPHA = 4            # background score exponent for the refinement
CONFLICT = 0.9       # more than one plane above this -> 255
ATT_THRESHOLD = 0.8  # a refined class map above this raises the saliency to 255
BG_THRESHOLD = 32    # a background pixel with (raised) saliency >= this -> 255
MIN_OBJECT_FRACTION = 0.01
CRF_ITERS = 10


# ------------------------------------------------------------------------------------ reading
def load_grey(path: str, what: str) -> np.ndarray:
    """(H, W) uint8 of a grey PNG; DataFileError naming ``path`` (and ``what`` it is) when missing."""
    if not os.path.isfile(path):
        raise DataFileError(f"{what} not found: {path}")
    try:
        with Image.open(path) as img:
            return np.array(img.convert("L"))
    except Exception as exc:
        raise DataFileError(f"cannot read {what} {path}: {exc}") from exc


def read_inputs(name: str, classes: Sequence[int], maps_dir: str, images_dir: str,
                saliency_dir: Optional[str]) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(image (H, W, 3) uint8, maps (k, H, W) uint8, saliency (H, W) uint8 or None) of one line."""
    image = load_image(find_image(images_dir, name))
    size = image.shape[:2]
    maps = []
    for c in classes:
        path = os.path.join(maps_dir, f"{name}_{c}.png")
        m = load_grey(path, f"attention map of class {c}")
        if m.shape != size:
            raise ValueError(f"attention map {path} is {m.shape}, its image is {size} (H, W)")
        maps.append(m)
    sal = None
    if saliency_dir is not None:
        path = os.path.join(saliency_dir, name + ".png")
        sal = load_grey(path, "saliency map")
        if sal.shape != size:
            raise ValueError(f"saliency map {path} is {sal.shape}, its image is {size} (H, W)")
    maps = np.stack(maps) if maps else np.zeros((0,) + size, np.uint8)
    return image, maps, sal


# ------------------------------------------------------------------------------------ the rules
def class_scores(maps: np.ndarray) -> np.ndarray:
    """(k, H, W) maps (any numbers) -> float64 each scaled by its own min and max to [0, 1]."""
    maps = np.asarray(maps, np.float64)
    lo = maps.min(axis=(1, 2), keepdims=True) if maps.size else maps
    hi = maps.max(axis=(1, 2), keepdims=True) if maps.size else maps
    return (maps - lo) / (hi - lo + 1e-8)


def initial_scores(maps: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """(1 + k, H, W) float64: background ``(1 - max_c map_c) ** alpha``, then the scaled class maps."""
    cams = class_scores(maps)
    top = cams.max(axis=0) if cams.shape[0] else np.zeros(cams.shape[1:])
    return np.concatenate([((1.0 - top) ** alpha)[None], cams])


def labels_from_scores(refined: np.ndarray, classes: Sequence[int], num_classes: int,
                       saliency: Optional[np.ndarray] = None) -> np.ndarray:
    """Rules 3-6 of the module doc.

    Args:
        refined: (1 + k, H, W) refined background + class scores (classes in ``classes`` order).
        classes: k distinct 0-based classes.  num_classes: foreground classes (VOC 20).
        saliency: (H, W) 0-255 or None.
    Returns:
        (H, W) uint8 label map (0 background, c + 1, 255 ignore).
    """
    refined = np.asarray(refined, np.float64)
    h, w = refined.shape[1:]
    planes = np.zeros((num_classes + 1, h, w), np.float64)
    sal = np.zeros((h, w), np.float64) if saliency is None else np.asarray(saliency, np.float64)
    planes[0] = refined[0] if saliency is None else 1.0 - sal / 255.0
    raised = sal.copy()
    for i, c in enumerate(classes):
        planes[c + 1] = refined[i + 1]
        raised = np.maximum(raised, (refined[i + 1] > ATT_THRESHOLD) * 255.0)
    conflict = (planes > CONFLICT).sum(axis=0) > 1
    label = planes.argmax(axis=0).astype(np.uint8)
    label[conflict] = 255
    label[(raised >= BG_THRESHOLD) & (label == 0)] = 255
    objects = int(((label > 0) & (label < 255)).sum())
    if objects < MIN_OBJECT_FRACTION * h * w:
        label[...] = 255
    return label


def refine_scores(image: np.ndarray, scores: np.ndarray, method: str, *, device: str = "cpu",
                  par_iters: int = 10, par_dilations: Sequence[int] = DEFAULT_DILATIONS) -> np.ndarray:
    """Rule 2: (1 + k, H, W) scores refined by ``method`` in {none, crf, par}."""
    if method == "none" or scores.shape[0] == 0:
        return scores
    if method == "crf":
        return crf_refine(image, scores.astype(np.float32), t=CRF_ITERS).astype(np.float64)
    if method == "par":
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(device)
        s = torch.from_numpy(scores.astype(np.float32))[None].to(device)
        return par_refine(img, s, iters=par_iters, dilations=par_dilations)[0].cpu().double().numpy()
    raise ValueError(f"refine must be one of none, crf, par; got {method!r}")


def pseudo_label(image: np.ndarray, maps: np.ndarray, classes: Sequence[int], num_classes: int, *,
                 saliency: Optional[np.ndarray] = None, refine: str = "none", **refine_kwargs) -> np.ndarray:
    """The whole public rule set for one image; (H, W) uint8 label map."""
    refined = refine_scores(image, initial_scores(maps), refine, **refine_kwargs)
    return labels_from_scores(refined, classes, num_classes, saliency)


# ------------------------------------------------------------------------------------ program
def _job(task) -> Tuple[str, float]:
    """Worker: label one list line and write it; returns (name, seconds spent refining)."""
    name, classes, opts = task
    image, maps, sal = read_inputs(name, classes, opts["maps"], opts["images"], opts["saliency"])
    start = time.perf_counter()
    refined = refine_scores(image, initial_scores(maps), opts["refine"], device=opts["device"],
                            par_iters=opts["par_iters"], par_dilations=opts["par_dilations"])
    if opts["device"].startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    label = labels_from_scores(refined, classes, opts["num_classes"], sal)
    save_label_png(os.path.join(opts["out"], name + ".png"), label)
    return name, seconds


def _init_worker() -> None:
    torch.set_num_threads(1)  # N processes x 1 thread; more threads than cores only waits


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rca_fast.pseudo",
                                description="Proxy labels from attention maps (+ saliency), as the public "
                                            "gen_labels.py, with a dense CRF or a GPU-ready refinement.")
    p.add_argument("--maps", required=True, help="folder of <name>_<c>.png attention maps (grey 0-255)")
    p.add_argument("--list", required=True, help="'name c1 c2 ...' lines (0-based classes; train_cls.txt)")
    p.add_argument("--images", required=True, help="folder of <name>.jpg images")
    p.add_argument("--out", required=True, help="folder for <name>.png label maps (VOC palette)")
    p.add_argument("--saliency", default=None, help="folder of <name>.png saliency maps (grey 0-255)")
    p.add_argument("--refine", choices=("none", "crf", "par"), default="par",
                   help="refinement of the scores: crf = dense CRF (pip install \".[crf]\"), par = "
                        "pixel-adaptive refinement (torch), none")
    p.add_argument("--num-classes", type=int, default=20, help="foreground classes (VOC 20, COCO 80)")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="parallel processes (CPU); on a GPU the refinement runs in the main process")
    p.add_argument("--device", default="cpu", help="par: cpu or cuda[:N]")
    p.add_argument("--par-iters", type=int, default=10, help="par: propagation steps")
    p.add_argument("--par-dilations", default=",".join(map(str, DEFAULT_DILATIONS)),
                   help="par: neighbourhoods")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.num_classes < 1:
        raise ValueError("--num-classes counts the foreground classes and must be >= 1, got "
                         f"{args.num_classes}")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    for flag, folder in (("--maps", args.maps), ("--images", args.images), ("--saliency", args.saliency)):
        if folder is not None and not os.path.isdir(folder):
            raise DataFileError(f"{flag} folder not found: {folder}")
    if args.refine == "crf" and not crf_available():
        raise ImportError(f"--refine crf needs the dense CRF package pydensecrf: install the optional extra "
                          f"with {CRF_EXTRA_HINT} (pydensecrf2), or use --refine par")
    try:
        dilations = tuple(int(d) for d in args.par_dilations.split(",") if d.strip())
    except ValueError:
        raise ValueError(f"--par-dilations must be comma-separated ints, "
                         f"got {args.par_dilations!r}") from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")
    entries = read_class_list(args.list, args.num_classes)
    tasks: List = []
    opts = dict(maps=args.maps, images=args.images, saliency=args.saliency, refine=args.refine,
                device=args.device, par_iters=args.par_iters, par_dilations=dilations,
                num_classes=args.num_classes, out=args.out)
    for name, label in entries:
        classes = [] if label is None else np.flatnonzero(label).tolist()
        tasks.append((name, classes, opts))
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    refine_seconds = []
    bar = dict(total=len(tasks), desc=f"pseudo labels ({args.refine})", disable=not args.progress,
               dynamic_ncols=True)
    if args.workers == 1 or args.device.startswith("cuda"):
        for task in tqdm(tasks, **bar):
            refine_seconds.append(_job(task)[1])
    else:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(args.workers, initializer=_init_worker) as pool:
            for _, sec in tqdm(pool.imap_unordered(_job, tasks, chunksize=4), **bar):
                refine_seconds.append(sec)
    summary = {"images": len(tasks), "refine": args.refine, "saliency": args.saliency is not None,
               "workers": args.workers, "device": args.device, "seconds": round(time.time() - start, 2),
               "refine_seconds_per_image_median":
                   float(np.median(refine_seconds)) if refine_seconds else None,
               "out": args.out}
    with open(os.path.join(args.out, "pseudo.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {len(tasks)} label maps to {args.out} in {summary['seconds']:.1f}s "
          f"(refinement {args.refine}: median {1000 * (summary['refine_seconds_per_image_median'] or 0):.1f} "
          f"ms/image)")
    return summary


if __name__ == "__main__":
    run_program(main, [(ImportError, 2, "error")])   # --refine crf without pydensecrf
