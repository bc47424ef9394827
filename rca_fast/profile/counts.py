"""Profile shapes and the work each op must do: minimum bytes and FLOPs, from the shapes alone.

Bytes are the *minimum* traffic through device memory: every input read once, every output
written once (an in-place update reads and writes only what it touches).  FLOPs count a
multiply-add as 2 and keep the leading term of each op (the matrix-shaped part; the elementwise
terms it leaves out are below 1% at the profile shapes, D = 512).  Both are minimums, so that the
roofline bounds every implementation: a backward pass reads no saved score matrix (the bytes of
the fused kernels, which recompute the scores) and does not recompute the scores (the FLOPs of
torch's autograd, which keeps them); no implementation does less of either.  k-means is the
exception: its FLOPs assume every Lloyd iteration runs (a problem that converges stops early).

The formulas are written next to each op below, in the names of :class:`ProfileShape`:
B images, L classes, S bank slots per class, D feature channels, HW = H*W pixels, K prototypes
per class (P = L*K attention keys), Np = present (image, class) pairs = rows of the NCE query and
of the bank update.  ``e`` is the bytes per element of the profiled dtype (4 fp32, 2 bf16); index
tensors are int64 (8 bytes), labels bool (1 byte), the NCE mixup weight and loss float32 (4).
``ec`` is the bytes per element of MAP's CAMs (the profiled dtype unless given: the trainer's
bf16 autocast hands MAP bf16 features with float32 CAM probabilities).

This is the one cost model of the project: the profiler's op rows and the benchmarks' rows
(``benchmarks/harness.work``) both count with it.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch

INDEX_BYTES = 8    # int64 targets, counts, ring pointers, k-means labels
BOOL_BYTES = 1     # labels of the masked average pool
F32_BYTES = 4      # NCE mixup weight and loss, k-means inertia


@dataclass(frozen=True)
class ProfileShape:
    """The sizes one profile run uses for every op (see the module docstring for the letters)."""
    name: str
    B: int
    L: int
    S: int
    D: int
    H: int
    W: int
    K: int = 10
    present: int = 2          # present classes per image (VOC: 1.5 on average, COCO: 2.9)

    @property
    def HW(self) -> int:
        return self.H * self.W

    @property
    def P(self) -> int:
        """Attention keys: K prototypes for each of the L classes."""
        return self.L * self.K

    @property
    def Np(self) -> int:
        """Present (image, class) pairs: NCE query rows and bank-update rows."""
        return self.B * min(self.present, self.L)

    def as_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        return (f"{self.name}: B{self.B}-L{self.L}-S{self.S}-D{self.D}-HW{self.H}x{self.W}"
                f"-K{self.K}-present{min(self.present, self.L)}")


# 368 x 368 crops at output stride 8 give 46 x 46 feature maps (the public VOC setting).
PRESETS: Dict[str, ProfileShape] = {
    "voc": ProfileShape("voc", B=8, L=20, S=500, D=512, H=46, W=46, K=10, present=2),
    "coco": ProfileShape("coco", B=8, L=80, S=500, D=512, H=46, W=46, K=10, present=3),
    "large": ProfileShape("large", B=32, L=80, S=2000, D=512, H=64, W=64, K=10, present=3),
}

_CUSTOM = re.compile(r"^(\d+),(\d+),(\d+),(\d+),(\d+)(?:x(\d+))?(?:,(\d+))?(?:,(\d+))?$")


def parse_shape(text: str) -> ProfileShape:
    """A preset name (voc, coco, large) or ``B,L,S,D,HW[,K[,present]]`` with HW as ``H`` (square)
    or ``HxW``, e.g. ``2,3,7,60,7x13,2,1``."""
    key = text.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    m = _CUSTOM.match(key.replace(" ", ""))
    if not m:
        raise ValueError(f"--shapes: expected one of {sorted(PRESETS)} or B,L,S,D,HW[,K[,present]] "
                         f"(HW as H or HxW), got {text!r}")
    B, L, S, D, H = (int(g) for g in m.groups()[:5])
    W = int(m.group(6)) if m.group(6) else H
    K = int(m.group(7)) if m.group(7) else min(10, S)
    present = int(m.group(8)) if m.group(8) else min(2, L)
    values = dict(B=B, L=L, S=S, D=D, H=H, W=W, K=K, present=present)
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"--shapes: {name} must be >= 1, got {value} in {text!r}")
    if K > S:
        raise ValueError(f"--shapes: K (prototypes per class) must be <= S (slots), got K={K}, S={S}")
    return ProfileShape(f"B{B}-L{L}-S{S}-D{D}-HW{H}x{W}", **values)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kmeans_init_trials(K: int) -> int:
    """Candidates tried per greedy k-means++ step (scikit-learn's rule, as rca_fast.ref.kmeans)."""
    return 2 + int(math.log(K))


# ----------------------------------------------------------------------------------------------
# The formulas.  Each returns (bytes, flops) for one call on the shape ``s`` with element size e.

def map_fwd(s: ProfileShape, e: int, ec: Optional[int] = None) -> Tuple[int, int]:
    """masked_average_pool forward, only the present pairs pooled (an absent class's CAM row is
    never read: the masks and their means are those of the present pairs alone).
    bytes: features B*D*HW*e + present CAM rows Np*HW*ec + labels B*L*1  ->  emb B*L*D*e + count B*L*8
    flops: 2*Np*HW*D (the masked sum of each present region as multiply-adds)"""
    ec = e if ec is None else ec
    nbytes = (s.B * s.D * s.HW * e + s.Np * s.HW * ec + s.B * s.L * BOOL_BYTES
              + s.B * s.L * s.D * e + s.B * s.L * INDEX_BYTES)
    return nbytes, 2 * s.Np * s.HW * s.D


def map_bwd(s: ProfileShape, e: int, ec: Optional[int] = None) -> Tuple[int, int]:
    """masked_average_pool backward (to features; the masks come back from the present CAM rows).
    bytes: grad_emb B*L*D*e + present CAM rows Np*HW*ec + labels B*L*1  ->  grad_features B*D*HW*e
    flops: 2*Np*HW*D"""
    ec = e if ec is None else ec
    nbytes = (s.B * s.L * s.D * e + s.Np * s.HW * ec + s.B * s.L * BOOL_BYTES
              + s.B * s.D * s.HW * e)
    return nbytes, 2 * s.Np * s.HW * s.D


def nce_fwd(s: ProfileShape, e: int) -> Tuple[int, int]:
    """bank_nce_loss forward with mixup, Np rows against the whole bank.
    bytes: query Np*D*e + bank L*S*D*e + target, mix_target Np*8 each + mix_weight Np*4  ->  loss 4
    flops: 2*Np*L*S*D (cosine similarity of every row with every slot)"""
    nbytes = (s.Np * s.D * e + s.L * s.S * s.D * e + 2 * s.Np * INDEX_BYTES + s.Np * F32_BYTES
              + F32_BYTES)
    return nbytes, 2 * s.Np * s.L * s.S * s.D


def nce_bwd(s: ProfileShape, e: int) -> Tuple[int, int]:
    """bank_nce_loss backward (to the query; the bank is a constant).
    bytes: query Np*D*e + bank L*S*D*e + targets 2*Np*8 + mix_weight Np*4 + grad_loss 4  ->  grad_query Np*D*e
    flops: 2*Np*L*S*D (the weighted sum of slots; a kernel that does not keep the forward's
           similarities recomputes them, another 2*Np*L*S*D, not counted: the count is the minimum)"""
    nbytes = (s.Np * s.D * e + s.L * s.S * s.D * e + 2 * s.Np * INDEX_BYTES + s.Np * F32_BYTES
              + F32_BYTES + s.Np * s.D * e)
    return nbytes, 2 * s.Np * s.L * s.S * s.D


def attention_fwd(s: ProfileShape, e: int) -> Tuple[int, int]:
    """prototype_attention forward: B*HW queries over P = L*K prototypes, Dv = D.
    bytes: query B*HW*D*e + key P*D*e + value P*D*e  ->  out B*HW*D*e
    flops: 2*B*HW*P*(D + Dv) (scores, then the weighted sum of values)"""
    nbytes = (2 * s.B * s.HW * s.D + 2 * s.P * s.D) * e
    return nbytes, 2 * s.B * s.HW * s.P * (s.D + s.D)


def attention_bwd(s: ProfileShape, e: int) -> Tuple[int, int]:
    """prototype_attention backward to query, key and value.
    bytes: query, key, value, grad_out  ->  grad_query, grad_key, grad_value (each its input's size)
    flops: 2*B*HW*P*(2*D + 2*Dv) (grad of value, of scores, of query, of key; a kernel that does
           not keep the forward's scores recomputes them, another 2*B*HW*P*D, not counted)"""
    reads = (2 * s.B * s.HW * s.D + 2 * s.P * s.D) * e
    writes = (s.B * s.HW * s.D + 2 * s.P * s.D) * e
    return reads + writes, 2 * s.B * s.HW * s.P * (2 * s.D + 2 * s.D)


def ema_fwd(s: ProfileShape, e: int) -> Tuple[int, int]:
    """ema_update_ of Np rows (in place; only the touched slots move).
    bytes: emb Np*D*e + target Np*8 + touched slots read and written 2*Np*D*e + ptr read and written 2*L*8
    flops: 3*Np*D (gamma*slot + (1-gamma)*row)"""
    nbytes = s.Np * s.D * e + s.Np * INDEX_BYTES + 2 * s.Np * s.D * e + 2 * s.L * INDEX_BYTES
    return nbytes, 3 * s.Np * s.D


def kmeans_fwd(s: ProfileShape, e: int, iters: int) -> Tuple[int, int]:
    """kmeans of the bank: L problems of S points, K centroids, k-means++ then ``iters`` Lloyd steps.
    bytes: points L*S*D*e  ->  centroids L*K*D*e + labels L*S*8 + inertia L*4
    flops: 2*L*S*D*(1 + (K-1)*T) seeding (T = 2 + floor(ln K) candidates a step)
           + iters * 2*L*S*K*D (distances of every point to every centroid).
    An upper bound: a problem stops early once it converges."""
    nbytes = s.L * s.S * s.D * e + s.L * s.K * s.D * e + s.L * s.S * INDEX_BYTES + s.L * F32_BYTES
    seeding = 2 * s.L * s.S * s.D * (1 + (s.K - 1) * kmeans_init_trials(s.K))
    return nbytes, seeding + iters * 2 * s.L * s.S * s.K * s.D


def gemm_shapes(s: ProfileShape) -> List[Tuple[int, int, int, int]]:
    """The matrix products the ops run at ``s``, as (batch, M, K, N) = batch x (M, K) @ (K, N):
    the matmul ceiling is probed on them too (a square product alone under-rates a CPU BLAS on
    the ops' thin products).  MAP: features (D, HW) @ masks (HW, present) per image and back;
    NCE: queries (Np, D) @ slots (D, L*S) and back; attention: queries (B*HW, D) @ keys (D, P),
    scores (B*HW, P) @ values (P, D), and (P, B*HW) @ (B*HW, D) for the key/value gradients;
    k-means: points (S, D) @ centroids (D, K) per class."""
    present = min(s.present, s.L)
    return [(s.B, s.D, s.HW, present), (s.B, s.D, present, s.HW),
            (1, s.Np, s.D, s.L * s.S), (1, s.Np, s.L * s.S, s.D),
            (1, s.B * s.HW, s.D, s.P), (1, s.B * s.HW, s.P, s.D), (1, s.P, s.B * s.HW, s.D),
            (s.L, s.S, s.D, s.K)]


# (op, direction) -> formula, in the order the profile runs and prints them.
OPS: List[Tuple[str, str]] = [
    ("masked_average_pool", "fwd"), ("masked_average_pool", "bwd"),
    ("bank_nce_loss", "fwd"), ("bank_nce_loss", "bwd"),
    ("prototype_attention", "fwd"), ("prototype_attention", "bwd"),
    ("ema_update_", "fwd"),
    ("kmeans", "fwd"),
]
SHORT = {"masked_average_pool": "map", "bank_nce_loss": "nce", "prototype_attention": "attention",
         "ema_update_": "ema", "kmeans": "kmeans"}
FORMULAS = {("masked_average_pool", "fwd"): map_fwd, ("masked_average_pool", "bwd"): map_bwd,
             ("bank_nce_loss", "fwd"): nce_fwd, ("bank_nce_loss", "bwd"): nce_bwd,
             ("prototype_attention", "fwd"): attention_fwd, ("prototype_attention", "bwd"): attention_bwd,
             ("ema_update_", "fwd"): ema_fwd}


def work(op: str, direction: str, shape: ProfileShape, dtype: torch.dtype, *,
         kmeans_iters: int = 10, cam_dtype: Optional[torch.dtype] = None) -> Tuple[int, int]:
    """(minimum bytes, FLOPs) of one call of ``op`` in ``direction`` ("fwd"/"bwd");
    ``cam_dtype``: MAP's CAM dtype when it is not ``dtype``."""
    e = dtype_bytes(dtype)
    if op == "kmeans" and direction == "fwd":
        return kmeans_fwd(shape, e, kmeans_iters)
    if op == "masked_average_pool" and cam_dtype is not None:
        return FORMULAS[(op, direction)](shape, e, dtype_bytes(cam_dtype))
    try:
        return FORMULAS[(op, direction)](shape, e)
    except KeyError:
        raise ValueError(f"no work formula for op {op!r} direction {direction!r}") from None


def formula_doc(op: str, direction: str) -> str:
    """The formula's docstring (what is counted), for the JSON output and the docs."""
    fn = kmeans_fwd if (op, direction) == ("kmeans", "fwd") else FORMULAS[(op, direction)]
    return " ".join(line.strip() for line in (fn.__doc__ or "").splitlines())
