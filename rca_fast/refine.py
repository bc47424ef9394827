"""Refinement of per-pixel score maps by the image: ``par`` (torch, CPU/GPU, batched) and ``crf``.

``par_refine`` -- pixel-adaptive refinement, the approach recent single-stage WSSS methods use in
place of a dense CRF.  Every pixel looks at K neighbours: itself and the 8 pixels at distance d
(horizontally, vertically, diagonally) for each dilation d.  Its weight for neighbour k is

    A_k = (softmax_k(-(|I - I_k| / (w_colour * s_I))^2  averaged over the colour channels)
           + w_pos * softmax_k(-(|o_k| / (w_dist * s_o))^2)) / (1 + w_pos)

with s_I the per-pixel, per-channel standard deviation of the K neighbours' colours (so the
colour term adapts to the local contrast), o_k the neighbour's offset and s_o the standard
deviation of the offsets' lengths.  The weights of a pixel sum to 1; the scores are then
replaced ``iters`` times by their A-weighted neighbourhood average, so values spread inside
regions of similar colour and stop at colour edges, and stay in the range they started in.
Borders use the nearest pixel (replicate padding).  Memory: the K weights per pixel
(B, K, H, W) plus one shifted copy of the scores at a time.

``crf_refine`` -- the public pipeline's dense CRF (pydensecrf: Gaussian sxy 3 compat 3, bilateral
sxy 80 srgb 13 compat 10, unary -log of the scores, ``t`` mean-field iterations).  It needs the
optional extra ``pip install ".[crf]"`` (the ``pydensecrf2`` package).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_DILATIONS: Tuple[int, ...] = (1, 2, 4, 8, 12, 24)
CRF_EXTRA_HINT = 'pip install ".[crf]"'


def _offsets(dilations: Sequence[int]) -> torch.Tensor:
    """(K, 2) int64 (dy, dx): (0, 0) first, then the 8 neighbours at each dilation."""
    rows = [(0, 0)]
    for d in dilations:
        rows += [(dy * d, dx * d) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    return torch.tensor(rows, dtype=torch.int64)


def _shifted(padded: torch.Tensor, pad: int, dy: int, dx: int, h: int, w: int) -> torch.Tensor:
    """The (.., h, w) window of a replicate-padded tensor moved by (dy, dx): value at p is x[p + o]."""
    return padded[..., pad + dy:pad + dy + h, pad + dx:pad + dx + w]


def par_affinity(images: torch.Tensor, dilations: Sequence[int] = DEFAULT_DILATIONS, *,
                 w_colour: float = 0.3, w_pos: float = 0.01, w_dist: float = 1.0) -> torch.Tensor:
    """Neighbour weights of :func:`par_refine`.

    Args:
        images: (B, 3, H, W) float (any colour scale: the colour term is divided by the local std).
    Returns:
        (B, K, H, W) float32 weights summing to 1 over K = 1 + 8 * len(dilations).
    """
    b, c, h, w = images.shape
    offsets = _offsets(dilations)
    pad = int(max(dilations))
    x = images.float()
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    neigh = torch.stack([_shifted(padded, pad, int(dy), int(dx), h, w) for dy, dx in offsets.tolist()],
                        dim=1)                                           # (B, K, 3, H, W)
    std = neigh.std(dim=1, keepdim=True, unbiased=False)                 # (B, 1, 3, H, W)
    colour = -((neigh - x[:, None]).abs() / (w_colour * std + 1e-8)) ** 2
    colour = colour.mean(dim=2)                                          # (B, K, H, W)
    dist = offsets.float().norm(dim=1).to(x.device)                      # (K,)
    pos = -(dist / (w_dist * dist.std(unbiased=False) + 1e-8)) ** 2
    aff = F.softmax(colour, dim=1) + w_pos * F.softmax(pos, dim=0)[None, :, None, None]
    return aff / (1.0 + w_pos)


def par_refine(images: torch.Tensor, scores: torch.Tensor, *, iters: int = 10,
               dilations: Sequence[int] = DEFAULT_DILATIONS, w_colour: float = 0.3, w_pos: float = 0.01,
               w_dist: float = 1.0) -> torch.Tensor:
    """Pixel-adaptive refinement of score maps by image colour and position.

    Args:
        images: (B, 3, H, W) float or uint8 images (RGB; the scale does not matter).
        scores: (B, C, H, W) float score maps (background + classes), same device as ``images``.
        iters: propagation steps (>= 0; 0 returns the scores unchanged).
        dilations: neighbourhood distances in pixels, positive ints.
    Returns:
        (B, C, H, W) float32 refined scores; each value is a weighted average of input values, so
        the range [min, max] of every map is kept.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"par_refine: images must be (B, 3, H, W), got {got}")
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"par_refine: scores must be (B, C, H, W), got {got}")
    if scores.shape[0] != images.shape[0] or scores.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"par_refine: scores {tuple(scores.shape)} must match images {tuple(images.shape)} "
                         f"in batch and size")
    if scores.device != images.device:
        raise ValueError(f"par_refine: scores are on {scores.device}, images on {images.device}")
    if not scores.is_floating_point():
        raise TypeError(f"par_refine: scores must be floating point, got {scores.dtype}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"par_refine: iters must be an int >= 0, got {iters!r}")
    dilations = tuple(dilations)
    if not dilations or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dilations):
        raise ValueError(f"par_refine: dilations must be positive ints, got {dilations!r}")
    if not torch.isfinite(scores).all():
        raise ValueError("par_refine: scores hold NaN or inf")
    out = scores.float()
    if iters == 0:
        return out.clone()
    h, w = out.shape[-2:]
    aff = par_affinity(images, dilations, w_colour=w_colour, w_pos=w_pos, w_dist=w_dist)
    offsets = _offsets(dilations).tolist()
    pad = int(max(dilations))
    for _ in range(iters):
        padded = F.pad(out, (pad, pad, pad, pad), mode="replicate")
        acc = torch.zeros_like(out)
        for k, (dy, dx) in enumerate(offsets):
            acc.addcmul_(aff[:, k:k + 1], _shifted(padded, pad, dy, dx, h, w))
        out = acc
    return out


def crf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def crf_refine(image: np.ndarray, scores: np.ndarray, *, t: int = 10) -> np.ndarray:
    """Dense CRF of the public pipeline (its ``crf_inference``).

    Args:
        image: (H, W, 3) uint8 RGB.  scores: (C, H, W) float scores in [0, 1] (unary = -log).
        t: mean-field iterations (the public code: 10).
    Returns:
        (C, H, W) float32 marginals (they sum to 1 over C).
    Raises:
        ImportError naming ``pip install ".[crf]"`` when pydensecrf is not installed.
    """
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as exc:
        raise ImportError(f"--refine crf needs the dense CRF package pydensecrf, which is not installed: "
                          f"install the optional extra with {CRF_EXTRA_HINT} (it installs pydensecrf2), "
                          f"or use --refine par") from exc
    image = np.ascontiguousarray(image, dtype=np.uint8)
    scores = np.asarray(scores, np.float32)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"crf_refine: image must be (H, W, 3) uint8, got {image.shape}")
    if scores.ndim != 3 or scores.shape[1:] != image.shape[:2]:
        raise ValueError(f"crf_refine: scores must be (C, H, W) with (H, W) = {image.shape[:2]}, got "
                         f"{scores.shape}")
    c, h, w = scores.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(scores)))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=image, compat=10)
    return np.array(d.inference(t), np.float32).reshape(c, h, w)
