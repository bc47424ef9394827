"""The compiled extension ``rca_fast._C`` as the ``cuda`` provider of ``rca_fast.ops``.

``rca_fast.ops._dispatch`` imports ``ema_update_`` and ``kmeans`` from here.  Importing this module
raises ImportError when ``rca_fast._C`` was not built; the dispatcher then falls back to the
plain-torch reference with one warning.  The extension has a CPU twin (C++, OpenMP) and CUDA code;
the tensors' device picks one.  ``supports`` says what this build can run (CUDA tensors only when
it was built with its CUDA sources); the wrappers below never fall back by themselves.  Both ops
are registered with ``torch.library`` (schema in ``csrc/ops.cpp``, fake implementations below), so
``torch.compile`` traces through them:

* ``torch.ops.rca_fast.ema_update_(bank, ptr, emb, target, gamma) -> ()`` mutates bank and ptr
  (and bumps their autograd version counters, as an in-place torch op does);
* ``torch.ops.rca_fast.kmeans(points, k, iters, tol, seed, random_init, n_init)
  -> (centroids, labels, inertia)``.

Arguments arrive validated by ``rca_fast.ops``; the signatures are those of ``rca_fast.ref``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.rca_fast.*)
except ImportError as exc:  # not built: RCA_FAST_SKIP_EXT=1, no compiler, or an ABI mismatch
    raise ImportError(f"rca_fast._C is not built or cannot be loaded ({exc}); build it with "
                      "`python setup.py build_ext --inplace`") from exc

WITH_CUDA: bool = bool(getattr(_C, "with_cuda", False))
OPS = ("ema_update_", "kmeans")


def supports(op: str, device: torch.device, dtypes: Sequence[torch.dtype]) -> Optional[str]:
    """What the ``cuda`` backend of ``rca_fast.ops`` can run: None, or why not.  Both ops compute
    in float32 (float64 for float64 inputs) in any float dtype, on CPU tensors (the C++ twin) and
    on CUDA tensors when this build has its CUDA sources."""
    if op not in OPS:
        return f"the extension does not compute {op}"
    if device.type == "cuda" and not WITH_CUDA:
        return "rca_fast._C was built without its CUDA sources"
    return None


def _register_fakes() -> None:
    """Fake (meta) implementations: output shapes and dtypes without running anything."""
    try:
        torch.library.register_fake("rca_fast::ema_update_")(_ema_update_fake)
        torch.library.register_fake("rca_fast::kmeans")(_kmeans_fake)
    except RuntimeError as exc:  # already registered (a module reload)
        if "already" not in str(exc):
            raise


def _ema_update_fake(bank, ptr, emb, target, gamma):
    return None


def _kmeans_fake(points, k, iters, tol, seed, random_init, n_init):
    L, S, D = points.shape
    acc = torch.float64 if points.dtype == torch.float64 else torch.float32
    return (points.new_empty((L, k, D)), points.new_empty((L, S), dtype=torch.long),
            points.new_empty((L,), dtype=acc))


_register_fakes()


# The schema marks bank and ptr as mutated (``Tensor(a!)``), but an op defined in C++ gets no
# ADInplaceOrView kernel, and that kernel is what bumps autograd's version counters of mutated
# inputs (torch's own in-place ops and Python custom ops have one).  Without it, an EMA update of a
# bank that a pending backward saved (ops.bank_nce_loss saves it) went unnoticed and the backward
# silently used the new bank: the query gradient changed by ~57% where the torch backend raises
# autograd's "modified by an inplace operation" error.  This kernel bumps both counters and
# passes the call on, so every backend raises that error.
_LIB = torch.library.Library("rca_fast", "IMPL")  # kept alive: registrations die with it


def _ema_update_inplace_or_view(keyset, bank, ptr, emb, target, gamma):
    with torch._C._AutoDispatchBelowADInplaceOrView():
        torch.ops.rca_fast.ema_update_.default.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset,
                                                          bank, ptr, emb, target, gamma)
    torch.autograd.graph.increment_version(bank)
    torch.autograd.graph.increment_version(ptr)


_LIB.impl("ema_update_", _ema_update_inplace_or_view, "ADInplaceOrView", with_keyset=True)


def ema_update_(bank: torch.Tensor, ptr: torch.Tensor, emb: torch.Tensor, target: torch.Tensor, *,
                gamma: float = 0.99) -> torch.Tensor:
    """In-place EMA of ``emb`` (N, D) rows into ``bank`` (L, S, D) at the ring pointers ``ptr`` (L,)
    of their classes ``target`` (N,), one launch; bit-for-bit the sequential loop.  Returns ``bank``."""
    torch.ops.rca_fast.ema_update_(bank, ptr, emb, target, float(gamma))
    return bank


def kmeans(points: torch.Tensor, k: int, *, iters: int = 300, tol: float = 1e-4, seed: int = 0,
           init: str = "k-means++", n_init: int = 1):
    """Batched k-means of ``points`` (L, S, D) or (S, D): centroids (L, K, D) in the points' dtype,
    labels (L, S) int64, inertia (L,) (float64 for float64 points, else float32)."""
    squeeze = points.dim() == 2
    batched = points.unsqueeze(0) if squeeze else points
    centroids, labels, inertia = torch.ops.rca_fast.kmeans(
        batched, int(k), int(iters), float(tol), int(seed), init == "random", int(n_init))
    if squeeze:
        return centroids[0], labels[0], inertia[0]
    return centroids, labels, inertia
