"""Masked average pooling (MAP, eq. 2) as fused Triton kernels.

Semantics are those of ``rca_fast.ref.map``: for each (image b, class l) the region mask is
``x > mean(x)`` with ``x = float64(cams[b, l]) - cams[b, l, 0, 0]`` (the shift makes a constant
map an exactly empty mask), ``count`` is the number of mask pixels and ``emb`` the mean feature
under the mask (0 for an empty mask or an absent class, never NaN).

Layering (one file, Liger-Kernel habit):
  Triton kernels  ``_map_fwd_kernel``   (per (b, D-block): thresholds, then one pass over the
                                         features; counts and the division fused),
                  ``_map_bwd_kernel``   (per (b, D-block, HW-block): grad_features, written once)
  launchers       ``_launch_fwd`` / ``_launch_bwd`` (strides, block sizes, grids, allocation)
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

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .launch_rule import MAXNREG, autotune_requested
from .precise_math import div_precise

__all__ = ["masked_average_pool"]


# ----------------------------------------------------------------------------------- kernels
@triton.jit
def _present_classes(present_ptr, b, L, HAS_LABELS: tl.constexpr, LP: tl.constexpr):
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
def _slot_classes(cls_all, present, rank, n_present, first, SLOTS: tl.constexpr):
    """Class held by each of the SLOTS slots of the chunk starting at present-rank ``first``
    (slot s holds the present class of rank first + s) and whether the slot is used."""
    slot_rank = first + tl.arange(0, SLOTS)
    hit = present[None, :] & (rank[None, :] == slot_rank[:, None])          # [SLOTS, LP]
    cls = tl.sum(tl.where(hit, cls_all[None, :], 0), axis=1)                # [SLOTS]
    return cls, slot_rank < n_present


# L, D and HW only bound masks and loops (the strides stay specialised): one binary for more shapes
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
    cls_all, present, rank, n_present = _present_classes(present_ptr, b, L, HAS_LABELS, LP)
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
        cls, used = _slot_classes(cls_all, present, rank, n_present, first, SLOTS)
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
    cls_all, present, rank, n_present = _present_classes(present_ptr, b, L, HAS_LABELS, LP)
    # 2-D operands throughout ([1, HW] masks, [BLOCK_D, 1] gradients) so they share the
    # output tile's layout; int32 offsets from scalar base pointers
    cam_offs = (tl.arange(0, BLOCK_HW) * s_chw)[None, :]
    grad_offs = (tl.arange(0, BLOCK_D) * s_gd)[:, None]
    cam_base = cams_ptr + b * s_cb + hw0.to(tl.int64) * s_chw
    grad_base = grad_emb_ptr + b * s_gb + d0.to(tl.int64) * s_gd
    out = tl.zeros([BLOCK_D, BLOCK_HW], dtype=acc_dtype)
    slot_ids = tl.arange(0, SLOTS)
    for first in range(0, n_present, SLOTS):
        cls, used = _slot_classes(cls_all, present, rank, n_present, first, SLOTS)
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


# --------------------------------------------------------------------------------- launchers
def _merged_hw_strides(t: torch.Tensor) -> Optional[Tuple[int, int, int]]:
    """(stride of dim 0, stride of dim 1, stride of the flattened H*W index) of a 4-D tensor,
    or None when its H and W cannot be walked as one index (e.g. a spatial slice)."""
    _, _, H, W = t.shape
    s0, s1, sh, sw = t.stride()
    if W == 1:
        return s0, s1, sh
    if H == 1 or sh == W * sw:  # contiguous (sw == 1) and channels-last (sw == D) both qualify
        return s0, s1, sw
    return None


def _walkable(t: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """``t`` (copied to contiguous only if its H, W cannot be merged) and its three strides."""
    strides = _merged_hw_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = _merged_hw_strides(t)
    return t, strides


def _check_int32_extent(name: str, t: torch.Tensor, sizes, strides) -> None:
    """The kernels index inside one image with int32 offsets (the image offset is int64)."""
    extent = sum((n - 1) * abs(st) for n, st in zip(sizes, strides) if n > 0)
    if extent >= 2 ** 31:
        raise ValueError(f"masked_average_pool: one image of {name} spans {extent} elements "
                         f"(shape {tuple(t.shape)}), more than the Triton kernels' int32 "
                         f"offsets reach; use the torch backend (RCA_FAST_BACKEND=torch)")


def _present_arg(labels: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    """Bool labels as a uint8 view (no copy when contiguous); any tensor when there are none
    (the kernels never read it then)."""
    if labels is None:
        return fallback
    return labels.contiguous().view(torch.uint8)


def _launch_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one (tensors on cuda:1
    while cuda:0 is current would otherwise be read by a kernel running on cuda:0)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _slots(on_gpu: bool, has_labels: bool, L: int) -> int:
    """Classes handled per pass over the features (a power of two)."""
    if not on_gpu:  # the interpreter: 2 slots, so three present classes exercise the chunk
        return 2 if L <= 8 else 8  # loop (8 with many classes: fewer interpreted passes)
    # With labels, 1-3 classes are present per image in practice (VOC/COCO): 4 slots take them
    # in one pass.  Without labels every class is present: 8 a pass bounds the accumulator.
    return min(4 if has_labels else 8, _pow2(L))


# Interpreter configurations: small tiles so the loops and ragged tails all run on tiny shapes.
_INTERPRET_FWD = dict(BLOCK_D=16, BLOCK_HW=16, UNROLL=2, MEAN_HW=32, num_warps=4)
_INTERPRET_BWD = dict(BLOCK_D=16, BLOCK_HW=32, num_warps=4)


def _fwd_configs(slots: int, fp64: bool) -> list:
    """GPU candidates (not measured here): the [SLOTS, BLOCK_D, BLOCK_HW] accumulator is kept at
    <= 64 registers a thread; UNROLL sub-tiles are loaded per step so that enough bytes are in
    flight per SM even at one or two programs per SM (B * D / BLOCK_D programs in all)."""
    out = []
    # (two candidates: each is compiled for sm_90a by the compile check at every shape and dtype)
    for block_d, block_hw, unroll, warps in ((8, 128, 2, 4), (4, 128, 4, 4)):
        per_thread = slots * block_d * block_hw // (32 * warps) * (2 if fp64 else 1)
        # loads in flight: slots * unroll CAM sub-tiles; 8 slots x 4 sub-tiles spilled 8 B (fp32)
        if per_thread <= 64 and slots * unroll <= 16:
            out.append(triton.Config(dict(BLOCK_D=block_d, BLOCK_HW=block_hw, UNROLL=unroll,
                                          MEAN_HW=1024 * warps // slots), num_warps=warps, maxnreg=MAXNREG))
    return out or [triton.Config(dict(BLOCK_D=4, BLOCK_HW=128, UNROLL=1, MEAN_HW=128), num_warps=4,
                                 maxnreg=MAXNREG)]


def _bwd_configs(fp64: bool, slots: int = 4) -> list:
    """GPU candidates for the backward (one output tile a program; stores dominate).  With 8 classes
    a pass (no labels) the [16, 256] tile spilled 148-456 B (sm_90a): narrower tiles then."""
    shapes = ((16, 128, 4), (16, 256, 4)) if slots <= 4 else ((8, 128, 4), (16, 128, 4))
    if fp64:
        shapes = ((16, 128, 4), (8, 256, 4), (16, 256, 8))
    return [triton.Config(dict(BLOCK_D=d, BLOCK_HW=hw), num_warps=w, maxnreg=MAXNREG) for d, hw, w in shapes]


def _config_kwargs(config: Optional[triton.Config], default: dict) -> dict:
    """Launch keywords (block sizes and num_warps) of ``config``, or ``default``."""
    if config is None:
        return dict(default)
    out = dict(config.kwargs, num_warps=config.num_warps)
    if config.maxnreg:
        out["maxnreg"] = config.maxnreg
    return out


_tuned: dict = {}


def _tuned_kernel(kind: str, slots: int, fp64: bool):
    """The autotuned wrapper of the forward/backward kernel for one (SLOTS, fp64) pair; the
    best configuration is cached per (L, D, HW, labels, dtypes)."""
    key = (kind, slots, fp64)
    if key not in _tuned:
        if kind == "fwd":
            _tuned[key] = triton.autotune(_fwd_configs(slots, fp64),
                                          key=["L", "D", "HW", "HAS_LABELS"])(_map_fwd_kernel)
        else:
            _tuned[key] = triton.autotune(_bwd_configs(fp64, slots),
                                          key=["L", "D", "HW", "HAS_LABELS"])(_map_bwd_kernel)
    return _tuned[key]


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
    on_gpu = features.device.type == "cuda"
    features, (s_fb, s_fd, s_fhw) = _walkable(features)
    cams, (s_cb, s_cl, s_chw) = _walkable(cams)
    _check_int32_extent("features", features, (D, HW), (s_fd, s_fhw))
    _check_int32_extent("cams", cams, (L, HW), (s_cl, s_chw))
    present = _present_arg(labels, cams)
    has_labels = labels is not None
    fp64 = features.dtype == torch.float64
    slots = slots or _slots(on_gpu, has_labels, L)
    args = (features, cams, present, mean, count, emb, L, D, HW,
            s_fb, s_fd, s_fhw, s_cb, s_cl, s_chw, *emb.stride())
    meta = dict(HAS_LABELS=has_labels, LP=_pow2(L), SLOTS=slots, ACC_FP64=fp64)
    # at least one D-block, so that mean and count are written even when D == 0
    grid = lambda m: (max(1, triton.cdiv(D, m["BLOCK_D"])), B)  # noqa: E731
    with _launch_device(features.device):
        if on_gpu and config is None and autotune_requested():
            _tuned_kernel("fwd", slots, fp64)[grid](*args, **meta)
        else:
            if on_gpu and config is None:
                config = _fwd_configs(slots, fp64)[0]      # the fixed rule (launch_rule.py)
            cfg = _config_kwargs(config, _INTERPRET_FWD)
            _map_fwd_kernel[grid(cfg)](*args, **meta, **cfg)
    return emb, count, mean


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
    on_gpu = grad_emb.device.type == "cuda"
    cams, (s_cb, s_cl, s_chw) = _walkable(cams)
    _, (s_ob, s_od, s_ohw) = _walkable(grad_features)  # both layouts above are walkable
    _check_int32_extent("features", grad_features, (D, HW), (s_od, s_ohw))
    present = _present_arg(labels, cams)
    fp64 = grad_emb.dtype == torch.float64
    has_labels = labels is not None
    args = (grad_emb, cams, present, mean.contiguous(), count.contiguous(), grad_features, L, D, HW,
            *grad_emb.stride(), s_cb, s_cl, s_chw, s_ob, s_od, s_ohw)
    slots = slots or _slots(on_gpu, has_labels, L)
    meta = dict(HAS_LABELS=has_labels, LP=_pow2(L), SLOTS=slots, ACC_FP64=fp64)
    grid = lambda m: (triton.cdiv(D, m["BLOCK_D"]), triton.cdiv(HW, m["BLOCK_HW"]), B)  # noqa: E731
    with _launch_device(grad_emb.device):
        if on_gpu and config is None and autotune_requested():
            _tuned_kernel("bwd", slots, fp64)[grid](*args, **meta)
        else:
            if on_gpu and config is None:
                config = _bwd_configs(fp64, slots)[0]      # the fixed rule (launch_rule.py)
            cfg = _config_kwargs(config, _INTERPRET_BWD)
            _map_bwd_kernel[grid(cfg)](*args, **meta, **cfg)
    return grad_features


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
        count (B, L) int64.  Differentiable w.r.t. ``features`` only.
    """
    if labels is not None and labels.dtype != torch.bool:
        labels = labels != 0
    if features.dtype == torch.float64 and features.device.type == "cuda":
        # fp64 accumulators spill on sm_90 and fp64 is no training dtype: the reference.  The
        # interpreter keeps running the kernels in fp64 (the CPU tests' exact oracle).
        from rca_fast.ref.map import masked_average_pool as reference
        return reference(features, cams, labels)
    emb, count, _ = map_fwd(features, cams.detach(), labels)
    return emb, count
