"""Backward of prototype attention (see ``kernels/attention/forward.py`` for the plan and the shapes).

Given q (M, D), k (P, D), v (P, Dv), the forward's out (M, Dv) and lse (M,), and dO (M, Dv):
  probs    = exp(scale * q k^T - lse)                        (M, P)
  dscores  = scale * probs * (dO v^T - rowsum(dO * out))     (M, P)
  dq = dscores @ k,   dk = dscores^T @ q,   dv = probs^T @ dO.
Three launches:
  1. ``_attn_bwd_scores_kernel`` (one program per row block) writes probs and dscores in the input
     dtype, rows padded to a multiple of 16 elements so the later loads are vectorised (for M = 8*2116,
     P = 200 in bf16: 2 x 7 MB);
  2. ``_attn_bwd_grads_kernel``: one 1-D grid holding the dq tiles (row block x D tile, summing over
     P) and, for each of ``splits`` contiguous row ranges, the dk and dv tiles (P block x column tile,
     summing over the range's rows) which write fp32 partials (splits, P, D + Dv);
  3. ``_sum_splits_kernel`` adds the partials in split order and writes dk and dv in the input dtype.
No atomics: the result does not depend on scheduling (deterministic).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..launch_rule import (MAXNREG, LaunchPlan, as_config, block_config, dtype_label, interpreting, launch,
                           sm_count)
from ..precise_math import exp_precise
from .tiles import (TUNE_KEY, acc_dtype, cast_rne, clamp_configs, contract_rows, dot_acc, fixed_launch,
                    kernel_meta, precision_family, scale_scores, split_scale)

INTERPRET_BWD_BLOCKS = dict(
    scores=dict(BLOCK_M=16, BLOCK_P=16, BLOCK_D=16, BLOCK_DV=16),
    grads=dict(BLOCK_M_Q=16, BLOCK_P_Q=16, BLOCK_N_Q=16, BLOCK_M_R=16, BLOCK_P_R=16, BLOCK_N_R=16),
)
# The grads kernel is not autotuned (the partials' size depends on its tiles): one config per
# precision family, checked by the sm_90a compile check (no spills, D = Dv = 512, P = 200).
GPU_GRADS_BLOCKS = {
    "16bit": dict(BLOCK_M_Q=64, BLOCK_P_Q=64, BLOCK_N_Q=128, BLOCK_M_R=64, BLOCK_P_R=64, BLOCK_N_R=64,
                  num_warps=8, num_stages=3, maxnreg=MAXNREG),        # 80 registers (4 warps: 254)
    # fp32: at 4 warps and maxnreg 255 ptxas used all 255 registers (no headroom for another ptxas);
    # at 8 warps capped at 192 it needs 192 and spills nothing (sm_90a, Triton 3.8; tf32: 81)
    "fp32": dict(BLOCK_M_Q=64, BLOCK_P_Q=32, BLOCK_N_Q=64, BLOCK_M_R=32, BLOCK_P_R=32, BLOCK_N_R=64,
                 num_warps=8, num_stages=2, maxnreg=192),
}
SUM_BLOCK = 1024


def padded_cols(P: int) -> int:
    """Row stride of probs / dscores: P rounded up to 16 elements (Triton then knows the rows are
    16-element aligned and vectorises their loads)."""
    return triton.cdiv(P, 16) * 16


@triton.jit(do_not_specialize=["M", "P"])
def _attn_bwd_scores_kernel(q_ptr, k_ptr, v_ptr, out_ptr, dout_ptr, lse_ptr, probs_ptr, dscores_ptr,
                            M, P, D, DV, LDP, scale_hi, scale_lo,
                            ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_DV: tl.constexpr):
    """One program per row block: probs[rows, :P] and dscores[rows, :P] (row stride LDP)."""
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)

    # delta_i = sum_c dO[i, c] * out[i, c] = sum_j p_ij * dp_ij: the softmax Jacobian's row term.
    delta = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    for c0 in range(0, DV, BLOCK_DV):
        cols = c0 + tl.arange(0, BLOCK_DV)
        offs = rows64[:, None] * DV + cols[None, :]
        mask = row_ok[:, None] & (cols < DV)[None, :]
        d_out = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        out = tl.load(out_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        delta += tl.sum(d_out * out, 1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)

    for p0 in range(0, P, BLOCK_P):
        keys = p0 + tl.arange(0, BLOCK_P)
        key_ok = keys < P
        keys64 = keys.to(tl.int64)
        s = contract_rows(q_ptr, rows64 * D, row_ok, k_ptr, keys64 * D, key_ok, D,
                          BLOCK_M, BLOCK_P, BLOCK_D, ACC_DTYPE, PRECISION, INTERP_BF16)
        # tl.where, not a product: exp() of a padded key may overflow, and inf * 0 would be NaN.
        probs = tl.where(
            key_ok[None, :], exp_precise(scale_scores(s, scale_hi, scale_lo) - lse[:, None]), 0.0
        )
        d_probs = contract_rows(dout_ptr, rows64 * DV, row_ok, v_ptr, keys64 * DV, key_ok, DV,
                                BLOCK_M, BLOCK_P, BLOCK_DV, ACC_DTYPE, PRECISION, INTERP_BF16)
        d_scores = scale_scores(probs * (d_probs - delta[:, None]), scale_hi, scale_lo)
        offs = rows64[:, None] * LDP + keys[None, :]
        mask = row_ok[:, None] & key_ok[None, :]
        tl.store(probs_ptr + offs, cast_rne(probs, probs_ptr.dtype.element_ty, INTERP_BF16), mask=mask)
        tl.store(dscores_ptr + offs, cast_rne(d_scores, dscores_ptr.dtype.element_ty, INTERP_BF16), mask=mask)


@triton.jit
def _rows_times_keys_tile(a_ptr, LDA, b_ptr, c_ptr, M, K, N, tile,
                          ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """One tile of c (M, N) = a (M, K; row stride LDA) @ b (K, N); tiles numbered column-fastest
    so the programs sharing a block of a run together."""
    n_col_tiles = tl.cdiv(N, BLOCK_N)
    rows = (tile // n_col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = (tile % n_col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(
            a_ptr + rows64[:, None] * LDA + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        b = tl.load(b_ptr + ks.to(tl.int64)[:, None] * N + cols[None, :],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = dot_acc(a, b, acc, PRECISION, INTERP_BF16)
    tl.store(c_ptr + rows64[:, None] * N + cols[None, :], cast_rne(acc, c_ptr.dtype.element_ty, INTERP_BF16),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _rows_reduce_tile(a_ptr, LDA, b_ptr, part_ptr, LDPART, M, K, N, row_begin, row_end, tile,
                      ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """One tile of part (K, N; row stride LDPART) = a[row_begin:row_end]^T @ b[row_begin:row_end]
    for a (M, K; row stride LDA) and b (M, N)."""
    n_col_tiles = tl.cdiv(N, BLOCK_N)
    ks = (tile // n_col_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    cols = (tile % n_col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=ACC_DTYPE)
    for r0 in range(row_begin, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        a_t = tl.load(
            a_ptr + rows64[None, :] * LDA + ks[:, None], mask=k_ok[:, None] & row_ok[None, :], other=0.0
        )
        b = tl.load(
            b_ptr + rows64[:, None] * N + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
        )
        acc = dot_acc(a_t, b, acc, PRECISION, INTERP_BF16)
    tl.store(part_ptr + ks.to(tl.int64)[:, None] * LDPART + cols[None, :], acc,
             mask=k_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["M", "P", "rows_per_split"])
def _attn_bwd_grads_kernel(dscores_ptr, probs_ptr, q_ptr, k_ptr, dout_ptr, dq_ptr, part_ptr,
                           M, P, D, DV, LDP, rows_per_split,
                           ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
                           BLOCK_M_Q: tl.constexpr, BLOCK_P_Q: tl.constexpr, BLOCK_N_Q: tl.constexpr,
                           BLOCK_M_R: tl.constexpr, BLOCK_P_R: tl.constexpr, BLOCK_N_R: tl.constexpr):
    """Grid: [dq tiles | split 0: dk tiles, dv tiles | split 1: ... ].  dq = dscores @ k directly;
    split s writes part[s, :, :D] = dscores[rows_s]^T @ q[rows_s],
    part[s, :, D:] = probs[rows_s]^T @ dO[rows_s]."""
    pid = tl.program_id(0)
    n_dq_tiles = tl.cdiv(M, BLOCK_M_Q) * tl.cdiv(D, BLOCK_N_Q)
    if pid < n_dq_tiles:
        _rows_times_keys_tile(dscores_ptr, LDP, k_ptr, dq_ptr, M, P, D, pid,
                              ACC_DTYPE, PRECISION, INTERP_BF16, BLOCK_M_Q, BLOCK_P_Q, BLOCK_N_Q)
    else:
        n_p_tiles = tl.cdiv(P, BLOCK_P_R)
        n_dk_tiles = n_p_tiles * tl.cdiv(D, BLOCK_N_R)
        n_split_tiles = n_dk_tiles + n_p_tiles * tl.cdiv(DV, BLOCK_N_R)
        split = (pid - n_dq_tiles) // n_split_tiles
        tile = (pid - n_dq_tiles) % n_split_tiles
        row_begin = split * rows_per_split
        row_end = tl.minimum(M, row_begin + rows_per_split)
        ld_part = D + DV
        part_split = part_ptr + split.to(tl.int64) * P * ld_part
        if tile < n_dk_tiles:
            _rows_reduce_tile(dscores_ptr, LDP, q_ptr, part_split, ld_part, M, P, D, row_begin, row_end,
                              tile, ACC_DTYPE, PRECISION, INTERP_BF16, BLOCK_M_R, BLOCK_P_R, BLOCK_N_R)
        else:
            _rows_reduce_tile(probs_ptr, LDP, dout_ptr, part_split + D, ld_part, M, P, DV, row_begin,
                              row_end, tile - n_dk_tiles, ACC_DTYPE, PRECISION, INTERP_BF16,
                              BLOCK_M_R, BLOCK_P_R, BLOCK_N_R)


@triton.jit(do_not_specialize=["splits"])
def _sum_splits_kernel(
    part_ptr, dk_ptr, dv_ptr, splits, P, D, DV, INTERP_BF16: tl.constexpr, BLOCK: tl.constexpr
):
    """dk = sum_s part[s, :, :D], dv = sum_s part[s, :, D:], added in split order."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n = P * (D + DV)
    ok = idx < n
    ptrs = part_ptr + idx
    total = tl.load(ptrs, mask=ok, other=0.0)
    for _ in range(1, splits):
        ptrs += n                                   # pointer arithmetic: 64-bit
        total += tl.load(ptrs, mask=ok, other=0.0)
    p = idx // (D + DV)
    c = idx % (D + DV)
    is_dk = c < D
    tl.store(dk_ptr + p * D + c, cast_rne(total, dk_ptr.dtype.element_ty, INTERP_BF16), mask=ok & is_dk)
    tl.store(
        dv_ptr + p * DV + (c - D), cast_rne(total, dv_ptr.dtype.element_ty, INTERP_BF16), mask=ok & (c >= D)
    )


def _cfg(m, p, d, dv, warps, stages):
    return block_config(warps, stages, BLOCK_M=m, BLOCK_P=p, BLOCK_D=d, BLOCK_DV=dv)


# Launchable configs of the scores kernel per precision family (``tiles.precision_family``),
# checked by the sm_90a compile check.  The FIRST entry is the fixed rule's choice (blocks clamped
# to the shapes); RCA_FAST_AUTOTUNE=1 times them all.  A P block of 256 reads each chunk of q and
# dO once per program for P <= 256 (RCA: 200); IEEE fp32 dots need smaller tiles.
SCORES_CONFIGS = {
    "16bit": [_cfg(64, 64, 64, 64, 4, 2), _cfg(64, 256, 64, 64, 8, 2)],
    "fp32": [_cfg(32, 32, 32, 32, 8, 2), _cfg(32, 32, 16, 16, 4, 2)],     # 190 and 168 registers
}
SCORES_CAPS = {"BLOCK_P": "P", "BLOCK_D": "D", "BLOCK_DV": "DV"}


def bwd_launch_blocks(dtype: torch.dtype, P: int, D: int, DV: int) -> dict:
    """The fixed rule: the family's first scores config (clamped to the shapes) and its grads blocks."""
    family = precision_family(dtype)
    return dict(scores=fixed_launch(SCORES_CONFIGS[family][0], dict(P=P, D=D, DV=DV), SCORES_CAPS),
                grads=GPU_GRADS_BLOCKS[family])


def row_splits(M: int, reduce_tiles: int, block_m: int, device: torch.device) -> Tuple[int, int]:
    """(splits, rows_per_split) for dk/dv: about four programs per SM in all, each summing at least
    four row blocks (fewer partials for small M).  Depends only on shapes and the device."""
    want = max(1, triton.cdiv(4 * sm_count(device, 32), reduce_tiles))
    splits = max(1, min(want, triton.cdiv(M, 4 * block_m)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    return triton.cdiv(M, rows_per_split), rows_per_split


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, scale: float,
                       blocks: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dO (M, Dv), q (M, D), k (P, D), v (P, Dv), out (M, Dv), lse (M,) -> (dq, dk, dv) in the
    inputs' dtype.  ``blocks`` (keys ``scores``, ``grads``; ``grads`` may name ``splits``) fixes the
    block sizes and the number of row ranges (tests)."""
    grad_out, q, k, v, out = (t.contiguous() for t in (grad_out, q, k, v, out))
    M, D = q.shape
    P, DV = v.shape
    if M == 0 or DV == 0:          # out is empty or independent of everything: zero gradients
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    hi, lo = split_scale(scale)
    if blocks is None and interpreting(q.device):
        blocks = INTERPRET_BWD_BLOCKS
    return _launch_backward(grad_out, q, k, v, out, lse, hi, lo, kernel_meta(q.dtype, q.device), blocks)


def _launch_backward(grad_out, q, k, v, out, lse, hi, lo, meta, blocks):
    """The three launches of the backward (contiguous inputs, M > 0 and Dv > 0); ``blocks`` None:
    the fixed rule (GPU)."""
    M, D = q.shape
    P, DV = v.shape
    ldp = padded_cols(P)
    probs = torch.empty((M, ldp), dtype=q.dtype, device=q.device)
    dscores = torch.empty_like(probs)
    args = (q, k, v, out, grad_out, lse, probs, dscores, M, P, D, DV, ldp, hi, lo)
    family, dtypes = precision_family(q.dtype), dtype_label(q)
    candidates = ()
    if blocks is None:
        candidates = clamp_configs(SCORES_CONFIGS[family], dict(P=P, D=D, DV=DV), SCORES_CAPS)
        fixed = candidates[0]
    else:
        fixed = as_config(blocks["scores"])
    launch(LaunchPlan("attn_bwd_scores", _attn_bwd_scores_kernel, lambda m: (triton.cdiv(M, m["BLOCK_M"]),),
                      args, meta, fixed, q.device, dtypes, candidates, TUNE_KEY))

    grads_cfg = dict(GPU_GRADS_BLOCKS[family] if blocks is None else blocks["grads"])
    n_p_tiles = triton.cdiv(P, grads_cfg["BLOCK_P_R"])
    reduce_tiles = n_p_tiles * (
        triton.cdiv(D, grads_cfg["BLOCK_N_R"]) + triton.cdiv(DV, grads_cfg["BLOCK_N_R"])
    )
    if "splits" in grads_cfg:      # tests: force several (ragged) row ranges at small M
        want = grads_cfg.pop("splits")
        rows_per_split = triton.cdiv(triton.cdiv(M, want), grads_cfg["BLOCK_M_R"]) * grads_cfg["BLOCK_M_R"]
        splits = triton.cdiv(M, rows_per_split)
    else:
        splits, rows_per_split = row_splits(M, reduce_tiles, grads_cfg["BLOCK_M_R"], q.device)
    dq_tiles = triton.cdiv(M, grads_cfg["BLOCK_M_Q"]) * triton.cdiv(D, grads_cfg["BLOCK_N_Q"])
    dq = torch.empty_like(q)
    part = torch.empty((splits, P, D + DV), dtype=acc_dtype(q.dtype), device=q.device)
    launch(LaunchPlan("attn_bwd_grads", _attn_bwd_grads_kernel, lambda m: (dq_tiles + splits * reduce_tiles,),
                      (dscores, probs, q, k, grad_out, dq, part, M, P, D, DV, ldp, rows_per_split), meta,
                      as_config(grads_cfg), q.device, dtypes))

    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    launch(
        LaunchPlan(
            "attn_sum_splits",
            _sum_splits_kernel,
            lambda m: (triton.cdiv(P * (D + DV), SUM_BLOCK),),
            (part, dk, dv, splits, P, D, DV),
            dict(INTERP_BF16=meta["INTERP_BF16"]),
            triton.Config(dict(BLOCK=SUM_BLOCK), maxnreg=MAXNREG),
            q.device,
            dtypes,
        )
    )
    return dq, dk, dv
