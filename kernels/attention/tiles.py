"""Helpers shared by the prototype-attention forward (``forward.py``) and backward
(``backward.py``) kernels: dtype and precision choices, the scale split, device helpers, config
clamping, and the @triton.jit tile functions (dot, rounding cast, chunked row contraction).

This is their one home (as ``kernels/nce/tiles.py`` is for the NCE kernels): the two kernel files import
from here and not from each other.
"""
import struct
from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

from ..launch_rule import interpreting, launch_options

TUNE_KEY = ["P", "D", "DV", "PRECISION"]     # the autotuner's key (RCA_FAST_AUTOTUNE=1)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / softmax dtype for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def precision_family(dtype: torch.dtype) -> str:
    """The config list of an input dtype: "16bit" (bf16/fp16 operands, tensor-core dots) or "fp32"
    (IEEE fp32 dots need smaller tiles; fp64 never reaches a compiled kernel, only the interpreter)."""
    return "16bit" if dtype in (torch.float16, torch.bfloat16) else "fp32"


def tl_acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """IEEE fp32 products unless torch itself is allowed TF32 for fp32 matmuls (then the reference
    is TF32 too); the setting only matters for fp32 operands."""
    if dtype == torch.float32 and not interpreting(device) and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def split_scale(scale: float) -> Tuple[float, float]:
    """``scale`` as hi + lo, two float32 numbers (Triton passes Python floats as fp32): fp64 inputs
    keep a full-precision scale through ``s * hi + s * lo``; for the others lo is a rounding-level
    correction."""
    hi = struct.unpack("f", struct.pack("f", scale))[0]
    lo = struct.unpack("f", struct.pack("f", scale - hi))[0]
    return hi, lo


def kernel_meta(dtype: torch.dtype, device: torch.device) -> dict:
    """The dtype-dependent constexprs every kernel here takes."""
    return dict(ACC_DTYPE=tl_acc_dtype(dtype), PRECISION=dot_precision(dtype, device),
                INTERP_BF16=interpreting(device) and dtype == torch.bfloat16)


def fixed_launch(config, sizes: Dict[str, int], caps: Dict[str, str]) -> dict:
    """``config``'s blocks clamped like ``clamp_configs`` does, with its num_warps / num_stages."""
    cfg = clamp_configs([config], sizes, caps)[0]
    return dict(cfg.kwargs, **launch_options(cfg))


def clamp_configs(configs, named_args, caps: Dict[str, str]):
    """Shrink each config's blocks named in ``caps`` (block -> size argument) to
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
            kept.append(triton.Config(kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                      maxnreg=cfg.maxnreg))
    return kept


@triton.jit
def dot_acc(a, b, acc, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    """``acc + a @ b``.  INTERP_BF16 (interpreter with bf16 inputs only): Triton's interpreter
    multiplies bf16 tiles as their raw uint16 bits, so they are widened to fp32 first (exact).
    ``out_dtype`` is the accumulator's: Triton 3.8 infers it from ``acc``, 3.6 assumes fp32 and
    rejects the interpreter's fp64 accumulator."""
    if INTERP_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


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
