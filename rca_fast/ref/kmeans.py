"""Batched k-means: L independent problems (S points x D dims -> K centroids) solved together.

Greedy k-means++ seeding (2 + ln K candidates per step, as scikit-learn does) from a seeded CPU
generator, then Lloyd iterations.  Convergence per problem follows scikit-learn's rule: stop when
the summed squared centre shift is <= tol * mean per-feature variance of that problem's points
(or when no label changed).  Empty clusters are re-seeded at the points farthest from their
centre, so centroids are always finite.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch


def sq_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(L, S, D), (L, K, D) -> (L, S, K) squared Euclidean distances, clamped at 0."""
    d = (x * x).sum(-1, keepdim=True) - 2 * torch.bmm(x, c.transpose(1, 2)) + (c * c).sum(-1).unsqueeze(1)
    return d.clamp_min_(0)


def kmeans_plusplus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding of each of the L problems at once -> (L, K, D)."""
    L, S, D = x.shape
    rows = torch.arange(L, device=x.device)
    trials = 2 + int(math.log(k))
    first = torch.randint(S, (L,), generator=gen).to(x.device)
    centers = [x[rows, first]]                                             # list of (L, D)
    closest = sq_distances(x, centers[0].unsqueeze(1)).squeeze(-1)          # (L, S)
    for _ in range(1, k):
        pot = closest.sum(-1, keepdim=True)                                 # (L, 1)
        draws = torch.rand((L, trials), generator=gen, dtype=torch.float64).to(x.device) * pot
        cand = torch.searchsorted(closest.cumsum(-1).contiguous(), draws.to(closest.dtype).contiguous())
        cand = cand.clamp_(max=S - 1)                                        # (L, T)
        cand_pts = torch.gather(x, 1, cand.unsqueeze(-1).expand(L, trials, D))
        d_cand = sq_distances(x, cand_pts)                                  # (L, S, T)
        new_closest = torch.minimum(closest.unsqueeze(-1), d_cand)          # (L, S, T)
        best = new_closest.sum(1).argmin(-1)                                # (L,)
        closest = new_closest[rows, :, best]
        centers.append(cand_pts[rows, best])
    return torch.stack(centers, 1)


def assign(x: torch.Tensor, centers: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre of each point: labels (L, S) and its squared distance (L, S)."""
    d = sq_distances(x, centers)
    dist, labels = d.min(-1)
    return labels, dist


def update_centers(x: torch.Tensor, labels: torch.Tensor, dist: torch.Tensor, k: int,
                   centers: torch.Tensor) -> torch.Tensor:
    """Mean of each cluster; empty clusters move to the farthest points (distinct ones).

    The mean is taken as ``centre + mean(x - centre)``: summing offsets from the current centre
    instead of raw coordinates loses less to rounding, and makes a cluster of identical points
    keep that point exactly (a plain float32 mean of n copies of v is v only up to an ulp).
    """
    L, S, D = x.shape
    onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)              # (L, S, K)
    counts = onehot.sum(1)                                                   # (L, K)
    own = torch.gather(centers, 1, labels.unsqueeze(-1).expand(L, S, D))     # each point's centre
    # A one-hot matmul instead of scatter_add: deterministic on every device.
    shift = torch.bmm(onehot.transpose(1, 2), x - own) / counts.clamp(min=1).unsqueeze(-1)
    new = centers + shift
    empty = counts == 0
    if bool(empty.any()):
        far = dist.topk(k, dim=1).indices                                    # (L, K) farthest first
        rank = (empty.long().cumsum(1) - 1).clamp(min=0)
        pick = torch.gather(far, 1, rank)
        new = torch.where(empty.unsqueeze(-1), torch.gather(x, 1, pick.unsqueeze(-1).expand(L, k, D)), new)
    return new


def kmeans(points: torch.Tensor, k: int, *, iters: int = 300, tol: float = 1e-4, seed: int = 0,
           init: str = "k-means++", n_init: int = 1):
    """Batched k-means.

    Args:
        points: (L, S, D) -- L problems -- or (S, D).
        k: clusters per problem (<= S).
        iters: most Lloyd iterations.  tol: scikit-learn's relative tolerance.
        seed: seeds the CPU generator of the initialisation (same seed, same result).
        init: "k-means++" or "random" (k distinct points drawn uniformly).
        n_init: runs per problem with different seeds; the lowest inertia wins.
    Returns:
        centroids (L, K, D) in the points' dtype, labels (L, S) int64, inertia (L,) float
        (without the L dimension for 2-D input).
    """
    squeeze = points.dim() == 2
    x0 = points.unsqueeze(0) if squeeze else points
    acc = torch.float64 if x0.dtype == torch.float64 else torch.float32
    x0 = x0.detach().to(acc)
    L, S, D = x0.shape
    x = x0.repeat_interleave(n_init, 0) if n_init > 1 else x0              # (L*n_init, S, D)
    n = x.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    if init == "k-means++":
        centers = kmeans_plusplus(x, k, gen)
    else:
        idx = torch.rand((n, S), generator=gen).argsort(-1)[:, :k].to(x.device)
        centers = torch.gather(x, 1, idx.unsqueeze(-1).expand(n, k, D))
    tol_abs = tol * x.var(1, unbiased=False).mean(-1)                       # (n,)
    active = torch.ones(n, dtype=torch.bool, device=x.device)
    prev = None
    for _ in range(iters):
        labels, dist = assign(x, centers)
        new = update_centers(x, labels, dist, k, centers)
        shift = ((new - centers) ** 2).sum((1, 2))
        centers = torch.where(active.view(n, 1, 1), new, centers)
        done = shift <= tol_abs
        if prev is not None:
            done |= (labels == prev).all(-1)
        active &= ~done
        prev = labels
        if not bool(active.any()):
            break
    labels, _ = assign(x, centers)
    diff = x - torch.gather(centers, 1, labels.unsqueeze(-1).expand(n, S, D))
    inertia = (diff * diff).sum((1, 2))
    if n_init > 1:  # keep each problem's best run
        best = inertia.view(L, n_init).argmin(-1) + torch.arange(L, device=x.device) * n_init
        centers, labels, inertia = centers[best], labels[best], inertia[best]
    centers = centers.to(points.dtype)
    if squeeze:
        return centers[0], labels[0], inertia[0]
    return centers, labels, inertia
