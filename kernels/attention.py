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

Backward (``kernels/attention_bwd.py``), three launches:
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
same switch that lets ``torch.matmul``, hence the reference, use TF32); fp64 inputs compute in fp64.
"""
import contextlib
import functools
import os
import struct
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Fixed small blocks for the interpreter: several D chunks, Dv tiles and P blocks already at the
# test shapes (D=60, P=37), so every masking and looping path runs on the CPU.
INTERPRET_FWD_BLOCKS = dict(BLOCK_M=16, BLOCK_P=16, BLOCK_D=16, BLOCK_DV=16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / softmax dtype for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 products unless torch itself is allowed TF32 for fp32 matmuls (then the reference
    is TF32 too); the setting only matters for fp32 operands."""
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def split_scale(scale: float) -> Tuple[float, float]:
    """``scale`` as hi + lo, two float32 numbers (Triton passes Python floats as fp32): fp64 inputs
    keep a full-precision scale through ``s * hi + s * lo``; for the others lo is a rounding-level
    correction."""
    hi = struct.unpack("f", struct.pack("f", scale))[0]
    lo = struct.unpack("f", struct.pack("f", scale - hi))[0]
    return hi, lo


def kernel_meta(dtype: torch.dtype) -> dict:
    """The dtype-dependent constexprs every kernel here takes."""
    return dict(ACC_DTYPE=tl_acc_dtype(dtype), PRECISION=dot_precision(dtype),
                INTERP_BF16=INTERPRET and dtype == torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (32 for the interpreter: several row splits already
    at the small test shapes)."""
    if device.type == "cuda" and not INTERPRET:
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 32


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one (no-op on CPU)."""
    if device.type == "cuda" and not INTERPRET:
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# Below this many rows the first config of a list (clamped to the shape) is launched directly:
# autotuning would cost more compile and benchmark time than it could save.
AUTOTUNE_MIN_ROWS = 4096


def fixed_launch(config, sizes: Dict[str, int], caps: Dict[str, str]) -> dict:
    """``config``'s blocks clamped like ``clamp_configs`` does, with its num_warps / num_stages."""
    cfg = clamp_configs([config], sizes, caps)[0]
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def clamp_configs(configs, named_args, caps: Dict[str, str]):
    """Autotune pruning: shrink each config's blocks named in ``caps`` (block -> size argument) to
    the padded size they tile, and drop the duplicates this makes (a 512-wide Dv tile for Dv=44
    would only compute padding)."""
    seen, kept = set(), []
    for cfg in configs:
        kwargs = dict(cfg.kwargs)
        for block, size_arg in caps.items():
            kwargs[block] = min(kwargs[block], max(16, triton.next_power_of_2(int(named_args[size_arg]))))
        sig = (tuple(sorted(kwargs.items())), cfg.num_warps, cfg.num_stages)
        if sig not in seen:
            seen.add(sig)
            kept.append(triton.Config(kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return kept


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def dot_acc(a, b, acc, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    """``acc + a @ b``.  INTERP_BF16 (interpreter with bf16 inputs only): Triton's interpreter
    multiplies bf16 tiles as their raw uint16 bits, so they are widened to fp32 first (exact)."""
    if INTERP_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def cast_rne(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """``x.to(dtype)`` rounding to nearest even, as compiled Triton does.  INTERP_BF16: the
    interpreter truncates fp32 -> bf16 instead, so the rounding is done on the fp32 bits first
    (the conversion is then exact); without it the interpreted bf16 error would double."""
    if INTERP_BF16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def scale_scores(s, scale_hi, scale_lo):
    return s * scale_hi + s * scale_lo


@triton.jit
def contract_rows(a_ptr, a_row_off, a_row_ok, b_ptr, b_row_off, b_row_ok, K,
                  BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                  ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    """``sum_k a[i, k] * b[j, k]`` -> [BLOCK_A, BLOCK_B] in ACC_DTYPE, for a block of rows i of a and
    rows j of b (row-major, k contiguous; ``*_row_off`` are element offsets of the rows).  K is
    walked in BLOCK_K chunks so its size is bounded by nothing; padded rows and columns load 0."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + a_row_off[:, None] + ks[None, :],
                    mask=a_row_ok[:, None] & k_ok[None, :], other=0.0)
        b_t = tl.load(b_ptr + b_row_off[None, :] + ks[:, None],
                      mask=b_row_ok[None, :] & k_ok[:, None], other=0.0)
        acc = dot_acc(a, b_t, acc, PRECISION, INTERP_BF16)
    return acc


@triton.jit
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
        rescale = tl.exp(row_max - new_max)
        probs = tl.exp(s - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        v = tl.load(v_ptr + keys64[:, None] * DV + cols[None, :],
                    mask=key_ok[:, None] & col_ok[None, :], other=0.0)
        acc = dot_acc(cast_rne(probs, v.dtype, INTERP_BF16), v, acc * rescale[:, None], PRECISION, INTERP_BF16)
        row_max = new_max

    out = acc / row_sum[:, None]
    tl.store(out_ptr + rows64[:, None] * DV + cols[None, :], cast_rne(out, out_ptr.dtype.element_ty, INTERP_BF16),
             mask=row_ok[:, None] & col_ok[None, :])
    if pid_dv == 0:
        tl.store(lse_ptr + rows, row_max + tl.log(row_sum), mask=row_ok)


_FWD_CONFIGS = [
    # Narrow Dv tiles: small accumulators, scores recomputed per Dv tile; a P block of 256 takes
    # RCA's P = 200 in one step (q read once per program).
    triton.Config(dict(BLOCK_M=64, BLOCK_P=64, BLOCK_D=64, BLOCK_DV=128), num_warps=4, num_stages=2),
    triton.Config(dict(BLOCK_M=64, BLOCK_P=128, BLOCK_D=64, BLOCK_DV=128), num_warps=8, num_stages=2),
    triton.Config(dict(BLOCK_M=64, BLOCK_P=256, BLOCK_D=64, BLOCK_DV=128), num_warps=8, num_stages=2),
    triton.Config(dict(BLOCK_M=128, BLOCK_P=128, BLOCK_D=64, BLOCK_DV=128), num_warps=8, num_stages=2),
    triton.Config(dict(BLOCK_M=64, BLOCK_P=64, BLOCK_D=64, BLOCK_DV=256), num_warps=8, num_stages=2),
    # The whole Dv (<= 512) in one accumulator: no recompute, 128 fp32 registers per thread.
    triton.Config(dict(BLOCK_M=64, BLOCK_P=32, BLOCK_D=64, BLOCK_DV=512), num_warps=8, num_stages=1),
    triton.Config(dict(BLOCK_M=64, BLOCK_P=64, BLOCK_D=64, BLOCK_DV=512), num_warps=8, num_stages=1),
]
# (ptxas for sm_90a, bf16, D = Dv = 512: 174-252 registers a thread and no spills for every config.)

_FWD_CAPS = {"BLOCK_DV": "DV", "BLOCK_D": "D", "BLOCK_P": "P"}
_attn_fwd_tuned = triton.autotune(
    configs=_FWD_CONFIGS, key=["P", "D", "DV", "PRECISION"],
    prune_configs_by={"early_config_prune":
                      lambda configs, named_args, **kw: clamp_configs(configs, named_args, _FWD_CAPS)},
)(_attn_fwd_kernel)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      blocks: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """q (M, D), k (P, D), v (P, Dv) -> (out (M, Dv) in q's dtype, lse (M,) in the accumulation
    dtype).  ``blocks`` fixes the block sizes (tests); otherwise the interpreter uses
    INTERPRET_FWD_BLOCKS and a GPU the autotuner (its first config below AUTOTUNE_MIN_ROWS rows)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    M, D = q.shape
    P, DV = v.shape
    out = torch.empty((M, DV), dtype=q.dtype, device=q.device)
    if M == 0 or DV == 0:    # nothing to compute; the backward does not read lse then
        return out, torch.zeros((M,), dtype=acc_dtype(q.dtype), device=q.device)
    lse = torch.empty((M,), dtype=acc_dtype(q.dtype), device=q.device)
    hi, lo = split_scale(scale)
    args = (q, k, v, out, lse, M, P, D, DV, hi, lo)
    meta = kernel_meta(q.dtype)
    if blocks is None and (INTERPRET or q.device.type != "cuda"):
        blocks = INTERPRET_FWD_BLOCKS
    elif blocks is None and M < AUTOTUNE_MIN_ROWS:
        blocks = fixed_launch(_FWD_CONFIGS[0], dict(P=P, D=D, DV=DV), _FWD_CAPS)
    with on_device(q.device):
        if blocks is not None:
            grid = (triton.cdiv(M, blocks["BLOCK_M"]) * triton.cdiv(DV, blocks["BLOCK_DV"]),)
            _attn_fwd_kernel[grid](*args, **meta, **blocks)
        else:
            def grid(cfg):
                return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(DV, cfg["BLOCK_DV"]),)
            _attn_fwd_tuned[grid](*args, **meta)
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
    from .attention_bwd import attention_backward  # imported here: it imports this module's helpers
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
    w.r.t. all three.  ``scale`` defaults to 1/sqrt(D)."""
    B, N, D = query.shape
    scale = D ** -0.5 if scale is None else float(scale)
    out, _ = attention_fwd(query.reshape(B * N, D), key, value, scale)
    return out.view(B, N, value.shape[1])
