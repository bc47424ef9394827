"""Helpers shared by the masked-average-pooling forward (``forward.py``) and backward
(``backward.py``) kernels: the present-class bookkeeping (@triton.jit), the host-side stride
walking, the int32 guard, and the classes-per-pass rule (``slots``)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# the autotuner's key (RCA_FAST_AUTOTUNE=1): the best config is kept per (L, D, HW, labels, dtypes)
TUNE_KEY = ["L", "D", "HW", "HAS_LABELS"]


@triton.jit
def present_classes(present_ptr, b, L, HAS_LABELS: tl.constexpr, LP: tl.constexpr):
    """Present mask over the LP (>= L, power of two) class slots of image b, each present
    class's rank among the present ones, and their number."""
    cls_all = tl.arange(0, LP)
    in_range = cls_all < L
    if HAS_LABELS:
        present = (tl.load(present_ptr + b * L + cls_all, mask=in_range, other=0) != 0) & in_range
    else:
        present = in_range
    present_i = present.to(tl.int32)
    rank = tl.cumsum(present_i, axis=0) - present_i  # exclusive prefix sum
    return cls_all, present, rank, tl.sum(present_i, axis=0)


@triton.jit
def slot_classes(cls_all, present, rank, n_present, first, SLOTS: tl.constexpr):
    """Class held by each of the SLOTS slots of the chunk starting at present-rank ``first``
    (slot s holds the present class of rank first + s) and whether the slot is used."""
    slot_rank = first + tl.arange(0, SLOTS)
    hit = present[None, :] & (rank[None, :] == slot_rank[:, None])          # [SLOTS, LP]
    cls = tl.sum(tl.where(hit, cls_all[None, :], 0), axis=1)                # [SLOTS]
    return cls, slot_rank < n_present



def merged_hw_strides(t: torch.Tensor) -> Optional[Tuple[int, int, int]]:
    """(stride of dim 0, stride of dim 1, stride of the flattened H*W index) of a 4-D tensor,
    or None when its H and W cannot be walked as one index (e.g. a spatial slice)."""
    _, _, H, W = t.shape
    s0, s1, sh, sw = t.stride()
    if W == 1:
        return s0, s1, sh
    if H == 1 or sh == W * sw:  # contiguous (sw == 1) and channels-last (sw == D) both qualify
        return s0, s1, sw
    return None


def walkable(t: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """``t`` (copied to contiguous only if its H, W cannot be merged) and its three strides."""
    strides = merged_hw_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = merged_hw_strides(t)
    return t, strides


def check_int32_extent(name: str, t: torch.Tensor, sizes, strides) -> None:
    """The kernels index inside one image with int32 offsets (the image offset is int64)."""
    extent = sum((n - 1) * abs(st) for n, st in zip(sizes, strides) if n > 0)
    if extent >= 2 ** 31:
        raise ValueError(f"masked_average_pool: one image of {name} spans {extent} elements "
                         f"(shape {tuple(t.shape)}), more than the Triton kernels' int32 "
                         f"offsets reach; use the torch backend (RCA_FAST_BACKEND=torch)")


def present_arg(labels: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    """Bool labels as a uint8 view (no copy when contiguous); any tensor when there are none
    (the kernels never read it then)."""
    if labels is None:
        return fallback
    return labels.contiguous().view(torch.uint8)


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def slots_per_pass(on_gpu: bool, has_labels: bool, L: int) -> int:
    """Classes handled per pass over the features (a power of two)."""
    if not on_gpu:  # the interpreter: 2 slots, so three present classes exercise the chunk
        return 2 if L <= 8 else 8  # loop (8 with many classes: fewer interpreted passes)
    # With labels, 1-3 classes are present per image in practice (VOC/COCO): 4 slots take them
    # in one pass.  Without labels every class is present: 8 a pass bounds the accumulator.
    return min(4 if has_labels else 8, pow2(L))
