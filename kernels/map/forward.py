"""Masked average pooling (MAP, eq. 2) as fused Triton kernels.

Semantics are those of ``rca_fast.ref.map``: for each (image b, class l) the region mask is
``x > mean(x)`` with ``x = float64(cams[b, l]) - cams[b, l, 0, 0]`` (the shift makes a constant
map an exactly empty mask), ``count`` is the number of mask pixels and ``emb`` the mean feature
under the mask (0 for an empty mask or an absent class, never NaN).

Layering (kernels/map/: forward.py, backward.py, tiles.py):
  Triton kernels  ``_map_fwd_kernel``   (per (b, D-block): thresholds, then one pass over the
                                         features; counts and the division fused),
                  ``backward._map_bwd_kernel`` (per (b, D-block, HW-block): grad_features, written once)
  launchers       ``_launch_fwd`` / ``backward._launch_bwd`` (strides, block sizes, grids, allocation)
  torch.library   ``rca_fast::map_fwd`` / ``rca_fast::map_bwd`` custom ops with fake tensors and
                  autograd, so ``torch.compile(fullgraph=True)`` traces through them
  provider        ``masked_average_pool`` (what ``rca_fast.ops`` dispatches to)

Bytes: the forward reads the features once for all present classes of an image (the present
classes' masks are rebuilt on the fly from the CAM, [SLOTS, HW-tile] at a time); the backward
writes grad_features once and never reads the features.  Only (B, L) float64 thresholds and
the counts are saved for the backward -- no (B, L, H*W) mask tensor.  No host synchronisation:
the number of present classes per image is found inside the kernels.

Accumulation is float32 (float64 for float64 features); the mask is always decided in float64,
exactly as the reference decides it, so counts match the reference exactly.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..launch_rule import FIXED_RULE_MAX_REGISTERS, MAXNREG, LaunchPlan, dtype_label, interpreting, launch
from ..precise_math import div_precise
from .backward import _grad_features_like, _launch_bwd
from .tiles import (TUNE_KEY, check_int32_extent, pow2, present_arg, present_classes, slot_classes,
                    slots_per_pass, walkable)

__all__ = ["masked_average_pool"]


# ----------------------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=["L", "D", "HW"])
def _map_fwd_kernel(feat_ptr, cams_ptr, present_ptr, mean_ptr, count_ptr, emb_ptr,
                    L, D, HW,
                    s_fb, s_fd, s_fhw, s_cb, s_cl, s_chw, s_eb, s_el, s_ed,
                    HAS_LABELS: tl.constexpr, LP: tl.constexpr, SLOTS: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_HW: tl.constexpr, UNROLL: tl.constexpr,
                    MEAN_HW: tl.constexpr, ACC_FP64: tl.constexpr):
    """Program (D-block, b): emb[b, :, D-block]; the D-block-0 program also writes mean[b, :]
    and count[b, :].

    The present classes are taken SLOTS at a time (one chunk in the usual case of <= SLOTS
    present classes).  Per chunk: (1) a pass over the chunk's CAM rows gives each class's
    threshold (float64 mean of the shifted map; every D-block program computes the same value
    the same way); (2) one pass over the D-block's features, [1, BLOCK_D, BLOCK_HW] at a time,
    multiplied into a [SLOTS, BLOCK_D, BLOCK_HW] accumulator by the masks, rebuilt on the fly as
    [SLOTS, 1, BLOCK_HW] tiles that also count the mask pixels; (3) the division.  All tiles are
    3-D so the masks and the features share the accumulator's layout.
    """
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    cls_all, present, rank, n_present = present_classes(present_ptr, b, L, HAS_LABELS, LP)
    # absent classes: zero rows of emb (and zero mean/count), so no separate memset is needed
    absent = (cls_all < L) & (~present)
    tl.store(emb_ptr + b * s_eb + cls_all[:, None] * s_el + offs_d[None, :] * s_ed,
             tl.zeros([LP, BLOCK_D], dtype=emb_ptr.dtype.element_ty),
             mask=absent[:, None] & d_ok[None, :])
    stats_rows = absent & (pid_d == 0)
    tl.store(mean_ptr + b * L + cls_all, tl.zeros([LP], dtype=tl.float64), mask=stats_rows)
    tl.store(count_ptr + b * L + cls_all, tl.zeros([LP], dtype=tl.int64), mask=stats_rows)
    offs_hw = tl.arange(0, BLOCK_HW)
    # int32 offsets inside one image (the launcher checks they fit) from scalar base pointers:
    # cheaper in registers than a 64-bit pointer per element
    feat_base = feat_ptr + b * s_fb + (pid_d * BLOCK_D).to(tl.int64) * s_fd
    feat_offs = (tl.arange(0, BLOCK_D) * s_fd)[None, :, None] + (offs_hw * s_fhw)[None, None, :]
    cam_base = cams_ptr + b * s_cb
    d_ok3 = d_ok[None, :, None]
    for first in range(0, n_present, SLOTS):
        if HAS_LABELS:
            cls, used = slot_classes(cls_all, present, rank, n_present, first, SLOTS)
        else:  # every class is present, in order: the chunk's classes are first, first + 1, ...
            cls = first + tl.arange(0, SLOTS)
            used = cls < L
        used3 = used[:, None, None]
        cam_rows = (cls * s_cl)[:, None, None]                                       # [SLOTS, 1, 1]
        cam_offs = cam_rows + (offs_hw * s_chw)[None, None, :]                       # [SLOTS, 1, HW]
        # (1) threshold: mean of x = cam - cam[0, 0] in float64 (exact shift), as the reference
        shift3 = tl.load(cam_base + cam_rows, mask=used3 & (HW > 0), other=0).to(tl.float64)
        # a wider tile than the main loop's: this pass is latency-bound (a few KB per program)
        offs_mean = tl.arange(0, MEAN_HW)[None, None, :]
        total = tl.zeros([SLOTS, 1, MEAN_HW], dtype=tl.float64)
        for start in range(0, HW, MEAN_HW):
            ok = used3 & ((start + offs_mean) < HW)
            cam = tl.load(cam_base + cam_rows + (start + offs_mean) * s_chw, mask=ok, other=0)
            total += tl.where(ok, cam.to(tl.float64) - shift3, 0.0)
        mean3 = tl.sum(total, axis=2)[:, :, None] / tl.maximum(HW, 1)               # [SLOTS, 1, 1]
        # (2) one pass over the features for all the chunk's classes.  UNROLL sub-tiles a step:
        # their loads are in flight together while the accumulator stays one sub-tile wide
        # (registers: SLOTS * BLOCK_D * BLOCK_HW / threads).
        acc = tl.zeros([SLOTS, BLOCK_D, BLOCK_HW], dtype=acc_dtype)
        pixels = tl.zeros([SLOTS, 1, BLOCK_HW], dtype=tl.int32)
        for start in range(0, HW, BLOCK_HW * UNROLL):
            for u in tl.static_range(UNROLL):
                at = start + u * BLOCK_HW
                hw_ok = (at + offs_hw)[None, None, :] < HW
                cam = tl.load(cam_base + at * s_chw + cam_offs, mask=used3 & hw_ok, other=0)
                feat = tl.load(feat_base + at * s_fhw + feat_offs, mask=d_ok3 & hw_ok, other=0)
                inside = ((cam.to(tl.float64) - shift3) > mean3) & used3 & hw_ok
                pixels += inside.to(tl.int32)
                acc += inside.to(acc_dtype) * feat.to(acc_dtype)
        # (3) the mean under the mask; an empty mask gives 0, not 0/0
        count = tl.sum(pixels, axis=2)                                               # [SLOTS, 1]
        sums = tl.sum(acc, axis=2)                                                   # [SLOTS, BLOCK_D]
        # correctly rounded division (compiled '/' on fp32 is div.full, 2 ulp; see precise_math.py)
        emb = tl.where(count > 0, div_precise(sums, tl.maximum(count, 1).to(acc_dtype)), 0.0)
        tl.store(emb_ptr + b * s_eb + cls[:, None] * s_el + offs_d[None, :] * s_ed,
                 emb.to(emb_ptr.dtype.element_ty), mask=used[:, None] & d_ok[None, :])
        stats_ptrs = b * L + cls[:, None]                                            # [SLOTS, 1]
        stats_ok = used[:, None] & (pid_d == 0)
        tl.store(mean_ptr + stats_ptrs, tl.sum(mean3, axis=2), mask=stats_ok)
        tl.store(count_ptr + stats_ptrs, count.to(tl.int64), mask=stats_ok)



# --------------------------------------------------------------------------------- launchers
# Interpreter configurations: small tiles so the loops and ragged tails all run on tiny shapes.
_INTERPRET_FWD = triton.Config(dict(BLOCK_D=16, BLOCK_HW=16, UNROLL=2, MEAN_HW=32), num_warps=4)


def _fwd_configs(slots: int, fp64: bool) -> list:
    """GPU candidates (not measured here): the [SLOTS, BLOCK_D, BLOCK_HW] accumulator is kept at
    <= 64 registers a thread; UNROLL sub-tiles are loaded per step so that enough bytes are in
    flight per SM even at one or two programs per SM (B * D / BLOCK_D programs in all)."""
    out = []
    # (two candidates: each is compiled for sm_90a by the compile check at every shape and dtype)
    for block_d, block_hw, unroll, warps in ((8, 128, 2, 4), (4, 128, 4, 4), (4, 128, 2, 4)):
        per_thread = slots * block_d * block_hw // (32 * warps) * (2 if fp64 else 1)
        # loads in flight: slots * unroll CAM sub-tiles; 8 slots x 4 sub-tiles spilled 8 B (fp32).
        # 8 slots with a 64-float accumulator a thread used 248 registers (sm_90a, Triton 3.8): over the
        # 240 of the headroom rule (launch_rule.FIXED_RULE_MAX_REGISTERS), so 8 slots take 32 a thread
        if per_thread <= (32 if slots >= 8 else 64) and slots * unroll <= 16:
            # the fixed choice (first) capped at the headroom rule's 240: with labels, Triton 3.6's
            # ptxas took all 255 registers at the tiny backbone's shape (D 64, 28x28), though capped
            # at 224 it used 224 and spilled nothing.  The 4-wide candidates keep 255: capped at 240
            # they spilled 24 B under 3.6 (16-bit features).
            cap = FIXED_RULE_MAX_REGISTERS if not out else MAXNREG
            out.append(triton.Config(dict(BLOCK_D=block_d, BLOCK_HW=block_hw, UNROLL=unroll,
                                          MEAN_HW=1024 * warps // slots), num_warps=warps, maxnreg=cap))
    return out or [triton.Config(dict(BLOCK_D=4, BLOCK_HW=128, UNROLL=1, MEAN_HW=128), num_warps=4,
                                 maxnreg=MAXNREG)]




def _launch_fwd(features: torch.Tensor, cams: torch.Tensor, labels: Optional[torch.Tensor], *,
                config: Optional[triton.Config] = None,
                slots: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """emb (B, L, D) features.dtype, count (B, L) int64, mean (B, L) float64 (saved for the
    backward: the threshold of each region mask).

    On CUDA the configuration is the first of ``_fwd_configs`` (the fixed rule; autotuned over the
    list under RCA_FAST_AUTOTUNE=1); in the interpreter it is ``_INTERPRET_FWD``.
    ``config``/``slots`` force one (the tests run every GPU candidate in the interpreter)."""
    B, D, H, W = features.shape
    L = cams.shape[1]
    HW = H * W
    emb = features.new_empty((B, L, D))
    count = torch.empty((B, L), dtype=torch.int64, device=features.device)
    mean = torch.empty((B, L), dtype=torch.float64, device=features.device)
    if B * L == 0:
        return emb, count, mean
    on_gpu = not interpreting(features.device)
    features, (s_fb, s_fd, s_fhw) = walkable(features)
    cams, (s_cb, s_cl, s_chw) = walkable(cams)
    check_int32_extent("features", features, (D, HW), (s_fd, s_fhw))
    check_int32_extent("cams", cams, (L, HW), (s_cl, s_chw))
    present = present_arg(labels, cams)
    has_labels = labels is not None
    fp64 = features.dtype == torch.float64
    slots = slots or slots_per_pass(on_gpu, has_labels, L)
    args = (features, cams, present, mean, count, emb, L, D, HW,
            s_fb, s_fd, s_fhw, s_cb, s_cl, s_chw, *emb.stride())
    meta = dict(HAS_LABELS=has_labels, LP=pow2(L), SLOTS=slots, ACC_FP64=fp64)
    candidates = _fwd_configs(slots, fp64) if on_gpu and config is None else ()
    fixed = config or (candidates[0] if on_gpu else _INTERPRET_FWD)
    # at least one D-block, so that mean and count are written even when D == 0
    launch(LaunchPlan("map_fwd", _map_fwd_kernel, lambda m: (max(1, triton.cdiv(D, m["BLOCK_D"])), B), args,
                      meta, fixed, features.device, dtype_label(features, cams), candidates, TUNE_KEY,
                      axes=("D blocks", "B: images of features")))
    return emb, count, mean



# ---------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("rca_fast::map_fwd", mutates_args=())
def map_fwd(features: torch.Tensor, cams: torch.Tensor,
            labels: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features (B, D, H, W), cams (B, L, H, W), labels (B, L) bool or None) ->
    (emb (B, L, D), count (B, L) int64, mean (B, L) float64 mask thresholds)."""
    return _launch_fwd(features, cams, labels)


@map_fwd.register_fake
def _map_fwd_fake(features, cams, labels):
    B, D = features.shape[:2]
    L = cams.shape[1]
    return (features.new_empty((B, L, D)), features.new_empty((B, L), dtype=torch.int64),
            features.new_empty((B, L), dtype=torch.float64))


@torch.library.custom_op("rca_fast::map_bwd", mutates_args=())
def map_bwd(grad_emb: torch.Tensor, cams: torch.Tensor, labels: Optional[torch.Tensor],
            mean: torch.Tensor, count: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """grad_features (B, D, H, W) of ``map_fwd`` from grad_emb (B, L, D) and the saved
    thresholds and counts."""
    return _launch_bwd(grad_emb, cams, labels, mean, count, channels_last)


@map_bwd.register_fake
def _map_bwd_fake(grad_emb, cams, labels, mean, count, channels_last):
    return _grad_features_like(grad_emb, cams, channels_last)


def _is_channels_last(t: torch.Tensor) -> bool:
    return (not t.is_contiguous()) and t.is_contiguous(memory_format=torch.channels_last)


def _setup_context(ctx, inputs, output):
    features, cams, labels = inputs
    _, count, mean = output
    # The thresholds and counts rebuild the masks in the backward: no (B, L, H*W) tensor kept,
    # and the features themselves are not needed.
    ctx.save_for_backward(cams, labels, mean, count)
    ctx.channels_last = _is_channels_last(features)


def _backward(ctx, grad_emb, grad_count, grad_mean):
    cams, labels, mean, count = ctx.saved_tensors
    grad_features = None
    if ctx.needs_input_grad[0]:
        grad_features = map_bwd(grad_emb, cams, labels, mean, count, ctx.channels_last)
    return grad_features, None, None


map_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------- provider
def masked_average_pool(features: torch.Tensor, cams: torch.Tensor,
                        labels: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton provider of ``rca_fast.ops.masked_average_pool`` (arguments already validated).

    Args:
        features: (B, D, H, W) float (any strides; channels-last is read in place).
        cams: (B, L, H, W) float, no gradient.
        labels: (B, L) bool (0/1 integers accepted) or None for "every class present".
    Returns:
        emb (B, L, D) in ``features.dtype`` (0 for absent classes and empty masks) and
        count (B, L) int64.  Differentiable w.r.t. ``features`` only.  Runs the kernels in every
        dtype it is handed, float64 included (``rca_fast.ops`` sends float64 here only in the
        interpreter: fp64 accumulators spill on sm_90).
    """
    if labels is not None and labels.dtype != torch.bool:
        labels = labels != 0
    emb, count, _ = map_fwd(features, cams.detach(), labels)
    return emb, count
