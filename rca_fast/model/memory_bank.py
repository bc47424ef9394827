"""The memory bank of region embeddings: L classes x S slots x D, EMA-updated at ring pointers."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import ops


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rows(emb: torch.Tensor, target: torch.Tensor):
    """All ranks' rows concatenated in rank order (identity without torch.distributed).

    Ranks may hold different row counts: counts are exchanged first and rows padded to the
    largest, since ``all_gather`` needs equal shapes.
    """
    world = _world()
    if world == 1:
        return emb, target
    n = torch.tensor([emb.shape[0]], device=emb.device, dtype=torch.long)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    most = max(counts)
    pad_emb = emb.new_zeros(most, emb.shape[1])
    pad_emb[: emb.shape[0]] = emb
    pad_tgt = target.new_zeros(most)
    pad_tgt[: target.shape[0]] = target
    embs = [torch.empty_like(pad_emb) for _ in range(world)]
    tgts = [torch.empty_like(pad_tgt) for _ in range(world)]
    dist.all_gather(embs, pad_emb)
    dist.all_gather(tgts, pad_tgt)
    return (torch.cat([e[:c] for e, c in zip(embs, counts)]),
            torch.cat([t[:c] for t, c in zip(tgts, counts)]))


@torch.no_grad()
def lloyd(points: torch.Tensor, centroids: torch.Tensor, *, iters: int = 300,
          tol: float = 1e-4) -> torch.Tensor:
    """Lloyd's k-means iterations from given centroids (a warm start): points (L, S, D),
    centroids (L, K, D) -> (L, K, D).  An empty cluster keeps its centroid.  Stops when the
    squared centroid shift of every problem is below ``tol`` x the points' mean variance."""
    c = centroids.clone()
    limit = tol * points.var(dim=1).mean(dim=-1)                                # (L,)
    for _ in range(iters):
        nearest = torch.cdist(points, c).argmin(dim=-1)                         # (L, S)
        one_hot = torch.nn.functional.one_hot(nearest, c.shape[1]).to(points.dtype)  # (L, S, K)
        counts = one_hot.sum(dim=1)                                             # (L, K)
        sums = one_hot.transpose(1, 2) @ points                                 # (L, K, D)
        new = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp(min=1).unsqueeze(-1), c)
        shift = ((new - c) ** 2).sum(dim=-1).sum(dim=-1)                        # (L,)
        c = new
        if bool((shift <= limit).all()):
            break
    return c


class MemoryBank(nn.Module):
    """Region-embedding memory of RCA (DESIGN §3).

    Buffers (saved in ``state_dict``): ``bank`` (L, S, D), ``ptr`` (L,) int64 ring pointers,
    ``prototypes`` (L, K, D) k-means centroids of each class's slots.

    Args:
        num_classes: L.  slots: S per class (public code: 500).  dim: D (512).
        gamma: EMA momentum (0.99).  prototypes: K per class (10).
        score_threshold: rows are written only when their class score is above it (0.7).
        init: "randn" (the public code's bank) or "zeros".
        dtype: bank dtype (float32, or bfloat16 to halve its memory).
        prototype_init: the prototypes before the first k-means: "randn" (the public code's
            first-epoch clusters) or "zeros" (an exactly uniform, constant aggregation context).
        first_write: "ema" (public: every write is ``gamma*slot + (1-gamma)*emb``) or "copy"
            (improved: a slot's first write copies the region, so a written slot is data, not
            99% initial noise); adds the buffer ``writes`` (L,) int64 (rows written per class).
        kmeans_warm_start: ``refresh_prototypes`` after the first one starts Lloyd iterations
            from the previous prototypes (improved: prototypes move smoothly between epochs);
            adds the buffer ``fitted`` (0-d bool).
    """

    def __init__(self, num_classes: int, slots: int = 500, dim: int = 512, *, gamma: float = 0.99,
                 prototypes: int = 10, score_threshold: float = 0.7, init: str = "randn",
                 dtype: torch.dtype = torch.float32, prototype_init: str = "randn",
                 first_write: str = "ema", kmeans_warm_start: bool = False):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("slots", slots), ("dim", dim),
                            ("prototypes", prototypes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MemoryBank: {name} must be an int >= 1, got {value!r}")
        if prototypes > slots:
            raise ValueError(f"MemoryBank: prototypes (K = {prototypes}) must be <= slots (S = {slots})")
        for name, value in (("gamma", gamma), ("score_threshold", score_threshold)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"MemoryBank: {name} must be a float, got {type(value).__name__}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"MemoryBank: gamma must be in [0, 1], got {gamma}")
        if score_threshold != score_threshold:  # NaN: no score is above it, the bank would never be written
            raise ValueError(f"MemoryBank: score_threshold must not be NaN, got {score_threshold}")
        if init not in ("randn", "zeros"):
            raise ValueError(f"MemoryBank: init must be 'randn' or 'zeros', got {init!r}")
        if prototype_init not in ("randn", "zeros"):
            raise ValueError(f"MemoryBank: prototype_init must be 'randn' or 'zeros', got {prototype_init!r}")
        if first_write not in ("ema", "copy"):
            raise ValueError(f"MemoryBank: first_write must be 'ema' or 'copy', got {first_write!r}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"MemoryBank: dtype must be a float dtype, got {dtype}")
        self.gamma = float(gamma)
        self.score_threshold = float(score_threshold)
        self.num_prototypes = prototypes
        make = torch.randn if init == "randn" else torch.zeros
        self.register_buffer("bank", make(num_classes, slots, dim).to(dtype))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))
        make_protos = torch.randn if prototype_init == "randn" else torch.zeros
        self.register_buffer("prototypes", make_protos(num_classes, prototypes, dim).to(dtype))
        self.first_write = first_write
        self.kmeans_warm_start = bool(kmeans_warm_start)
        if first_write == "copy":
            self.register_buffer("writes", torch.zeros(num_classes, dtype=torch.long))
        if self.kmeans_warm_start:
            self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def num_classes(self) -> int:
        return self.bank.shape[0]

    @property
    def slots(self) -> int:
        return self.bank.shape[1]

    @property
    def dim(self) -> int:
        return self.bank.shape[2]

    @torch.no_grad()
    def update(self, emb: torch.Tensor, target: torch.Tensor, score: Optional[torch.Tensor] = None) -> int:
        """EMA-write the rows whose ``score`` is above the threshold (all rows when None).

        Args:
            emb: (N, D) region embeddings (detached here).  target: (N,) classes.
            score: optional (N,) class scores (e.g. sigmoid of the coarse logits).
        Under torch.distributed every rank's kept rows are gathered in rank order first, so
        every rank applies the same rows in the same order and the banks stay identical.
        Returns the number of rows applied (over all ranks).
        """
        self._check_rows(emb, target, score)
        emb, target = emb.detach(), target.to(device=emb.device, dtype=torch.long)
        if score is not None:
            keep = score.detach().to(emb.device) > self.score_threshold  # strictly above
            emb, target = emb[keep], target[keep]
        emb, target = gather_rows(emb.to(self.bank.device), target.to(self.bank.device))
        if emb.shape[0]:
            if self.first_write == "copy":
                self._update_first_copy(emb, target)
            else:
                ops.ema_update_(self.bank, self.ptr, emb, target, gamma=self.gamma)
        return int(emb.shape[0])

    def _update_first_copy(self, emb: torch.Tensor, target: torch.Tensor) -> None:
        """``ema_update_``, except that a row landing on a never-written slot is copied into it.

        Row i of class c goes to slot (ptr[c] + its rank among this call's rows of c) mod S, as in
        ``ema_update_``; slot s of c has been written before iff ``writes[c] > s``."""
        L, S, _ = self.bank.shape
        one_hot = torch.nn.functional.one_hot(target, L)                      # (N, L)
        rank = (one_hot.cumsum(0) - one_hot)[torch.arange(target.shape[0], device=target.device), target]
        if int(one_hot.sum(0).max()) > S:  # a slot hit twice in one call: apply in two halves
            half = target.shape[0] // 2
            self._update_first_copy(emb[:half], target[:half])
            self._update_first_copy(emb[half:], target[half:])
            return
        slot = (self.ptr[target] + rank) % S
        first = ~(self.writes[target] > slot)   # never written before this call (no slot is hit twice in it)
        ops.ema_update_(self.bank, self.ptr, emb, target, gamma=self.gamma)
        if bool(first.any()):
            self.bank[target[first], slot[first]] = emb[first].to(self.bank.dtype)
        self.writes += one_hot.sum(0)

    def _check_rows(self, emb, target, score) -> None:
        """TypeError/ValueError naming the argument (before any row is filtered or gathered)."""
        where = "MemoryBank.update"
        for name, value in (("emb", emb),
                            ("target", target)) + ((("score", score),) if score is not None else ()):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(value).__name__}")
        if emb.dim() != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"{where}: emb must have shape (N, D) with D = {self.dim}, got "
                             f"{tuple(emb.shape)}")
        if not emb.is_floating_point():
            raise TypeError(f"{where}: emb must be a float tensor, got {emb.dtype}")
        if target.dim() != 1 or target.shape[0] != emb.shape[0]:
            raise ValueError(f"{where}: target must have shape (N,) = ({emb.shape[0]},) like emb, "
                             f"got {tuple(target.shape)}")
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"{where}: target must be an integer tensor, got {target.dtype}")
        if score is not None and tuple(score.shape) != tuple(target.shape):
            raise ValueError(f"{where}: score must have shape (N,) = {tuple(target.shape)} like target, "
                             f"got {tuple(score.shape)}")

    @torch.no_grad()
    def refresh_prototypes(self, seed: int = 0, **kmeans_kwargs) -> torch.Tensor:
        """k-means of each class's slots -> ``prototypes`` (L, K, D).

        ``kmeans_kwargs`` go to ``ops.kmeans`` (e.g. ``n_init=10``, the public code's scikit-learn).
        With ``kmeans_warm_start``, every refresh after the first runs Lloyd iterations from the
        current prototypes instead (:func:`lloyd`; deterministic, no seed).

        Under torch.distributed rank 0 computes them and broadcasts, so every rank holds the same.
        """
        if _world() == 1 or dist.get_rank() == 0:
            points = self.bank if self.bank.dtype == torch.float64 else self.bank.float()
            if self.kmeans_warm_start and bool(self.fitted):
                centroids = lloyd(points, self.prototypes.to(points.dtype),
                                  iters=kmeans_kwargs.get("iters", 300),
                                  tol=kmeans_kwargs.get("tol", 1e-4))
            else:
                centroids, _, _ = ops.kmeans(points, self.num_prototypes, seed=seed, **kmeans_kwargs)
            self.prototypes.copy_(centroids.to(self.prototypes.dtype))
        if self.kmeans_warm_start:
            self.fitted.fill_(True)
        if _world() > 1:
            dist.broadcast(self.prototypes, src=0)
        return self.prototypes

    def extra_repr(self) -> str:
        L, S, D = self.bank.shape
        return (f"classes={L}, slots={S}, dim={D}, prototypes={self.num_prototypes}, "
                f"gamma={self.gamma}, score_threshold={self.score_threshold}, dtype={self.bank.dtype}")
