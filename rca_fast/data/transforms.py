"""Image transforms shared by the datasets (numpy / PIL / torch, no torchvision needed).

Images move around as (H, W, 3) uint8 arrays until they are normalised with the ImageNet mean
and std (what the public code and the torchvision backbones expect) into (3, H, W) float.

Two training pipelines (``python -m rca_fast.train --input-pipeline``):

* :class:`PublicTrainTransform` (``public``, the default): the public loader's training
  transform -- resize to a square ``input_size x input_size`` (bilinear, aspect not kept),
  ``ColorJitter(0.3, 0.3, 0.3, 0.1)`` (:func:`public_color_jitter`: torchvision's four PIL
  jitters, hue included, in a random order per image), normalise; no flip, rescale or crop.
* :class:`TrainTransform` (``augmented``, rca_fast's earlier pipeline): long side
  ``input_size`` x U(0.9, 1.1), flip, jitter without hue in a fixed order, random
  ``crop_size`` crop zero-padded to a square.
"""
from __future__ import annotations

import random
from typing import Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageEnhance

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_image(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) normalised with the ImageNet mean/std."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() < 3 \
            or images.shape[-1] != 3:
        got = (f"{tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor)
               else type(images).__name__)
        raise ValueError(f"normalize_image: images must be a uint8 (..., H, W, 3) tensor, got {got}")
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = images.float().div_(255.0).movedim(-1, -3)
    return ((x - mean) / std).contiguous()


def resize_long(image: np.ndarray, long_side: int) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image so that its longer side is ``long_side`` (bilinear)."""
    h, w = image.shape[:2]
    scale = long_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image
    return np.array(Image.fromarray(image).resize(size, Image.BILINEAR))


def color_jitter(image: np.ndarray, rng, brightness: float = 0.3, contrast: float = 0.3,
                 saturation: float = 0.3) -> np.ndarray:
    """Random brightness / contrast / saturation change of an (H, W, 3) uint8 image."""
    x = image.astype(np.float32)
    x = x * rng.uniform(1 - brightness, 1 + brightness)
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean
    grey = x.mean(axis=2, keepdims=True)
    x = (x - grey) * rng.uniform(1 - saturation, 1 + saturation) + grey
    return x.clip(0, 255).astype(np.uint8)


def public_color_jitter(image: np.ndarray, rng, brightness: float = 0.3, contrast: float = 0.3,
                        saturation: float = 0.3, hue: float = 0.1) -> np.ndarray:
    """``torchvision.transforms.ColorJitter(brightness, contrast, saturation, hue)`` on an (H, W, 3)
    uint8 image, as the public loader applies it to its PIL images: factors drawn uniformly from
    [1 - x, 1 + x] (hue from [-hue, hue]), the four adjustments in a random order, each the PIL
    operation torchvision uses (ImageEnhance Brightness / Contrast / Color; hue: shift the H
    channel of PIL's HSV image by ``int(hue * 255)`` with uint8 wrap-around).  ``rng``: a
    ``random.Random``-like source (the draws come from it, not from torch's RNG)."""
    factors = (rng.uniform(1 - brightness, 1 + brightness), rng.uniform(1 - contrast, 1 + contrast),
               rng.uniform(1 - saturation, 1 + saturation), rng.uniform(-hue, hue))
    order = rng.sample(range(4), 4)
    img = Image.fromarray(image)
    for op in order:
        img = jitter_op(img, op, factors[op])
    return np.array(img)


def jitter_op(img: Image.Image, op: int, factor: float) -> Image.Image:
    """One of ColorJitter's adjustments on an RGB PIL image: 0 brightness, 1 contrast, 2 saturation, 3 hue."""
    if op == 0:
        return ImageEnhance.Brightness(img).enhance(factor)
    if op == 1:
        return ImageEnhance.Contrast(img).enhance(factor)
    if op == 2:
        return ImageEnhance.Color(img).enhance(factor)
    h, s, v = img.convert("HSV").split()
    shift = int(factor * 255) % 256          # int() truncates towards zero, as numpy's cast does
    h = Image.fromarray((np.array(h, dtype=np.uint8) + np.uint8(shift)).astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


class PublicTrainTransform:
    """The public loader's training transform (``--input-pipeline public``).

    ``Resize((input_size, input_size))`` (bilinear, the aspect ratio is not kept), then
    :func:`public_color_jitter` (``jitter=True``), then normalise.  No flip, rescale or crop.
    Returns a (3, input_size, input_size) float tensor; :meth:`with_view` also returns the
    ``view`` (rca_fast.utils.att_maps): the whole image, stretched to the square, unflipped.
    """

    def __init__(self, input_size: int, *, jitter: bool = True, seed: Optional[int] = None):
        self.input_size, self.jitter = int(input_size), bool(jitter)
        # the global ``random`` module by default: DataLoader re-seeds it in every worker
        self.rng = random.Random(seed) if seed is not None else random

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.with_view(image)[0]

    def with_view(self, image: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        """(image (3, s, s), view (11,) int64) with s = input_size."""
        H0, W0 = image.shape[:2]
        s = self.input_size
        if (H0, W0) != (s, s):
            image = np.array(Image.fromarray(image).resize((s, s), Image.BILINEAR))
        if self.jitter:
            image = public_color_jitter(image, self.rng)
        x = normalize_image(torch.from_numpy(np.ascontiguousarray(image)))
        view = torch.tensor([H0, W0, s, s, 0, 0, 0, 0, 0, s, s], dtype=torch.int64)
        return x, view


class TrainTransform:
    """rca_fast's earlier training augmentation for real images (``--input-pipeline augmented``).

    Resize the longer side to ``input_size`` (x a random scale in ``scale_range``), random
    horizontal flip, colour jitter, then a random ``crop_size`` x ``crop_size`` crop, padded with
    the mean colour (0 after normalisation) where the image is smaller.
    Returns a (3, crop_size, crop_size) float tensor; :meth:`with_view` also says where the crop
    came from (for ``--att_dir``, which puts each training map back on its image).
    """

    def __init__(self, input_size: int, crop_size: int, *, scale_range: Tuple[float, float] = (0.9, 1.1),
                 flip: bool = True, jitter: bool = True, seed: Optional[int] = None):
        self.input_size, self.crop_size = int(input_size), int(crop_size)
        self.scale_range, self.flip, self.jitter = scale_range, flip, jitter
        # the global ``random`` module by default: DataLoader re-seeds it in every worker, so
        # workers do not repeat each other's augmentations
        self.rng = random.Random(seed) if seed is not None else random

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.with_view(image)[0]

    def with_view(self, image: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        """(crop (3, crop, crop), view (11,) int64): original (H0, W0), resized (h, w), flip, crop
        source (sy, sx), destination (dy, dx), copied size (hh, ww) -- see rca_fast.utils.att_maps."""
        rng = self.rng
        H0, W0 = image.shape[:2]
        long_side = max(8, round(self.input_size * rng.uniform(*self.scale_range)))
        image = resize_long(image, long_side)
        flipped = bool(self.flip and rng.random() < 0.5)
        if flipped:
            image = image[:, ::-1]
        if self.jitter:
            image = color_jitter(image, rng)
        x = normalize_image(torch.from_numpy(np.ascontiguousarray(image)))
        box = []
        out = random_crop_pad(x, self.crop_size, rng, box)
        view = torch.tensor([H0, W0, x.shape[1], x.shape[2], int(flipped)] + box, dtype=torch.int64)
        return out, view


def random_crop_pad(x: torch.Tensor, crop: int, rng, box: Optional[list] = None) -> torch.Tensor:
    """Random crop of a (C, H, W) tensor to (C, crop, crop), zero-padding a short side.
    ``box``, when given, receives [sy, sx, dy, dx, hh, ww]:
    out[dy:dy+hh, dx:dx+ww] = x[sy:sy+hh, sx:sx+ww]."""
    c, h, w = x.shape
    out = x.new_zeros(c, crop, crop)
    # where the image is larger: pick the window; where smaller: pick where the image lands
    sy = rng.randint(0, max(0, h - crop))
    sx = rng.randint(0, max(0, w - crop))
    dy = rng.randint(0, max(0, crop - h))
    dx = rng.randint(0, max(0, crop - w))
    hh, ww = min(h, crop), min(w, crop)
    out[:, dy:dy + hh, dx:dx + ww] = x[:, sy:sy + hh, sx:sx + ww]
    if box is not None:
        box[:] = [sy, sx, dy, dx, hh, ww]
    return out
