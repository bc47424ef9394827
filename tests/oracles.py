"""Float64 literal-loop oracles of the rca_fast ops, shared by the tests.

Written from the method's definition (DESIGN §2/§3), independently of ``rca_fast.ref``: every
value is a Python float (float64) and every sum is an explicit loop over its indices -- no
matmul, no broadcasting, no torch reductions -- so a vectorisation bug in the code under test
cannot hide in the oracle too.  They are slow by design: keep the test shapes small.

The one exception is the EMA oracle, which must be bit-exact in float32/bfloat16: it loops over
rows and elements too, but does each element's arithmetic in numpy float32 (IEEE single), the
precision the contract names.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

NORM_EPS = 1e-12  # the norm floor of the contract's cosine similarity (a zero vector -> similarity 0)


def _as_floats(t: torch.Tensor) -> list:
    """A tensor as nested lists of Python floats (float64)."""
    return t.detach().to(device="cpu", dtype=torch.float64).tolist()


# --------------------------------------------------------------------------- masked average pool
def masked_average_pool(features: torch.Tensor, cams: torch.Tensor,
                        labels: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """emb (B, L, D) float64 and count (B, L) int64 of eq. 2.

    mask[b, l, h, w] = cams[b, l, h, w] > mean over (h, w) of cams[b, l]; emb = mean feature
    under the mask, 0 when the mask is empty or the class is absent (labels given and 0).
    """
    f = _as_floats(features)
    c = _as_floats(cams)
    B, D, H, W = features.shape
    L = cams.shape[1]
    present = None if labels is None else [[bool(v) for v in row] for row in labels.tolist()]
    emb = [[[0.0] * D for _ in range(L)] for _ in range(B)]
    count = [[0] * L for _ in range(B)]
    for b in range(B):
        for l in range(L):
            if present is not None and not present[b][l]:
                continue
            total = 0.0
            for h in range(H):
                for w in range(W):
                    total += c[b][l][h][w]
            mean = total / (H * W)
            pixels = [(h, w) for h in range(H) for w in range(W) if c[b][l][h][w] > mean]
            count[b][l] = len(pixels)
            if not pixels:
                continue
            for d in range(D):
                acc = 0.0
                for h, w in pixels:
                    acc += f[b][d][h][w]
                emb[b][l][d] = acc / len(pixels)
    return (torch.tensor(emb, dtype=torch.float64).reshape(B, L, D),
            torch.tensor(count, dtype=torch.int64).reshape(B, L))


# --------------------------------------------------------------------------- bank NCE (eq. 4)
def _cosine(u: Sequence[float], v: Sequence[float]) -> float:
    dot = 0.0
    nu = 0.0
    nv = 0.0
    for a, b in zip(u, v):
        dot += a * b
        nu += a * a
        nv += b * b
    return dot / (max(math.sqrt(nu), NORM_EPS) * max(math.sqrt(nv), NORM_EPS))


def _log_sum_exp(values: List[float]) -> float:
    """log(sum(exp(v))) with the max factored out, so no exponent overflows."""
    top = max(values)
    total = 0.0
    for v in values:
        total += math.exp(v - top)
    return top + math.log(total)


def _nce_row(sims: List[List[float]], cls: int) -> float:
    """Mean over the S positive slots j of class ``cls`` of -log(e^{s_j} / (e^{s_j} + sum_neg e^{s})).

    -log(e^a / (e^a + N)) = log(e^a + N) - a, evaluated as a log-sum-exp of [a, every negative]."""
    L, S = len(sims), len(sims[0])
    negatives = [sims[l][i] for l in range(L) if l != cls for i in range(S)]
    total = 0.0
    for j in range(S):
        pos = sims[cls][j]
        total += _log_sum_exp([pos] + negatives) - pos
    return total / S


def bank_nce_loss(query: torch.Tensor, bank: torch.Tensor, target: torch.Tensor, *,
                  temperature: float = 0.07, mix_target: Optional[torch.Tensor] = None,
                  mix_weight=None, reduction: str = "mean") -> torch.Tensor:
    """Eq. 4 per row (cosine similarity / tau), with region mixup w*NCE(t) + (1-w)*NCE(mt); float64."""
    q = _as_floats(query)
    m = _as_floats(bank)
    L, S = bank.shape[0], bank.shape[1]
    tgt = [int(v) for v in target.tolist()]
    if mix_target is not None:
        mix = [int(v) for v in mix_target.tolist()]
        if isinstance(mix_weight, torch.Tensor) and mix_weight.dim() == 1:
            weights = [float(v) for v in mix_weight.tolist()]
        else:
            weights = [float(mix_weight)] * len(tgt)
    losses = []
    for n in range(len(tgt)):
        sims = [[_cosine(q[n], m[l][i]) / temperature for i in range(S)] for l in range(L)]
        loss = _nce_row(sims, tgt[n])
        if mix_target is not None:
            loss = weights[n] * loss + (1.0 - weights[n]) * _nce_row(sims, mix[n])
        losses.append(loss)
    out = torch.tensor(losses, dtype=torch.float64)
    if reduction == "mean":
        return torch.tensor(sum(losses) / len(losses), dtype=torch.float64)
    return out


# --------------------------------------------------------------------------- prototype attention
def prototype_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                        scale: Optional[float] = None) -> torch.Tensor:
    """(B, N, Dv) float64: softmax over P of scale * <q, k_p>, weighting the values."""
    q = _as_floats(query)
    k = _as_floats(key)
    v = _as_floats(value)
    B, N, D = query.shape
    P, Dv = value.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = [[[0.0] * Dv for _ in range(N)] for _ in range(B)]
    for b in range(B):
        for n in range(N):
            scores = []
            for p in range(P):
                dot = 0.0
                for d in range(D):
                    dot += q[b][n][d] * k[p][d]
                scores.append(scale * dot)
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            norm = 0.0
            for wgt in weights:
                norm += wgt
            for e in range(Dv):
                acc = 0.0
                for p in range(P):
                    acc += weights[p] / norm * v[p][e]
                out[b][n][e] = acc
    return torch.tensor(out, dtype=torch.float64).reshape(B, N, Dv)


# --------------------------------------------------------------------------- low-precision tolerance
# The one tolerance of the kernel tests in float32 / bfloat16 / float16 (flash-attention's rule):
# our error against a float64 result is at most twice the error of rca_fast.ref run in the same
# dtype as ours, plus a floor relative to the largest exact value (the floor only matters where the
# reference is exact to the last bit; for bf16/fp16 the reference's own error is far above it).
REL_ERROR_FLOOR = 1e-6
# On a GPU, Triton's tl.exp and '/' become ex2.approx / div.full (DESIGN 6), an error source that
# the reference (torch's exact libm) does not have and the interpreter never shows: the GPU-only
# tests of the kernels built on them (NCE gradients, attention) allow this floor instead.
GPU_APPROX_ERROR_FLOOR = 1e-5


def errors_vs_exact(got: torch.Tensor, ref_same_dtype: torch.Tensor,
                    exact: torch.Tensor) -> Tuple[float, float, float]:
    """(our max |error|, the same-dtype reference's max |error|, max |exact|), all against ``exact``."""
    exact = exact.detach().to("cpu", torch.float64)
    if exact.numel() == 0:
        return 0.0, 0.0, 0.0

    def err(t: torch.Tensor) -> float:
        return float((t.detach().to("cpu", torch.float64) - exact).abs().max())
    return err(got), err(ref_same_dtype), float(exact.abs().max())


def assert_within_twice_ref_error(ours: float, theirs: float, scale: float, *,
                                  floor: float = REL_ERROR_FLOOR, what: str = "") -> None:
    """ours <= 2 * theirs + floor * scale (errors and scale as :func:`errors_vs_exact` gives them)."""
    bound = 2 * theirs + floor * scale
    assert ours <= bound, (f"{what}: our error {ours:.3g} > 2 x the same-dtype reference's "
                           f"{theirs:.3g} + {floor:g} x {scale:.3g} = {bound:.3g}")


def assert_close_as_reference(got: torch.Tensor, ref_same_dtype: torch.Tensor, exact: torch.Tensor, *,
                              floor: float = REL_ERROR_FLOOR, what: str = "") -> None:
    """The rule on tensors: ``got`` is within twice the error of ``ref_same_dtype`` against ``exact``."""
    assert_within_twice_ref_error(*errors_vs_exact(got, ref_same_dtype, exact), floor=floor, what=what)


# --------------------------------------------------------------------------- EMA bank update
def ema_update_(bank: torch.Tensor, ptr: torch.Tensor, emb: torch.Tensor, target: torch.Tensor, *,
                gamma: float = 0.99) -> None:
    """The sequential loop, in place: for each row i in order, c = target[i], p = ptr[c]:
    bank[c, p] = a * bank[c, p] + b * emb[i] (a = f32(gamma), b = f32(1 - gamma), float32 products
    and sum, one rounding to the bank's dtype); ptr[c] = (p + 1) % S.  float64 banks: all float64.
    """
    S, D = bank.shape[1], bank.shape[2]
    ftype = np.float64 if bank.dtype == torch.float64 else np.float32
    a, b = ftype(gamma), ftype(1.0 - gamma)
    for i in range(emb.shape[0]):
        c = int(target[i])
        p = int(ptr[c])
        old = bank[c, p].to(torch.float64).tolist()   # exact: every bank dtype widens exactly
        row = emb[i].to(torch.float64).tolist()
        new = [0.0] * D
        for d in range(D):
            new[d] = float(a * ftype(old[d]) + b * ftype(row[d]))  # rounded to ftype at each step
        bank[c, p] = torch.tensor(new, dtype=torch.float64).to(torch.float32 if ftype is np.float32
                                                                 else torch.float64).to(bank.dtype)
        ptr[c] = (p + 1) % S


# --------------------------------------------------------------------------- k-means helpers
def nearest_centroid(points: torch.Tensor,
                     centroids: torch.Tensor) -> Tuple[List[List[List[float]]], List[List[float]]]:
    """For (L, S, D) points and (L, K, D) centroids: per point, the squared distance to every
    centroid (L, S, K) as nested lists, and its minimum (L, S)."""
    x = _as_floats(points)
    c = _as_floats(centroids)
    dists, best = [], []
    for l in range(len(x)):
        dl, bl = [], []
        for s in range(len(x[l])):
            row = []
            for k in range(len(c[l])):
                acc = 0.0
                for d in range(len(x[l][s])):
                    diff = x[l][s][d] - c[l][k][d]
                    acc += diff * diff
                row.append(acc)
            dl.append(row)
            bl.append(min(row))
        dists.append(dl)
        best.append(bl)
    return dists, best


class EmptyCluster(Exception):
    """The Lloyd oracle met an empty cluster (it does not model re-seeding): draw other data."""


def lloyd(points: Sequence[Sequence[float]], init: Sequence[Sequence[float]], iters: int, tol: float,
          shifts: Optional[List[float]] = None):
    """Float64 Lloyd iterations of one problem from the centres ``init`` with scikit-learn's stop
    rule: after an iteration's update, stop when the labels equal the previous iteration's, or
    when the summed squared centre shift is <= tol * (mean over features of the population
    variance of the points).  Returns (centres K x D, labels S, iterations run); each
    iteration's summed squared shift is appended to ``shifts`` when given."""
    S, D, K = len(points), len(points[0]), len(init)
    variance = 0.0
    for d in range(D):
        mean = sum(points[s][d] for s in range(S)) / S
        variance += sum((points[s][d] - mean) ** 2 for s in range(S)) / S
    tol_abs = tol * variance / D
    centres = [list(map(float, c)) for c in init]
    prev, labels, n_iter = None, None, 0
    for _ in range(iters):
        labels = []
        for s in range(S):
            dists = [sum((points[s][d] - centres[k][d]) ** 2 for d in range(D)) for k in range(K)]
            labels.append(min(range(K), key=lambda k: dists[k]))
        new = []
        for k in range(K):
            members = [s for s in range(S) if labels[s] == k]
            if not members:
                raise EmptyCluster(k)
            new.append([sum(points[s][d] for s in members) / len(members) for d in range(D)])
        shift = sum((new[k][d] - centres[k][d]) ** 2 for k in range(K) for d in range(D))
        centres, n_iter = new, n_iter + 1
        if shifts is not None:
            shifts.append(shift)
        if labels == prev or shift <= tol_abs:
            break
        prev = labels
    return centres, labels, n_iter


# --------------------------------------------------------------------------- backend selection
@pytest.fixture(autouse=True)
def torch_backend_unless_forced(monkeypatch):
    """Import this fixture into a test module to run its ops on the plain-torch backend.

    A backend already forced by the caller (``RCA_FAST_BACKEND=triton pytest tests/test_map.py``)
    is kept, so the same oracle tests can check the other backends.
    """
    if not os.environ.get("RCA_FAST_BACKEND"):
        monkeypatch.setenv("RCA_FAST_BACKEND", "torch")


# --------------------------------------------------------------------------- k-means test data
def numpy_seed(gen: torch.Generator) -> int:
    """A numpy/sklearn seed drawn from the test's torch generator (fresh inputs every run)."""
    return int(torch.randint(2 ** 31 - 1, (), generator=gen))


def blobs(L: int, S: int, D: int, centers: int, gen: torch.Generator, std: float = 1.0):
    """L independent Gaussian-blob problems: (L, S, D) float32 and the numpy float64 originals
    (for scikit-learn, the k-means quality bar)."""
    from sklearn.datasets import make_blobs  # a test dependency; only the k-means tests need it

    problems = [make_blobs(n_samples=S, n_features=D, centers=centers, cluster_std=std,
                           random_state=numpy_seed(gen))[0] for _ in range(L)]
    return torch.from_numpy(np.stack(problems)).float(), problems


# --------------------------------------------------------------------------- CAMs, labels, mIoU
def iou_oracle(pairs, num_classes):
    """Per-class IoU by counting pixels one at a time; pred 255 is a miss, gt 255 is skipped."""
    tp = [0] * num_classes
    fp = [0] * num_classes
    fn = [0] * num_classes
    for pred, gt in pairs:
        for p, g in zip(np.asarray(pred).reshape(-1).tolist(), np.asarray(gt).reshape(-1).tolist()):
            if g == 255:
                continue
            if p == g:
                tp[g] += 1
            else:
                fn[g] += 1
                if p != 255:
                    fp[p] += 1
    ious = []
    for c in range(num_classes):
        union = tp[c] + fp[c] + fn[c]
        ious.append(tp[c] / union if union else float("nan"))
    valid = [v for v in ious if v == v]
    return ious, sum(valid) / len(valid)


def cam_label_oracle(cams, keys, t):
    """Label map pixel by pixel: the best class if its value is > t, else background."""
    k, H, W = cams.shape
    out = np.zeros((H, W), np.int64)
    for y in range(H):
        for x in range(W):
            best, value = -1, None
            for i in range(k):
                v = float(cams[i, y, x])
                if value is None or v > value:
                    best, value = i, v
            if value is not None and value > t:
                out[y, x] = int(keys[best]) + 1
    return out


def cam_oracle(model, image, scales, out_size):
    """Multi-scale + flip CAMs of one image written out step by step: for each scale resize
    (ceil of size x scale), run the model, ReLU, upsample to ``out_size``, do the same for the
    flipped image and flip its maps back, sum everything; float64 from the model's output on."""
    H, W = image.shape[-2:]
    total = 0
    for scale in scales:
        size = (math.ceil(H * scale), math.ceil(W * scale))
        x = image[None] if size == (H, W) else F.interpolate(
            image[None], size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True):
            cams = model(x.flip(-1) if flipped else x).cams.double()
            cams = F.interpolate(cams.clamp(min=0), size=out_size, mode="bilinear",
                                                   align_corners=False)[0]
            total = total + (cams.flip(-1) if flipped else cams)
    return total.numpy()
