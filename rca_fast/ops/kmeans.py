"""Public batched k-means (DESIGN §3)."""
from __future__ import annotations

import torch

from . import _dispatch
from ._validate import FLOAT_DTYPES, check_finite, check_positive, check_tensor

OP = "kmeans"


def kmeans(points: torch.Tensor, k: int, *, iters: int = 300, tol: float = 1e-4, seed: int = 0,
           init: str = "k-means++", n_init: int = 1):
    """L independent k-means problems solved together (k-means++ seeding, then Lloyd).

    Args:
        points: (L, S, D) float -- L problems of S points -- or (S, D) for one problem.
        k: centroids per problem, 1 <= k <= S.
        iters: most Lloyd iterations (>= 1; 300 = scikit-learn's max_iter, which the public code used).
        tol: scikit-learn's relative tolerance: a problem stops once its summed squared centre
            shift is <= tol * mean per-feature variance of its points.
        seed: an int in [-2**63, 2**63); same seed, same result (on one device).
        init: "k-means++" (greedy, as scikit-learn) or "random".
        n_init: independent runs per problem; the lowest inertia wins.
    Returns:
        centroids (L, K, D) in the points' dtype, labels (L, S) int64, inertia (L,) float32
        (float64 for float64 points) -- or (K, D), (S,), () for 2-D input.  Empty clusters are
        re-seeded, never NaN.  Not differentiable: the outputs never require grad.
    """
    check_tensor(OP, "points", points, ndim=(2, 3), layout="(L, S, D) or (S, D)", dtypes=FLOAT_DTYPES)
    check_finite(OP, "points", points)
    S = points.shape[-2]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{OP}: k must be an int, got {type(k).__name__}")
    if not 1 <= k <= S:
        raise ValueError(f"{OP}: k must be in [1, S] with S = {S} points per problem, got k = {k}")
    for name, value in (("iters", iters), ("n_init", n_init)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{OP}: {name} must be an int >= 1, got {value!r}")
    check_positive(OP, "tol", tol, allow_zero=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{OP}: seed must be an int, got {type(seed).__name__}")
    if not -2 ** 63 <= seed < 2 ** 63:
        raise ValueError(f"{OP}: seed must be in [-2**63, 2**63), got {seed}")
    if init not in ("k-means++", "random"):
        raise ValueError(f"{OP}: init must be 'k-means++' or 'random', got {init!r}")
    # detach: the extension op has no autograd formula, so on points that require grad its outputs
    # would carry a grad_fn that fails on backward (the reference detaches anyway).
    if points.requires_grad:
        points = points.detach()
    return _dispatch.implementation(OP, points.device, (points.dtype,))(
        points, k, iters=iters, tol=float(tol), seed=int(seed), init=init, n_init=n_init)
