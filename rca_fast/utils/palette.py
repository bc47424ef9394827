"""Colours: the VOC label palette, label PNG writing, CAM heat maps and overlays."""
from __future__ import annotations

import os
from typing import List, Sequence

import numpy as np
from PIL import Image


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map, (n, 3) uint8: label k's colour comes from the bits of k."""
    palette = np.zeros((n, 3), np.uint8)
    for k in range(n):
        c, r, g, b = k, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[k] = (r, g, b)
    return palette


def save_label_png(path: str, label: np.ndarray) -> None:
    """Write an (H, W) label map (0..254 classes, 255 ignore) as a VOC-palette PNG."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"save_label_png: label must be (H, W), got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"save_label_png: label values must be in [0, 255], got [{label.min()}, "
                         f"{label.max()}]")
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    img.putpalette(voc_palette().reshape(-1).tolist())
    img.save(path)


def colorize_label(label: np.ndarray) -> np.ndarray:
    """(H, W) label map -> (H, W, 3) uint8 RGB with the VOC palette."""
    return voc_palette()[np.asarray(label).astype(np.uint8)]


# control points of a blue -> cyan -> yellow -> red heat map ("jet"-like)
_HEAT_STOPS = np.array([[0.0, 0.0, 0.5], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0],
                        [1.0, 0.0, 0.0], [0.5, 0.0, 0.0]], np.float32)


def heatmap_rgb(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 heat-map colours."""
    v = np.clip(np.nan_to_num(np.asarray(values, np.float32)), 0.0, 1.0) * (len(_HEAT_STOPS) - 1)
    lo = np.floor(v).astype(np.int64).clip(0, len(_HEAT_STOPS) - 2)
    frac = (v - lo)[..., None]
    rgb = _HEAT_STOPS[lo] * (1 - frac) + _HEAT_STOPS[lo + 1] * frac
    return (rgb * 255 + 0.5).astype(np.uint8)


def overlay(image: np.ndarray, values: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a heat map of (H, W) ``values`` in [0, 1] over an (H, W, 3) uint8 image."""
    heat = heatmap_rgb(values).astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + heat * alpha + 0.5).clip(0, 255).astype(np.uint8)


def overlay_strip(image: np.ndarray, cams: np.ndarray, label: np.ndarray, gap: int = 4) -> np.ndarray:
    """One picture per image: [image | heat map of each class in ``cams`` (k, H, W) | label colours]."""
    panels: List[np.ndarray] = [image] + [overlay(image, cam) for cam in cams] + [colorize_label(label)]
    h = image.shape[0]
    sep = np.full((h, gap, 3), 255, np.uint8)
    row: List[np.ndarray] = []
    for p in panels:
        row += [p, sep]
    return np.concatenate(row[:-1], axis=1)


def class_names_for(num_fg: int, names: Sequence[str] = None) -> List[str]:
    """Names of 0 background + ``num_fg`` classes; ``class k`` where none are known."""
    if names is not None and len(names) == num_fg:
        return ["background"] + list(names)
    return ["background"] + [f"class {k}" for k in range(num_fg)]
