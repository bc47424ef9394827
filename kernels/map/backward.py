"""Backward of masked average pooling (``forward.py`` holds the plan): grad_features from
grad_emb, the saved float64 thresholds and the counts; the features are never read."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..launch_rule import MAXNREG, LaunchPlan, dtype_label, interpreting, launch
from ..precise_math import div_precise
from .tiles import (TUNE_KEY, check_int32_extent, pow2, present_arg, present_classes, slot_classes,
                    slots_per_pass, walkable)


@triton.jit(do_not_specialize=["L", "D", "HW"])
def _map_bwd_kernel(grad_emb_ptr, cams_ptr, present_ptr, mean_ptr, count_ptr, grad_feat_ptr,
                    L, D, HW,
                    s_gb, s_gl, s_gd, s_cb, s_cl, s_chw, s_ob, s_od, s_ohw,
                    HAS_LABELS: tl.constexpr, LP: tl.constexpr, SLOTS: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_HW: tl.constexpr, ACC_FP64: tl.constexpr):
    """Program (D-block, HW-block, b): grad_features[b, D-block, HW-block] =
    sum over present l of mask[b, l, hw] * grad_emb[b, l, d] / count[b, l]  (0 if count is 0).

    The masks are rebuilt from the CAM and the saved float64 means; each output element is
    written once, the features are not read.
    """
    pid_d = tl.program_id(0)
    pid_hw = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    d0 = pid_d * BLOCK_D
    hw0 = pid_hw * BLOCK_HW
    d_ok = (d0 + tl.arange(0, BLOCK_D))[:, None] < D                              # [BLOCK_D, 1]
    hw_ok = (hw0 + tl.arange(0, BLOCK_HW))[None, :] < HW                          # [1, BLOCK_HW]
    cls_all, present, rank, n_present = present_classes(present_ptr, b, L, HAS_LABELS, LP)
    # 2-D operands throughout ([1, HW] masks, [BLOCK_D, 1] gradients) so they share the
    # output tile's layout; int32 offsets from scalar base pointers
    cam_offs = (tl.arange(0, BLOCK_HW) * s_chw)[None, :]
    grad_offs = (tl.arange(0, BLOCK_D) * s_gd)[:, None]
    cam_base = cams_ptr + b * s_cb + hw0.to(tl.int64) * s_chw
    grad_base = grad_emb_ptr + b * s_gb + d0.to(tl.int64) * s_gd
    out = tl.zeros([BLOCK_D, BLOCK_HW], dtype=acc_dtype)
    slot_ids = tl.arange(0, SLOTS)
    for first in range(0, n_present, SLOTS):
        cls, used = slot_classes(cls_all, present, rank, n_present, first, SLOTS)
        for s in tl.static_range(SLOTS):
            # one class at a time as scalars: the [BLOCK_D, BLOCK_HW] tile gets a rank-1 update
            cls_s = tl.sum(tl.where(slot_ids == s, cls, 0), axis=0)
            used_s = first + s < n_present
            shift = tl.load(cams_ptr + b * s_cb + cls_s * s_cl, mask=used_s, other=0).to(tl.float64)
            mean = tl.load(mean_ptr + b * L + cls_s, mask=used_s, other=0)
            count = tl.load(count_ptr + b * L + cls_s, mask=used_s, other=0)
            cam = tl.load(cam_base + cls_s * s_cl + cam_offs, mask=hw_ok & used_s, other=0)
            inside = (((cam.to(tl.float64) - shift) > mean) & hw_ok & used_s).to(acc_dtype)
            grad = tl.load(grad_base + cls_s * s_gl + grad_offs, mask=d_ok & used_s,
                           other=0).to(acc_dtype)
            # same operation as the reference (grad_emb / count); an empty mask gives 0
            grad = tl.where(count > 0, div_precise(grad, tl.maximum(count, 1).to(acc_dtype)), 0.0)
            out += grad * inside
    out_base = grad_feat_ptr + b * s_ob + d0.to(tl.int64) * s_od + hw0.to(tl.int64) * s_ohw
    out_offs = (tl.arange(0, BLOCK_D) * s_od)[:, None] + (tl.arange(0, BLOCK_HW) * s_ohw)[None, :]
    tl.store(out_base + out_offs, out.to(grad_feat_ptr.dtype.element_ty), mask=d_ok & hw_ok)


_INTERPRET_BWD = triton.Config(dict(BLOCK_D=16, BLOCK_HW=32), num_warps=4)


def _bwd_configs(fp64: bool, slots: int = 4) -> list:
    """GPU candidates for the backward (one output tile a program; stores dominate).  With 8 classes
    a pass (no labels) the [16, 256] tile spilled 148-456 B (sm_90a): narrower tiles then."""
    shapes = ((16, 128, 4), (16, 256, 4)) if slots <= 4 else ((8, 128, 4), (16, 128, 4))
    if fp64:
        shapes = ((16, 128, 4), (8, 256, 4), (16, 256, 8))
    return [triton.Config(dict(BLOCK_D=d, BLOCK_HW=hw), num_warps=w, maxnreg=MAXNREG) for d, hw, w in shapes]



def _grad_features_like(grad_emb: torch.Tensor, cams: torch.Tensor, channels_last: bool) -> torch.Tensor:
    B, _, D = grad_emb.shape
    H, W = cams.shape[2:]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((B, D, H, W), dtype=grad_emb.dtype, device=grad_emb.device, memory_format=fmt)


def _launch_bwd(grad_emb: torch.Tensor, cams: torch.Tensor, labels: Optional[torch.Tensor],
                mean: torch.Tensor, count: torch.Tensor, channels_last: bool, *,
                config: Optional[triton.Config] = None, slots: Optional[int] = None) -> torch.Tensor:
    """grad_features (B, D, H, W) in grad_emb.dtype (the features' dtype), laid out like the
    features were (contiguous or channels-last).  ``config``/``slots`` as in ``_launch_fwd``."""
    grad_features = _grad_features_like(grad_emb, cams, channels_last)
    B, L, D = grad_emb.shape
    HW = cams.shape[2] * cams.shape[3]
    if grad_features.numel() == 0:
        return grad_features
    if L == 0:
        return grad_features.zero_()
    on_gpu = not interpreting(grad_emb.device)
    cams, (s_cb, s_cl, s_chw) = walkable(cams)
    _, (s_ob, s_od, s_ohw) = walkable(grad_features)  # both layouts above are walkable
    check_int32_extent("features", grad_features, (D, HW), (s_od, s_ohw))
    present = present_arg(labels, cams)
    fp64 = grad_emb.dtype == torch.float64
    has_labels = labels is not None
    args = (grad_emb, cams, present, mean.contiguous(), count.contiguous(), grad_features, L, D, HW,
            *grad_emb.stride(), s_cb, s_cl, s_chw, s_ob, s_od, s_ohw)
    slots = slots or slots_per_pass(on_gpu, has_labels, L)
    meta = dict(HAS_LABELS=has_labels, LP=pow2(L), SLOTS=slots, ACC_FP64=fp64)
    candidates = _bwd_configs(fp64, slots) if on_gpu and config is None else ()
    fixed = config or (candidates[0] if on_gpu else _INTERPRET_BWD)
    launch(LaunchPlan("map_bwd", _map_bwd_kernel,
                      lambda m: (triton.cdiv(D, m["BLOCK_D"]), triton.cdiv(HW, m["BLOCK_HW"]), B), args, meta,
                      fixed, grad_emb.device, dtype_label(grad_emb, cams), candidates, TUNE_KEY,
                      axes=("D blocks", "H*W blocks of cams", "B: images of cams")))
    return grad_features

