"""PASCAL VOC 2012 / COCO 2014 readers in the formats WSSS code uses.

Folder: ``JPEGImages/<name>.jpg`` and ``SegmentationClassAug/<name>.png`` (or
``SegmentationClass/``; label maps with 0 background, class c -> c + 1, 255 ignore).
Class lists: the public RCA format, one image a line, ``name c c ...`` with 0-based classes;
or a list of names with the tags in IRN's ``cls_labels.npy`` (a dict name -> (L,) 0/1 vector,
names stored as strings or as IRN's integers, 2007_000032 -> 2007000032).
A missing or unreadable file raises an error naming it.

``write_class_list`` writes the public list format from the segmentation masks:
``python -m rca_fast.data class-list --data-root VOC2012 --names ImageSets/Segmentation/train.txt
--out VOC2012/train_cls.txt``.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .transforms import normalize_image, resize_long

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
COCO_CLASSES = ("person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
                "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
                "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
                "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
                "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
                "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
                "orange",
                "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
                "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
                "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
                "teddy bear", "hair drier", "toothbrush")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
MASK_DIRS = ("SegmentationClassAug", "SegmentationClass")


class DataFileError(FileNotFoundError):
    """A data file (image, mask, list) is missing or cannot be read; the message names it."""


def load_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB; raises DataFileError naming ``path`` when missing or unreadable."""
    if not os.path.isfile(path):
        raise DataFileError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except Exception as exc:  # PIL raises several types for broken files
        raise DataFileError(f"cannot read image {path}: {exc}") from exc


def load_mask(path: str) -> np.ndarray:
    """(H, W) uint8 label map (palette indices of a VOC PNG); DataFileError naming ``path``."""
    if not os.path.isfile(path):
        raise DataFileError(f"mask not found: {path}")
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L", "I", "I;16"):
                raise ValueError(f"expected a palette or grey-level PNG, got mode {img.mode}")
            mask = np.array(img)
        if mask.size and int(mask.max()) > 255:  # 16-bit PNGs: a cast to uint8 would wrap silently
            raise ValueError(f"label values up to {int(mask.max())}; expected 0..255 (255 = ignore)")
        return mask.astype(np.uint8)
    except DataFileError:
        raise
    except Exception as exc:
        raise DataFileError(f"cannot read mask {path}: {exc}") from exc


def _irn_key(name: str) -> Optional[int]:
    """IRN's integer encoding of a VOC name (2007_000032 -> 2007000032), None if not of that form."""
    digits = name.replace("_", "")
    return int(digits) if digits.isdigit() else None


def load_cls_labels(path: str) -> Dict[str, np.ndarray]:
    """IRN's ``cls_labels.npy``: a dict of name (str or IRN int) -> (L,) 0/1 vector."""
    if not os.path.isfile(path):
        raise DataFileError(f"class labels not found: {path}")
    try:
        data = np.load(path, allow_pickle=True).item()
    except Exception as exc:
        raise DataFileError(f"cannot read class labels {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise DataFileError(f"class labels {path}: expected a dict name -> vector, got {type(data).__name__}")
    return {str(k): np.asarray(v, np.float32) for k, v in data.items()}


def read_class_list(path: str, num_classes: int, cls_labels: Optional[Dict[str, np.ndarray]] = None
                    ) -> List[Tuple[str, Optional[np.ndarray]]]:
    """Read a list file: ``name c c ...`` (0-based classes) or bare names.

    Bare names take their tags from ``cls_labels`` (IRN dict) when given, else None.
    Returns [(name, (num_classes,) float32 multi-hot or None)].
    """
    if not os.path.isfile(path):
        raise DataFileError(f"list file not found: {path}")
    entries = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            # "JPEGImages/x.jpg", "x.jpg" and "x" all name image x
            name = os.path.basename(fields[0])
            if os.path.splitext(name)[1].lower() in IMAGE_EXTS:
                name = os.path.splitext(name)[0]
            label = None
            if len(fields) > 1:
                label = np.zeros(num_classes, np.float32)
                for tok in fields[1:]:
                    try:
                        c = int(tok)
                    except ValueError:
                        raise ValueError(f"{path}:{lineno}: class {tok!r} is not an integer") from None
                    if not 0 <= c < num_classes:
                        raise ValueError(f"{path}:{lineno}: class {c} is outside [0, {num_classes}) "
                                         f"(classes are 0-based; is --num_classes right?)")
                    label[c] = 1.0
            elif cls_labels is not None:
                key = name if name in cls_labels else str(_irn_key(name))
                if key not in cls_labels:
                    raise ValueError(f"{path}:{lineno}: {name} has no entry in the class labels")
                label = cls_labels[key][:num_classes].astype(np.float32)
                if label.shape != (num_classes,):
                    raise ValueError(f"class labels of {name} have {label.shape[0]} entries, "
                                     f"expected num_classes = {num_classes}")
            entries.append((name, label))
    if not entries:
        raise ValueError(f"list file {path} holds no images")
    return entries


def find_image(img_dir: str, name: str) -> str:
    """Path of ``name`` in ``img_dir`` (.jpg, .jpeg or .png); DataFileError naming the .jpg path."""
    for ext in IMAGE_EXTS:
        path = os.path.join(img_dir, name + ext)
        if os.path.isfile(path):
            return path
    raise DataFileError(f"image not found: {os.path.join(img_dir, name + '.jpg')} "
                        f"(also tried .jpeg and .png)")


def find_mask_dir(data_root: str) -> Optional[str]:
    """``SegmentationClassAug`` if present, else ``SegmentationClass``, else None."""
    for sub in MASK_DIRS:
        path = os.path.join(data_root, sub)
        if os.path.isdir(path):
            return path
    return None


def write_class_list(mask_dir: str, names: Sequence[str], out_path: str, num_classes: int = 20
                     ) -> List[Tuple[str, List[int]]]:
    """Write the public list format (``name c c ...``, 0-based) from segmentation masks.

    A class is listed when any pixel of the mask holds c + 1 (0 background and 255 ignore are
    skipped).  Images without any object are still written, as a bare name.
    Returns [(name, classes)].
    """
    rows = []
    for name in names:
        mask = load_mask(os.path.join(mask_dir, name + ".png"))
        values = np.unique(mask)
        classes = [int(v) - 1 for v in values if 1 <= v <= num_classes]
        rows.append((name, classes))
    d = os.path.dirname(out_path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(out_path, "w") as f:
        for name, classes in rows:
            f.write(" ".join([name] + [str(c) for c in classes]) + "\n")
    return rows


class VOCClassification(Dataset):
    """Images and tags for training (real data, VOC or COCO).

    Items: dict ``image`` (3, crop, crop) float from ``transform(uint8 image)``, ``label`` (L,),
    ``name``, ``index`` and, when the transform has ``with_view`` (TrainTransform), ``view`` (11,)
    int64: where the crop came from (rca_fast.utils.att_maps).  Every image is checked to exist at
    construction.
    """

    def __init__(self, list_path: str, img_dir: str, num_classes: int, transform, *,
                 cls_labels: Optional[str] = None):
        labels = load_cls_labels(cls_labels) if cls_labels else None
        entries = read_class_list(list_path, num_classes, labels)
        missing = [n for n, lab in entries if lab is None]
        if missing:
            raise ValueError(f"{list_path}: {missing[0]} (and {len(missing) - 1} more) has no classes: use "
                             f"the 'name c c ...' format or give IRN's cls_labels.npy")
        self.names = [n for n, _ in entries]
        self.labels = np.stack([lab for _, lab in entries])
        self.paths = [find_image(img_dir, n) for n in self.names]
        self.num_classes = num_classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int):
        raw = load_image(self.paths[index])
        item = {"label": torch.from_numpy(self.labels[index]), "name": self.names[index], "index": index}
        if hasattr(self.transform, "with_view"):  # where the crop came from, for --att_dir
            item["image"], item["view"] = self.transform.with_view(raw)
        else:
            item["image"] = self.transform(raw)
        return item


class VOCSegmentation(Dataset):
    """Images with tags and (optional) masks for CAM evaluation and inference (batch size 1).

    Items: dict ``image`` (3, h, w) float (longer side resized to ``long_side`` when given, else
    the original size), ``label`` (L,) or None when the list has no tags, ``mask`` (H, W) int64
    at the original size (only with ``mask_dir``), ``name``, ``index``, ``size`` (H, W).
    """

    def __init__(self, list_path: str, img_dir: str, num_classes: int, *, mask_dir: Optional[str] = None,
                 long_side: Optional[int] = None, cls_labels: Optional[str] = None,
                 max_images: Optional[int] = None):
        labels = load_cls_labels(cls_labels) if cls_labels else None
        entries = read_class_list(list_path, num_classes, labels)
        if max_images:
            entries = entries[:max_images]
        self.names = [n for n, _ in entries]
        self.labels = [lab for _, lab in entries]
        self.paths = [find_image(img_dir, n) for n in self.names]
        self.mask_paths = None
        if mask_dir is not None:
            self.mask_paths = [os.path.join(mask_dir, n + ".png") for n in self.names]
            for p in self.mask_paths:
                if not os.path.isfile(p):
                    raise DataFileError(f"mask not found: {p}")
        self.num_classes = num_classes
        self.long_side = long_side

    def __len__(self) -> int:
        return len(self.names)

    def raw_image(self, index: int) -> np.ndarray:
        return load_image(self.paths[index])

    def __getitem__(self, index: int):
        raw = self.raw_image(index)
        image = resize_long(raw, self.long_side) if self.long_side else raw
        item = {"image": normalize_image(torch.from_numpy(np.ascontiguousarray(image))),
                "name": self.names[index], "index": index, "size": tuple(raw.shape[:2])}
        label = self.labels[index]
        item["label"] = torch.from_numpy(label) if label is not None else None
        if self.mask_paths is not None:
            mask = load_mask(self.mask_paths[index])
            if mask.shape != raw.shape[:2]:
                raise ValueError(f"mask {self.mask_paths[index]} is {mask.shape}, its image "
                                 f"{self.paths[index]} is {raw.shape[:2]}")
            item["mask"] = torch.from_numpy(mask).long()
        return item
