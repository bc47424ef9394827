"""Prototype attention as Triton kernels: ``softmax(scale * q @ k.T) @ v`` with the keys and values
shared by every query row (regional semantic aggregation: each pixel attends over the L*K prototypes).

Shapes: the provider flattens ``query (B, N, D)`` to rows ``q (M = B*N, D)``; ``key (P, D)``,
``value (P, Dv)``.  D and Dv have no upper limit (FlashAttention stops at 256): every contraction
over D or Dv walks it in chunks, and the output is tiled over Dv.

Forward, ``_attn_fwd_kernel``, one program per (row block, Dv tile): online softmax over P blocks
(running max and sum), the scores of a P block being a chunked contraction over D; it writes the
output tile and, once per row block, ``lse = max + log(sum)`` (M,) for the backward.  With a Dv tile
narrower than Dv the scores are recomputed per tile; the autotuner weighs that against the register
cost of a wide accumulator.

Backward (``kernels/attention/backward.py``), three launches:
  1. one program per row block: ``delta = rowsum(dO * O)``, then per P block ``p = exp(s - lse)``,
     ``dp = dO @ v.T`` and ``ds = scale * p * (dp - delta)``, written as ``probs`` and ``dscores``
     (M, P) in the input dtype.  In RCA P (= L*K = 200) is small next to D (512), so these two
     matrices cost less to write and read back than re-reading q and dO for every key block;
  2. one grid holding the ``dq = dscores @ k`` tiles (row block x D tile) and, for each contiguous
     range of rows, the ``dk = dscores.T @ q`` and ``dv = probs.T @ dO`` tiles of that range, written
     as fp32 partials: parallel over rows;
  3. the partials summed in range order: deterministic, no atomics.

Layering: kernels -> launchers -> ``torch.library`` custom ops ``rca_fast::attention_fwd`` /
``rca_fast::attention_bwd`` (fake implementations + autograd, so ``torch.compile(fullgraph=True)``
traces through) -> the provider ``prototype_attention`` named in ``rca_fast.ops._dispatch``.

Numerics: fp16/bf16 inputs are multiplied on tensor cores with fp32 accumulation and an fp32
softmax; fp32 inputs use IEEE fp32 dots unless ``torch.backends.cuda.matmul.allow_tf32`` is set (the
same switch that lets ``torch.matmul``, hence the reference, use TF32); fp64 inputs compute in fp64
(the dispatcher sends them here only in the interpreter; on a GPU they go to ``rca_fast.ref``).
exp / log / the final division are the full-accuracy ones of ``precise_math.py``.  Configs: one per
shape and dtype by a fixed rule (``fwd_launch_blocks``; ``launch_rule.py``), autotuned only under
RCA_FAST_AUTOTUNE=1.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..launch_rule import LaunchPlan, as_config, block_config, dtype_label, interpreting, launch
from ..precise_math import div_precise, exp_precise, log_precise
from .backward import attention_backward
from .tiles import (TUNE_KEY, acc_dtype, cast_rne, clamp_configs, contract_rows, dot_acc, fixed_launch,
                    kernel_meta, precision_family, scale_scores, split_scale)

# Fixed small blocks for the interpreter: several D chunks, Dv tiles and P blocks already at the
# test shapes (D=60, P=37), so every masking and looping path runs on the CPU.
INTERPRET_FWD_BLOCKS = dict(BLOCK_M=16, BLOCK_P=16, BLOCK_D=16, BLOCK_DV=16)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
# M (rows: batch x pixels) and P only bound masks: not specialised on (divisible by 16 / equal to
# 1), so one binary serves every batch size and prototype count
@triton.jit(do_not_specialize=["M", "P"])
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, M, P, D, DV, scale_hi, scale_lo,
                     ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr):
    """out[rows, dv tile] = softmax_j(scale * q[rows] . k[j]) @ v[:, dv tile]; lse[rows].

    A 1-D grid, the Dv tile varying fastest, so the programs of one row block run side by side
    and their repeated reads of that block of q hit in L2."""
    n_dv_tiles = tl.cdiv(DV, BLOCK_DV)
    pid = tl.program_id(0)
    pid_m = pid // n_dv_tiles
    pid_dv = pid % n_dv_tiles
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    col_ok = cols < DV

    row_max = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    row_sum = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC_DTYPE)
    for p0 in range(0, P, BLOCK_P):
        keys = p0 + tl.arange(0, BLOCK_P)
        key_ok = keys < P
        keys64 = keys.to(tl.int64)
        s = contract_rows(q_ptr, rows64 * D, row_ok, k_ptr, keys64 * D, key_ok, D,
                          BLOCK_M, BLOCK_P, BLOCK_D, ACC_DTYPE, PRECISION, INTERP_BF16)
        s = tl.where(key_ok[None, :], scale_scores(s, scale_hi, scale_lo), float("-inf"))
        # Every P block holds at least one real key (P >= 1), so new_max is finite and the
        # first rescale is exp(-inf) = 0: no NaN even for padded rows (q = 0, s = 0).
        new_max = tl.maximum(row_max, tl.max(s, 1))
        rescale = exp_precise(row_max - new_max)
        probs = exp_precise(s - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        v = tl.load(v_ptr + keys64[:, None] * DV + cols[None, :],
                    mask=key_ok[:, None] & col_ok[None, :], other=0.0)
        acc = dot_acc(
            cast_rne(probs, v.dtype, INTERP_BF16), v, acc * rescale[:, None], PRECISION, INTERP_BF16
        )
        row_max = new_max

    out = div_precise(acc, row_sum[:, None])  # correctly rounded (see precise_math.py)
    tl.store(
        out_ptr + rows64[:, None] * DV + cols[None, :],
        cast_rne(out, out_ptr.dtype.element_ty, INTERP_BF16),
        mask=row_ok[:, None] & col_ok[None, :],
    )
    if pid_dv == 0:
        tl.store(lse_ptr + rows, row_max + log_precise(row_sum), mask=row_ok)


def _cfg(m, p, d, dv, warps, stages):
    return block_config(warps, stages, BLOCK_M=m, BLOCK_P=p, BLOCK_D=d, BLOCK_DV=dv)


# Launchable configs per precision mode, each checked by the sm_90a compile check (no spills, shared
# memory within the limit, D = Dv = 512, P = 200).  The FIRST entry is the fixed rule's choice (its
# blocks clamped to the shapes by ``clamp_configs``); RCA_FAST_AUTOTUNE=1 times them all.
#   "16bit": bf16/fp16 on tensor cores.  Narrow Dv tiles recompute the scores per tile; a P block
#            of 256 takes RCA's P = 200 in one step.  The first is 8 warps (4 warps needed 239-254
#            registers: too close to the limit to be the default); the whole Dv (<= 512) in one
#            accumulator spilled 152 B (with the precise exp) and is gone.
#   "fp32":  IEEE fp32 dots are FMA loops holding both operand tiles in registers: every config of
#            the 16-bit list spilled (12-5,180 B), and so did 64x32 tiles at 4 warps (24 B): 32-row
#            blocks at 8 warps (208 and 248 registers, sm_90a, Triton 3.8).
FWD_CONFIGS = {
    "16bit": [_cfg(64, 64, 64, 128, 8, 2), _cfg(64, 64, 64, 128, 4, 2), _cfg(64, 256, 64, 128, 8, 2)],
    "fp32": [_cfg(32, 32, 32, 64, 8, 2), _cfg(32, 64, 32, 64, 8, 2)],
}
FWD_CAPS = {"BLOCK_DV": "DV", "BLOCK_D": "D", "BLOCK_P": "P"}


def fwd_launch_blocks(dtype: torch.dtype, P: int, D: int, DV: int) -> dict:
    """The fixed rule: the family's first config, its blocks clamped to the shapes."""
    return fixed_launch(FWD_CONFIGS[precision_family(dtype)][0], dict(P=P, D=D, DV=DV), FWD_CAPS)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      blocks: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """q (M, D), k (P, D), v (P, Dv) -> (out (M, Dv) in q's dtype, lse (M,) in the accumulation
    dtype).  ``blocks`` fixes the block sizes (tests); otherwise the interpreter uses
    INTERPRET_FWD_BLOCKS and a GPU the fixed rule ``fwd_launch_blocks`` (the autotuner under
    RCA_FAST_AUTOTUNE=1)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    M, D = q.shape
    P, DV = v.shape
    out = torch.empty((M, DV), dtype=q.dtype, device=q.device)
    if M == 0 or DV == 0:    # nothing to compute; the backward does not read lse then
        return out, torch.zeros((M,), dtype=acc_dtype(q.dtype), device=q.device)
    lse = torch.empty((M,), dtype=acc_dtype(q.dtype), device=q.device)
    hi, lo = split_scale(scale)
    candidates = ()
    if blocks is not None:
        fixed = as_config(blocks)
    elif interpreting(q.device):
        fixed = triton.Config(INTERPRET_FWD_BLOCKS)
    else:
        candidates = clamp_configs(FWD_CONFIGS[precision_family(q.dtype)], dict(P=P, D=D, DV=DV), FWD_CAPS)
        fixed = candidates[0]
    launch(
        LaunchPlan(
            "attn_fwd",
            _attn_fwd_kernel,
            lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(DV, m["BLOCK_DV"]),),
            (q, k, v, out, lse, M, P, D, DV, hi, lo),
            kernel_meta(q.dtype, q.device),
            fixed,
            q.device,
            dtype_label(q),
            candidates,
            TUNE_KEY,
        )
    )
    return out, lse


# ----------------------------------------------------------------------------------------------
# torch.library registration, autograd, provider
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("rca_fast::attention_fwd", mutates_args=())
def attention_fwd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """query (M, D), key (P, D), value (P, Dv) -> (out (M, Dv), lse (M,) fp32/fp64)."""
    return attention_forward(query, key, value, scale)


@attention_fwd.register_fake
def _attention_fwd_fake(query, key, value, scale):
    return (query.new_empty((query.shape[0], value.shape[1])),
            query.new_empty((query.shape[0],), dtype=acc_dtype(query.dtype)))


@torch.library.custom_op("rca_fast::attention_bwd", mutates_args=())
def attention_bwd(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq (M, D), dk (P, D), dv (P, Dv)) of attention_fwd's out."""
    return attention_backward(grad_out, query, key, value, out, lse, scale)


@attention_bwd.register_fake
def _attention_bwd_fake(grad_out, query, key, value, out, lse, scale):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output):
    query, key, value, scale = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse)
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse):
    # lse is an internal by-product (the provider never returns it), so grad_lse is ignored.
    query, key, value, out, lse = ctx.saved_tensors
    if grad_out is None:
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value), None
    dq, dk, dv = attention_bwd(grad_out, query, key, value, out, lse, ctx.scale)
    return dq, dk, dv, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def prototype_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                        scale: Optional[float] = None) -> torch.Tensor:
    """Provider of ``rca_fast.ops.prototype_attention`` (arguments already validated).

    query (B, N, D), key (P, D), value (P, Dv) -> (B, N, Dv) in the inputs' dtype; differentiable
    w.r.t. all three.  ``scale`` defaults to 1/sqrt(D).  Runs the kernels in every dtype it is
    handed, float64 included (``rca_fast.ops`` sends float64 here only in the interpreter: fp64
    tiles spill or exceed shared memory on sm_90)."""
    B, N, D = query.shape
    scale = D ** -0.5 if scale is None else float(scale)
    out, _ = attention_fwd(query.reshape(B * N, D), key, value, scale)
    return out.view(B, N, value.shape[1])
