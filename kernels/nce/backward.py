"""Backward of the bank NCE (``forward.py``): d loss / d query by recomputing the similarity tiles.

With g_n the upstream gradient of row n's loss, w its mixup weight (1 without mixup), t / mt its
classes, G_c and A_c = mean_j sigmoid(G_c - s_cj) the forward's per-row statistics, the gradient
of the row loss with respect to one similarity s_li (already divided by tau) is, per class term
c in {t (weight w), mt (weight 1 - w)}:

    l == c :  -(weight * g / S) * sigmoid(G_c - s_li)       (a positive slot of c)
    l != c :   (weight * g * A_c) * exp(s_li - G_c)          (a negative of c; s_li <= G_c)

since d/ds_cj of mean_j softplus(G_c - s_cj) is -sigmoid(G_c - s_cj) / S, d/dG_c is A_c, and
dG_c / ds_li = exp(s_li - G_c) for l != c.  Every factor is <= 1: nothing overflows for any tau.
With s_li = <qn, mn_li> / tau (qn, mn unit vectors):

    dL/dqn = v / tau,  v = sum_li delta_li mn_li;   dL/dq = (dL/dqn - qn <qn, dL/dqn>) / |q|
    with <qn, dL/dqn> = c = sum_li delta_li s_li   (|q| <= eps: dL/dq = dL/dqn / eps, as F.normalize)

The kernel accumulates v (as delta * inv|m| against the raw slots) and c over the bank: one program
per (row block, block of BLOCK_DV output columns, split of the bank's units); it recomputes each
similarity tile over the full D, then adds delta @ m[:, columns].  Splits write partial sums
(n_splits x N x D floats, bounded by the launch size, not by the bank) that are summed afterwards:
deterministic, no atomics.  L == 1 (no negatives): every delta is 0, the gradient is exactly 0.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ..launch_rule import (LaunchPlan, block_config, dtype_label, interpreting, launch, launch_options,
                           sm_count)
from ..precise_math import exp_precise
from .tiles import (DOT_F32X3, NORM_EPS, S_GRANULE_GPU, S_GRANULE_INTERPRET, cdiv, check_int32_offsets,
                    dot_acc, dot_mode, row_inv_norms, sim_tile, split_units)


@triton.jit
def _class_term(delta, s, cls, row_cls, g_c, pos_coef, neg_coef):
    """delta + the gradient of one class term (see the module note) for a tile of class ``cls``;
    sigmoid(x) is taken as 0 below x = -80 (it is < 2e-35 there): exp never overflows, no NaN."""
    positive = (row_cls == cls)[:, None]
    # a negative's s is <= G_c (a term of its logsumexp): the clamp only removes rounding, and the
    # inf of G_c = -inf (L == 1, then every slot is positive) from the branch that is not taken
    x = g_c[:, None] - s
    pos_sigmoid = tl.where(x < -80.0, 0.0, tl.div_rn(tl.full(x.shape, 1.0, tl.float32),
                                                     1.0 + exp_precise(-tl.maximum(x, -80.0))))
    return delta + tl.where(positive, -pos_coef[:, None] * pos_sigmoid,
                            neg_coef[:, None] * exp_precise(tl.minimum(s - g_c[:, None], 0.0)))


# N (changes every step) and the grid bookkeeping are not specialised on: see forward.py
@triton.jit(do_not_specialize=["N", "S", "n_row_blocks", "n_dv_blocks", "n_chunks", "n_units",
                               "units_per_split"])
def _nce_bwd_kernel(q_ptr, m_ptr, t_ptr, mt_ptr, w_ptr, stats_ptr, g_ptr, v_part_ptr, c_part_ptr,
                    N, S, D, n_row_blocks, n_dv_blocks, n_chunks, n_units, units_per_split,
                    S_CHUNK, scale,
                    stride_qn, stride_qd, stride_ml, stride_ms, stride_md,
                    HAS_MIX: tl.constexpr, MODE: tl.constexpr, VMODE: tl.constexpr,
                    INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Partial v[split, rows, columns] and c[split, rows] over the split's units."""
    pid = tl.program_id(0)
    row_block = pid % n_row_blocks
    rest = pid // n_row_blocks
    dv_block = rest % n_dv_blocks
    split = rest // n_dv_blocks
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    inv_q = row_inv_norms(q_ptr, stride_qn, stride_qd, rows, row_ok, D, BLOCK_N, BLOCK_D)

    # masked rows get zero coefficients (g = 0) and finite statistics: their delta is 0
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    w = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    if HAS_MIX:
        w = tl.load(w_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    g_t = tl.load(stats_ptr + rows * 4 + 0, mask=row_ok, other=0.0)
    s_count = tl.zeros([], dtype=tl.float32) + S   # (S may be a constexpr 1: no .to on it)
    pos_coef_t = tl.div_rn(g * w, s_count)
    neg_coef_t = g * w * tl.load(stats_ptr + rows * 4 + 1, mask=row_ok, other=0.0)
    if HAS_MIX:
        mix = tl.load(mt_ptr + rows, mask=row_ok, other=-1)
        g_m = tl.load(stats_ptr + rows * 4 + 2, mask=row_ok, other=0.0)
        pos_coef_m = tl.div_rn(g * (1.0 - w), s_count)
        neg_coef_m = g * (1.0 - w) * tl.load(stats_ptr + rows * 4 + 3, mask=row_ok, other=0.0)

    cols = dv_block * BLOCK_DV + tl.arange(0, BLOCK_DV)
    col_ok = cols < D
    v_acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    c_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    offs_s = tl.arange(0, BLOCK_S)
    u_lo = split * units_per_split
    u_hi = tl.minimum(u_lo + units_per_split, n_units)
    for unit in range(u_lo, u_hi):
        cls = unit // n_chunks
        m_base = m_ptr + cls.to(tl.int64) * stride_ml
        s_lo = (unit % n_chunks) * S_CHUNK
        s_hi = tl.minimum(s_lo + S_CHUNK, S)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            slots = s0 + offs_s
            slot_ok = slots < s_hi
            s, inv_m = sim_tile(q_ptr, stride_qn, stride_qd, rows, row_ok, inv_q,
                                m_base, stride_ms, stride_md, slots, slot_ok, D, scale,
                                BLOCK_N, BLOCK_S, BLOCK_D, MODE, INTERPRET)
            delta = tl.zeros([BLOCK_N, BLOCK_S], dtype=tl.float32)
            delta = _class_term(delta, s, cls, tgt, g_t, pos_coef_t, neg_coef_t)
            if HAS_MIX:
                delta = _class_term(delta, s, cls, mix, g_m, pos_coef_m, neg_coef_m)
            delta = tl.where(slot_ok[None, :], delta, 0.0)
            c_acc += tl.sum(delta * s, axis=1)
            m = tl.load(m_base + slots[:, None] * stride_ms + cols[None, :] * stride_md,
                        mask=slot_ok[:, None] & col_ok[None, :], other=0.0)     # [BLOCK_S, BLOCK_DV]
            v_acc = dot_acc(delta * inv_m[None, :], m, v_acc, VMODE, INTERPRET)
    out_rows = split * N + rows
    tl.store(v_part_ptr + out_rows[:, None] * D + cols[None, :], v_acc,
             mask=row_ok[:, None] & col_ok[None, :])
    if dv_block == 0:
        tl.store(c_part_ptr + out_rows, c_acc, mask=row_ok)


def _cfg(block_s, block_d, warps, stages):
    return block_config(warps, stages, BLOCK_S=block_s, BLOCK_D=block_d)


# Launchable configs per family, checked by the sm_90a compile check (no spills at BLOCK_N = 64,
# D = 512).  The family is the scheme of the ``delta @ m`` dot (VMODE): against a bf16 bank the fp32
# delta is split into bf16 parts ("split", 128 output columns a program); against an fp32 or fp16
# bank it is tf32x3 ("f32x3"), whose three operand copies and [BLOCK_N, BLOCK_DV] fp32 accumulator
# only fit with 64 output columns and narrow tiles (every wider tile spilled 56-2,560 B; 32x32 used
# 254-255 registers, 16 slots x 32 columns 188).  ("split" 64 slots x 32 columns spilled 88-860 B
# under Triton 3.6's ptxas, 255 registers under 3.8: dropped.)
# The FIRST entry is the fixed rule's choice; RCA_FAST_AUTOTUNE=1 times them all.
BWD_CONFIGS = {
    # split: (32, 64, 8, 2) needed 241 registers at BLOCK_N 64 (fp32 query), (32, 32, 8, 2) 204-214
    # under Triton 3.8 but 246-255 under 3.6 with mixup at BLOCK_N 16-32 (capped at 240 it spilled
    # 8-24 B); 16 slots x 32 columns: 163-195 under 3.6 at those shapes, so it is the fixed choice.
    "split": [_cfg(16, 32, 8, 2), _cfg(32, 32, 8, 2), _cfg(32, 64, 8, 2)],
    "f32x3": [_cfg(16, 32, 8, 2), _cfg(32, 16, 8, 2)],
}
BWD_BLOCK_DV = {"split": 128, "f32x3": 64}
_INTERPRET_BWD_CONFIG = triton.Config(dict(BLOCK_S=16, BLOCK_D=32))
BWD_TUNE_KEY = ["BLOCK_N", "BLOCK_DV", "D", "S", "MODE", "VMODE", "HAS_MIX"]


def bwd_family(bank_dtype: torch.dtype) -> str:
    return "f32x3" if dot_mode(torch.float32, bank_dtype) == DOT_F32X3 else "split"


def bwd_blocks(N: int, D: int, bank_dtype: torch.dtype, interpret: bool):
    """(BLOCK_N, BLOCK_DV): rows per program and output columns per program (the similarity tiles
    are recomputed once per column block)."""
    if interpret:
        return 16, 32
    block_n = 16 if N <= 16 else 32 if N <= 32 else 64
    return block_n, min(BWD_BLOCK_DV[bwd_family(bank_dtype)], max(16, triton.next_power_of_2(D)))


def bwd_launch_config(bank_dtype: torch.dtype) -> dict:
    """The fixed rule: the first config of the bank dtype's family, whatever the shapes."""
    cfg = BWD_CONFIGS[bwd_family(bank_dtype)][0]
    return dict(cfg.kwargs, **launch_options(cfg))


def backward(grad_rows: torch.Tensor, query: torch.Tensor, bank: torch.Tensor,
             target: torch.Tensor, mix_target: Optional[torch.Tensor],
             mix_weight: Optional[torch.Tensor], stats: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """d(sum_n grad_rows[n] * loss_n) / d query, (N, D) in query's dtype (arguments as ``forward``)."""
    N, D = query.shape
    L, S, _ = bank.shape
    dev = query.device
    if N == 0:
        return torch.zeros_like(query, memory_format=torch.contiguous_format)
    interpret = interpreting(dev)
    has_mix = mix_target is not None
    block_n, block_dv = bwd_blocks(N, D, bank.dtype, interpret)
    n_row_blocks, n_dv_blocks = cdiv(N, block_n), cdiv(D, block_dv)
    outer = n_row_blocks * n_dv_blocks
    wanted = 2 * sm_count(dev, 4)
    granule = S_GRANULE_INTERPRET if interpret else S_GRANULE_GPU
    s_chunk, n_chunks = split_units(S, L, outer, wanted, granule)
    n_units = L * n_chunks
    units_per_split = cdiv(n_units, max(1, min(n_units, cdiv(wanted, outer))))
    n_splits = cdiv(n_units, units_per_split)
    check_int32_offsets("bank_nce_loss (backward)", **{
        "splits * N * D (partial gradients)": n_splits * N * D, "N * 4 (row statistics)": 4 * N,
        "the query's extent": (N - 1) * abs(query.stride(0)) + (D - 1) * abs(query.stride(1)),
        "one class of the bank's extent": (S - 1) * abs(bank.stride(1)) + (D - 1) * abs(bank.stride(2))})
    v_part = torch.empty(n_splits, N, D, dtype=torch.float32, device=dev)
    c_part = torch.empty(n_splits, N, dtype=torch.float32, device=dev)
    g = grad_rows.to(torch.float32).contiguous()
    candidates = () if interpret else BWD_CONFIGS[bwd_family(bank.dtype)]
    launch(
        LaunchPlan(
            "nce_bwd",
            _nce_bwd_kernel,
            lambda meta: (outer * n_splits,),
            (
                query,
                bank,
                target,
                mix_target if has_mix else target,
                mix_weight if has_mix else g,
                stats,
                g,
                v_part,
                c_part,
                N,
                S,
                D,
                n_row_blocks,
                n_dv_blocks,
                n_chunks,
                n_units,
                units_per_split,
                s_chunk,
                1.0 / temperature,
                query.stride(0),
                query.stride(1),
                bank.stride(0),
                bank.stride(1),
                bank.stride(2),
            ),
            dict(
                HAS_MIX=has_mix,
                MODE=dot_mode(query.dtype, bank.dtype),
                VMODE=dot_mode(torch.float32, bank.dtype),
                INTERPRET=interpret,
                BLOCK_N=block_n,
                BLOCK_DV=block_dv,
            ),
            _INTERPRET_BWD_CONFIG if interpret else candidates[0],
            dev,
            dtype_label(query, bank),
            candidates,
            BWD_TUNE_KEY,
        )
    )
    v = v_part.sum(0)
    c = c_part.sum(0).unsqueeze(1)
    # chain through qn = q / max(|q|, eps) (N x D elementwise work: small next to the kernel)
    q32 = query.to(torch.float32)
    norm = torch.linalg.vector_norm(q32, dim=1, keepdim=True)
    inv_q = 1.0 / norm.clamp_min(NORM_EPS)
    radial = torch.where(norm > NORM_EPS, q32 * (inv_q * c), torch.zeros_like(q32))
    return (inv_q * (v / temperature - radial)).to(query.dtype)
