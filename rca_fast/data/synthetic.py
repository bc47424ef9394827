"""The built-in synthetic dataset: procedurally drawn scenes with image tags and pixel masks.

Every class is a (shape, texture) pair with its own hue family, e.g. "square/stripes".  A scene
holds 1-3 objects (several instances of one class are allowed) on a cluttered background:
smooth colour gradients, low-frequency blotches, pixel noise, and distractors that reuse the
class hues and textures on shapes no class has (elongated ellipses, bars), plus thin lines drawn
over the objects.  So neither colour nor texture alone separates objects from clutter, and a
CAM that fires on colour alone is penalised -- the maps are not trivially perfect.

Scenes are generated in memory from ``numpy.random.default_rng([seed, split, index])``: the same
(seed, split, index) always gives the same image, whatever the dataset size.

Masks use the VOC convention: 0 background, class c -> c + 1, 255 ignore (an object almost
hidden by others is marked ignore and left out of the tags).
"""
from __future__ import annotations

import math
import os
import random
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..utils.att_maps import identity_view
from .transforms import normalize_image, public_color_jitter

SHAPES = ("square", "disc", "triangle", "cross", "ring", "diamond", "star", "hexagon")
TEXTURES = ("stripes", "checker", "dots", "solid")
SPLITS = {"train": 0, "val": 1, "test": 2}
MIN_VISIBLE = 0.3  # an object keeps its tag when at least this fraction of it stays visible


def class_spec(num_classes: int) -> List[Tuple[str, str, float]]:
    """(shape, texture, hue) of each class.

    Shapes cycle fastest and textures change every ``len(shapes)`` classes, with the number of
    shapes chosen so that several classes share a shape and several share a texture (for 6
    classes: 3 shapes x 2 textures).  Hues are spread evenly over the colour circle.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"synthetic: num_classes must be an int >= 1, got {num_classes!r}")
    n_shapes = min(len(SHAPES), max(2, math.ceil(math.sqrt(num_classes * 1.5))))
    spec = []
    for c in range(num_classes):
        shape = SHAPES[c % n_shapes]
        texture = TEXTURES[(c // n_shapes) % len(TEXTURES)]
        spec.append((shape, texture, (c * 0.618034) % 1.0))
    return spec


def class_names(num_classes: int) -> List[str]:
    """Readable names, e.g. ``square/stripes``; repeats get a ``#k`` suffix."""
    names, seen = [], {}
    for shape, texture, _ in class_spec(num_classes):
        base = f"{shape}/{texture}"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return names


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], np.float32)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a unit-size shape in rotated, centred coordinates (u, v) (radius ~1)."""
    r = np.sqrt(u * u + v * v)
    if shape == "square":
        return (np.abs(u) < 0.8) & (np.abs(v) < 0.8)
    if shape == "disc":
        return r < 0.95
    if shape == "triangle":
        return (v > -0.6) & (v < 1.0 - 1.0 * np.abs(u) * 1.9) & (v < 1.0)
    if shape == "cross":
        return ((np.abs(u) < 0.33) & (np.abs(v) < 1.0)) | ((np.abs(v) < 0.33) & (np.abs(u) < 1.0))
    if shape == "ring":
        return (r < 1.0) & (r > 0.55)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) < 1.05
    if shape == "star":
        ang = np.arctan2(v, u)
        return r < 0.55 + 0.45 * np.abs(np.cos(2.5 * ang))
    if shape == "hexagon":
        ang = np.arctan2(v, u)
        edge = np.cos(math.pi / 6) / np.cos((ang % (math.pi / 3)) - math.pi / 6)
        return r < 0.95 * edge
    if shape == "ellipse":  # distractor only
        return (u / 1.0) ** 2 + (v / 0.35) ** 2 < 1.0
    if shape == "bar":  # distractor only
        return (np.abs(u) < 1.0) & (np.abs(v) < 0.18)
    if shape == "line":  # thin occluder, 2-5 px wide at the radii used
        return (np.abs(u) < 1.0) & (np.abs(v) < 0.04)
    raise ValueError(f"synthetic: unknown shape {shape!r}")


def _texture(texture: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Texture intensity in [0, 1] on pixel coordinates (u, v), ``period`` pixels per cycle."""
    if texture == "stripes":
        return (np.sin(2 * math.pi * u / period) > 0).astype(np.float32)
    if texture == "checker":
        return ((np.sin(2 * math.pi * u / period) * np.sin(2 * math.pi * v / period)) > 0).astype(np.float32)
    if texture == "dots":
        du = (u / period) - np.round(u / period)
        dv = (v / period) - np.round(v / period)
        return (du * du + dv * dv < 0.09).astype(np.float32)
    if texture == "solid":
        return np.full(u.shape, 0.85, np.float32) + 0.15 * np.sin(u / (3 * period)).astype(np.float32)
    raise ValueError(f"synthetic: unknown texture {texture!r}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth gradient + low-frequency colour blotches, float (H, W, 3) in [0, 1]."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = _hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.35, 0.8))
    ang = rng.uniform(0, 2 * math.pi)
    grad = (xs * math.cos(ang) + ys * math.sin(ang))[..., None] * rng.uniform(-0.3, 0.3, 3).astype(np.float32)
    coarse = rng.normal(0.0, 0.12, (5, 5, 3)).astype(np.float32)
    blot = torch.nn.functional.interpolate(torch.from_numpy(coarse).permute(2, 0, 1)[None], size=(size, size),
                                           mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    return base[None, None, :] + grad + blot


def _paint(img: np.ndarray, region: np.ndarray, tex: np.ndarray, colour: np.ndarray,
           shade: np.ndarray) -> None:
    """Write a textured colour into ``img`` under ``region`` (in place)."""
    dark = colour * 0.4
    val = (dark[None, :] + (colour - dark)[None, :] * tex[region][:, None]) * shade[region][:, None]
    img[region] = val


def render_scene(rng: np.random.Generator, num_classes: int, size: int = 96, max_objects: int = 3,
                 spec: Sequence[Tuple[str, str, float]] = None):
    """Draw one scene.

    Returns:
        image (size, size, 3) uint8, mask (size, size) uint8 (0 bg, c+1, 255 ignore),
        label (num_classes,) float32 multi-hot of the visible classes (at least one).
    """
    spec = spec if spec is not None else class_spec(num_classes)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(20):  # almost always succeeds at the first try
        img = _background(rng, size)
        mask = np.zeros((size, size), np.uint8)
        owner = np.full((size, size), -1, np.int32)   # which object painted the pixel last

        def draw(shape, texture, colour, cx, cy, radius, theta, period):
            u = ((xs - cx) * math.cos(theta) + (ys - cy) * math.sin(theta))
            v = (-(xs - cx) * math.sin(theta) + (ys - cy) * math.cos(theta))
            region = _shape_mask(shape, u / radius, v / radius)
            tex = _texture(texture, u, v, period)
            sdir = rng.uniform(0, 2 * math.pi)
            shade = 1.0 + 0.25 * ((u * math.cos(sdir) + v * math.sin(sdir)) / radius).clip(-1, 1)
            _paint(img, region, tex, colour, shade)
            return region

        # distractors under the objects: class hues and textures on shapes no class has
        for _ in range(rng.integers(2, 6)):
            shape = "ellipse" if rng.random() < 0.6 else "bar"
            hue = spec[rng.integers(len(spec))][2] if rng.random() < 0.4 else rng.random()
            colour = _hsv_to_rgb((hue + rng.normal(0, 0.03)) % 1.0, rng.uniform(0.5, 1.0),
                                 rng.uniform(0.5, 1.0))
            draw(shape, TEXTURES[rng.integers(len(TEXTURES))], colour, rng.uniform(0, size),
                 rng.uniform(0, size),
                 rng.uniform(0.08, 0.22) * size, rng.uniform(0, math.pi), rng.uniform(3.0, 6.0))

        n_obj = int(rng.choice(np.arange(1, max_objects + 1), p=_object_count_probs(max_objects)))
        classes = rng.integers(0, num_classes, n_obj)
        areas = []
        for k, c in enumerate(classes):
            shape, texture, hue = spec[c]
            colour = _hsv_to_rgb((hue + rng.normal(0, 0.025)) % 1.0, rng.uniform(0.55, 1.0),
                                 rng.uniform(0.6, 1.0))
            radius = rng.uniform(0.13, 0.25) * size
            cx, cy = rng.uniform(0.5 * radius, size - 0.5 * radius, 2)
            region = draw(shape, texture, colour, cx, cy, radius, rng.uniform(0, 2 * math.pi),
                          rng.uniform(3.0, 6.0))
            mask[region] = c + 1
            owner[region] = k
            areas.append(int(region.sum()))

        # thin occluding lines over everything: they are background in the mask
        for _ in range(rng.integers(0, 3)):
            colour = _hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.6), rng.uniform(0.2, 0.9))
            region = draw("line", "solid", colour, rng.uniform(0, size), rng.uniform(0, size),
                          rng.uniform(0.3, 0.6) * size, rng.uniform(0, math.pi), 4.0)
            mask[region] = 0
            owner[region] = -1

        label = np.zeros(num_classes, np.float32)
        for k, c in enumerate(classes):
            visible = int((owner == k).sum())
            if areas[k] and visible >= MIN_VISIBLE * areas[k] and visible >= 12:
                label[c] = 1.0
        for k, c in enumerate(classes):  # a hidden object whose class is not tagged elsewhere
            if label[c] == 0:
                mask[owner == k] = 255
        if label.any():
            break
    img = img + rng.normal(0.0, 0.04, img.shape).astype(np.float32)
    return (img.clip(0, 1) * 255 + 0.5).astype(np.uint8), mask, label


def _object_count_probs(max_objects: int) -> np.ndarray:
    p = np.array([0.5, 0.3, 0.2][:max_objects] + [0.1] * max(0, max_objects - 3), np.float64)
    return p / p.sum()


class SyntheticShapes(Dataset):
    """In-memory synthetic scenes (generated at construction, deterministic by seed).

    Args:
        num_images: N.  num_classes: L (6 by default).  image_size: side in pixels.
        seed: data seed.  split: "train" | "val" | "test" (independent streams of scenes).
        max_objects: 1..max objects per image.  flip: random horizontal flip in __getitem__.
        jitter: the public loader's ``ColorJitter(0.3, 0.3, 0.3, 0.1)`` in __getitem__
            (:func:`rca_fast.data.transforms.public_color_jitter`, draws from the global ``random``).
    Items: dict with ``image`` (3, H, W) float normalised, ``label`` (L,) float 0/1,
    ``mask`` (H, W) int64 (0 bg, c+1, 255 ignore), ``name`` str, ``index`` int, ``view`` (11,)
    int64 (whole image, flipped or not; see rca_fast.utils.att_maps).
    Attributes ``images`` (N, H, W, 3) uint8, ``masks`` (N, H, W) uint8, ``labels`` (N, L) float32.
    """

    def __init__(self, num_images: int = 512, num_classes: int = 6, image_size: int = 96, *, seed: int = 0,
                 split: str = "train", max_objects: int = 3, flip: bool = False, jitter: bool = False):
        for name, value, low in (("num_images", num_images, 1), ("image_size", image_size, 16),
                                 ("max_objects", max_objects, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"SyntheticShapes: {name} must be an int >= {low}, got {value!r}")
        if split not in SPLITS:
            raise ValueError(f"SyntheticShapes: split must be one of {sorted(SPLITS)}, got {split!r}")
        self.num_classes = num_classes
        self.class_names = class_names(num_classes)
        self.flip, self.jitter = flip, jitter
        self.split = split
        spec = class_spec(num_classes)
        scenes = [render_scene(np.random.default_rng([seed, SPLITS[split], i]), num_classes, image_size,
                               max_objects, spec) for i in range(num_images)]
        self.images = np.stack([s[0] for s in scenes])
        self.masks = np.stack([s[1] for s in scenes])
        self.labels = np.stack([s[2] for s in scenes])
        self.names = [f"syn_{split}_{i:05d}" for i in range(num_images)]
        self._normalised = normalize_image(torch.from_numpy(self.images))

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Dict[str, object]:
        if self.jitter:
            image = normalize_image(torch.from_numpy(public_color_jitter(self.images[index], random)))
        else:
            image = self._normalised[index]
        mask = torch.from_numpy(self.masks[index]).long()
        flipped = bool(self.flip and torch.rand(()) < 0.5)
        if flipped:
            image, mask = image.flip(-1), mask.flip(-1)
        # view: where the training input came from (here: the whole image, maybe flipped), so
        # --att_dir can put each map back in place (rca_fast.utils.att_maps)
        return {"image": image, "label": torch.from_numpy(self.labels[index]), "mask": mask,
                "name": self.names[index], "index": index, "view": identity_view(*image.shape[-2:], flipped)}

    def raw_image(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8 image as drawn (for overlays)."""
        return self.images[index]


def export_voc(root: str, *, train: int = 200, val: int = 50, num_classes: int = 6, image_size: int = 96,
               seed: int = 0) -> Dict[str, str]:
    """Write synthetic scenes as a VOC-format folder.

    Layout: ``JPEGImages/<name>.jpg`` (PNG-quality JPEG), ``SegmentationClass/<name>.png``
    (VOC palette), ``train_cls.txt`` / ``val_cls.txt`` in the public list format
    (``name c c ...``, 0-based) and ``ImageSets/Segmentation/{train,val}.txt``.
    Returns the paths written (keys: root, train_list, val_list).
    """
    from PIL import Image

    from ..utils.palette import save_label_png

    os.makedirs(os.path.join(root, "JPEGImages"), exist_ok=True)
    os.makedirs(os.path.join(root, "SegmentationClass"), exist_ok=True)
    os.makedirs(os.path.join(root, "ImageSets", "Segmentation"), exist_ok=True)
    paths = {"root": root}
    for split, count in (("train", train), ("val", val)):
        if count <= 0:
            continue
        ds = SyntheticShapes(count, num_classes, image_size, seed=seed, split=split)
        lines = []
        for i, name in enumerate(ds.names):
            Image.fromarray(ds.images[i]).save(os.path.join(root, "JPEGImages", name + ".jpg"), quality=95)
            save_label_png(os.path.join(root, "SegmentationClass", name + ".png"), ds.masks[i])
            lines.append(" ".join([name] + [str(c) for c in np.flatnonzero(ds.labels[i])]))
        list_path = os.path.join(root, f"{split}_cls.txt")
        with open(list_path, "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
            f.write("\n".join(ds.names) + "\n")
        paths[f"{split}_list"] = list_path
    return paths
