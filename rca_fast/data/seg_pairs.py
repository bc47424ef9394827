"""Image + label-map pairs for training and evaluating a segmentation network (step 3).

A list file names the images (first token of each line: ``name``, ``name c c ...`` or
``JPEGImages/name.jpg``); ``IMAGES/<name>.jpg|.jpeg|.png`` is the image and
``LABELS/<name>.png`` its label map (0 background, class c -> c + 1, 255 ignore; e.g. what
``rca_fast.pseudo`` writes, or VOC's ``SegmentationClassAug``).  Every pair is checked at
construction: a missing label file, or one whose size differs from its image's, is an error
naming the file; a label value that is neither a class nor 255 is an error naming the file
when the item is read.

Training items are augmented as DeepLab trainers do: random scale (image bilinear, labels
nearest), horizontal flip, then a random ``crop x crop`` window, padded with the mean colour
(0 after normalisation) and 255 (ignored) where the scaled image is smaller.  The random draws
come from ``numpy.random.default_rng([seed, epoch, index])``, so an item is the same whatever
the worker, the process or a resume -- ask for it with the key ``(index, epoch)``.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .transforms import normalize_image
from .voc import DataFileError, find_image, load_image, load_mask

IGNORE = 255


def read_names(list_path: str) -> list:
    """Image names of a list file (first token of each non-empty line, directory and extension removed)."""
    if not os.path.isfile(list_path):
        raise DataFileError(f"list file not found: {list_path}")
    names = []
    with open(list_path) as f:
        for line in f:
            fields = line.split()
            if fields:
                name = os.path.basename(fields[0])
                stem, ext = os.path.splitext(name)
                names.append(stem if ext.lower() in (".jpg", ".jpeg", ".png") else name)
    if not names:
        raise ValueError(f"list file {list_path} holds no images")
    return names


def _png_size(path: str) -> Tuple[int, int]:
    """(H, W) from the file header (no pixel decoding); DataFileError naming ``path``."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except Exception as exc:
        raise DataFileError(f"cannot read {path}: {exc}") from exc
    return h, w


class SegmentationPairs(Dataset):
    """Images with label maps.

    Args:
        list_path, images_dir, labels_dir: see the module doc.
        num_classes: classes including background (VOC 21); label values must be < it or 255.
        train: augment (needs ``crop_size``) -- else items are whole images.
        crop_size, scale_range (lo, hi), flip, seed: the training augmentation.
    Items (train): ``image`` (3, crop, crop) float32, ``label`` (crop, crop) int64, ``index``.
    Items (eval): ``image`` (3, H, W) float32, ``label`` (H, W) int64, ``index``, ``name``.
    """

    def __init__(
        self,
        list_path: str,
        images_dir: str,
        labels_dir: str,
        num_classes: int,
        *,
        train: bool,
        crop_size: Optional[int] = None,
        scale_range: Sequence[float] = (0.5, 1.5),
        flip: bool = True,
        seed: int = 0,
    ):
        for flag, folder in (("images", images_dir), ("labels", labels_dir)):
            if not os.path.isdir(folder):
                raise DataFileError(f"{flag} folder not found: {folder}")
        if train and (crop_size is None or crop_size < 8):
            raise ValueError(f"SegmentationPairs: a training set needs crop_size >= 8, got {crop_size!r}")
        lo, hi = (float(s) for s in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale range must be 0 < low <= high, got {tuple(scale_range)}")
        self.names = read_names(list_path)
        self.image_paths = [find_image(images_dir, n) for n in self.names]
        self.label_paths = []
        for name, image_path in zip(self.names, self.image_paths):
            label_path = os.path.join(labels_dir, name + ".png")
            if not os.path.isfile(label_path):
                raise DataFileError(f"label map not found: {label_path} (listed in {list_path})")
            if _png_size(label_path) != _png_size(image_path):
                raise ValueError(f"label map {label_path} is {_png_size(label_path)} (H, W) but its image "
                                 f"{image_path} is {_png_size(image_path)}")
            self.label_paths.append(label_path)
        self.num_classes = int(num_classes)
        self.train, self.crop_size, self.scale_range = train, crop_size, (lo, hi)
        self.flip, self.seed = flip, int(seed)

    def __len__(self) -> int:
        return len(self.names)

    def raw(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """(image (H, W, 3) uint8, label (H, W) uint8), the label's values checked."""
        image, label = load_image(self.image_paths[index]), load_mask(self.label_paths[index])
        bad = (label >= self.num_classes) & (label != IGNORE)
        if bad.any():
            raise ValueError(
                f"label map {self.label_paths[index]} holds value {int(label[bad][0])}: expected "
                f"0..{self.num_classes - 1} (num_classes {self.num_classes}, background included) "
                f"or 255 (ignore)"
            )
        return image, label

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Dict[str, object]:
        index, epoch = (key, 0) if isinstance(key, (int, np.integer)) else (int(key[0]), int(key[1]))
        image, label = self.raw(index)
        if not self.train:
            return {
                "image": normalize_image(torch.from_numpy(image)),
                "label": torch.from_numpy(label).long(),
                "index": index,
                "name": self.names[index],
            }
        rng = np.random.default_rng([self.seed, epoch, index])
        x, y = augment(image, label, rng, self.crop_size, self.scale_range, self.flip)
        return {"image": x, "label": y, "index": index}


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, crop: int,
            scale_range: Tuple[float, float], flip: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random scale, flip, pad (0 / 255) and crop: ((3, crop, crop) float32, (crop, crop) int64)."""
    h, w = label.shape
    s = rng.uniform(*scale_range)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    if size != (w, h):
        image = np.array(Image.fromarray(image).resize(size, Image.BILINEAR))
        label = np.array(Image.fromarray(label).resize(size, Image.NEAREST))
    if flip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    x = normalize_image(torch.from_numpy(np.ascontiguousarray(image)))
    y = torch.from_numpy(np.ascontiguousarray(label)).long()
    h, w = y.shape
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    if ph or pw:
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), value=0.0)
        y = torch.nn.functional.pad(y, (0, pw, 0, ph), value=IGNORE)
    top = int(rng.integers(0, y.shape[0] - crop + 1))
    left = int(rng.integers(0, y.shape[1] - crop + 1))
    return (
        x[:, top : top + crop, left : left + crop].contiguous(),
        y[top : top + crop, left : left + crop].contiguous(),
    )
