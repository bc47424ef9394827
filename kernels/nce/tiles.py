"""Tile helpers shared by the bank-NCE forward (``forward.py``) and backward (``backward.py``) kernels.

The similarity of a block of query rows with a block of bank slots of one class,
``s[n, i] = <q_n, m_i> / (max(|q_n|, eps) * max(|m_i|, eps) * tau)``, is computed from the RAW
operands with ``tl.dot`` over chunks of D and normalised afterwards by the two inverse norms: the
slots' squared norms are summed from the same tiles the dot reads, so no normalised copy of the
bank (and no pre-pass over it) is ever made.

How a dot is computed depends on the operand dtypes (``MODE``), always accumulating in fp32:

* ``DOT_NATIVE``: both operands are the same 16-bit dtype: one tensor-core dot (products exact).
* ``DOT_SPLIT_BF16``: the left operand is fp32/fp16 and the right one bf16 (a bf16 bank): the left
  operand is split into bf16 parts ``a1 = bf16(a)``, ``a2 = bf16(a - a1)``, ``a3 = bf16(a - a1 - a2)``
  and the bf16 dots of the parts are summed: three parts hold all 24 bits of an fp32 mantissa (two
  hold an fp16 one: ``DOT_SPLIT2_BF16``), which keeps an fp32 query against a bf16 bank as exact as the
  fp32 reference at 3x the tensor-core work of ``DOT_NATIVE``.  Fewer parts are not enough: the
  similarities are divided by tau, and two parts (~2^-17) already put 3e-5 errors in the loss.
* ``DOT_F32X3``: anything with an fp32 bank, or an fp16 bank with a non-fp16 left operand: fp32
  operands with ``input_precision="tf32x3"`` (three tf32 dots, ~fp32 accuracy).

The Triton interpreter multiplies the raw uint16 bit patterns of bf16 tiles in ``tl.dot``
(Triton 3.8), so under ``INTERPRET`` the operands are upcast to fp32 first; the splitting and the
casts are still exercised there.  The interpreter also re-patches ``triton.language`` on every
nested @jit call (~1 ms), so helpers called inside the tile loops are few and flat.
"""
import torch
import triton
import triton.language as tl

NORM_EPS = 1e-12  # the norm floor of F.normalize: a zero vector has similarity 0, never NaN
_EPS = tl.constexpr(NORM_EPS)  # the same, visible inside @triton.jit functions

DOT_NATIVE = 0
DOT_SPLIT_BF16 = 1
DOT_F32X3 = 2
DOT_SPLIT2_BF16 = 3  # DOT_SPLIT_BF16 for an fp16 left operand: two parts are exact


@triton.jit
def dot_acc(a, b, acc, MODE: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b in fp32, with the precision scheme ``MODE`` (a: [M, K], b: [K, N]).

    Written without nested @jit calls: each one costs the interpreter a full re-patch of tl.
    """
    if MODE == 2:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    else:
        b16 = b
        if INTERPRET:  # see the module note: the interpreter cannot multiply bf16 tiles
            b16 = b.to(tl.float32)
        if MODE == 0:
            a16 = a
            if INTERPRET:
                a16 = a.to(tl.float32)
            acc = tl.dot(a16, b16, acc)
        else:  # MODE 1 (three bf16 parts) or 3 (two: an fp16 operand is exact in two)
            rest = a.to(tl.float32)
            for _ in tl.static_range(3 if MODE == 1 else 2):
                part = rest.to(tl.bfloat16)
                rest = rest - part.to(tl.float32)
                if INTERPRET:
                    part = part.to(tl.float32)
                acc = tl.dot(part, b16, acc)
    return acc


@triton.jit
def row_inv_norms(q_ptr, stride_qn, stride_qd, rows, row_ok, D,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """1 / max(|q_n|, eps) of the rows ``rows`` ([BLOCK_N] fp32; masked rows give 1/eps)."""
    offs_d = tl.arange(0, BLOCK_D)
    sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        q = tl.load(q_ptr + rows[:, None] * stride_qn + d[None, :] * stride_qd,
                    mask=row_ok[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
        sq += tl.sum(q * q, axis=1)
    # correctly rounded sqrt and division (see precise_math.py: the compiled defaults are approximate)
    return tl.div_rn(tl.full([BLOCK_N], 1.0, tl.float32), tl.maximum(tl.sqrt_rn(sq), _EPS))


@triton.jit
def sim_tile(q_ptr, stride_qn, stride_qd, rows, row_ok, inv_q,
             m_ptr, stride_ms, stride_md, slots, slot_ok, D, scale,
             BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
             MODE: tl.constexpr, INTERPRET: tl.constexpr):
    """Scaled cosine similarities of a row block with a slot block of one class.

    ``m_ptr`` points at the class's first slot; ``slots`` are slot indices inside the class.
    Returns ``s`` [BLOCK_N, BLOCK_S] fp32 (= cos / tau; masked entries are 0) and the slots'
    inverse norms [BLOCK_S].  The dot runs on [BLOCK_N, BLOCK_D] x [BLOCK_D, BLOCK_S] tiles.
    """
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_N, BLOCK_S], dtype=tl.float32)
    sq = tl.zeros([BLOCK_S], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_ok = d < D
        q = tl.load(q_ptr + rows[:, None] * stride_qn + d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m = tl.load(m_ptr + slots[:, None] * stride_ms + d[None, :] * stride_md,
                    mask=slot_ok[:, None] & d_ok[None, :], other=0.0)          # [BLOCK_S, BLOCK_D]
        m32 = m.to(tl.float32)
        sq += tl.sum(m32 * m32, axis=1)
        acc = dot_acc(q, tl.trans(m), acc, MODE, INTERPRET)
    inv_m = tl.div_rn(tl.full([BLOCK_S], 1.0, tl.float32), tl.maximum(tl.sqrt_rn(sq), _EPS))
    s = acc * (inv_q * scale)[:, None] * inv_m[None, :]
    return s, inv_m


# ------------------------------------------------------------------------ launcher-side helpers
S_GRANULE_GPU = 128       # slot chunks are multiples of the largest BLOCK_S of the GPU configs
S_GRANULE_INTERPRET = 16  # ... and of the interpreter's fixed BLOCK_S


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dot_mode(left: torch.dtype, bank: torch.dtype) -> int:
    """The precision scheme of ``dot_acc`` for a left operand of dtype ``left`` against the bank."""
    if bank in (torch.bfloat16, torch.float16) and left == bank:
        return DOT_NATIVE
    if bank == torch.bfloat16:
        return DOT_SPLIT2_BF16 if left == torch.float16 else DOT_SPLIT_BF16
    return DOT_F32X3


def split_units(S: int, L: int, outer: int, target: int, granule: int):
    """(s_chunk, n_chunks): cut each class's S slots into chunks (multiples of ``granule``) so that
    ``outer * L * n_chunks`` programs reach ``target``; one chunk per class when L alone does."""
    n_chunks = 1
    if outer * L < target:
        n_chunks = max(1, min(cdiv(target, outer * L), cdiv(S, granule)))
    s_chunk = cdiv(cdiv(S, n_chunks), granule) * granule
    return s_chunk, cdiv(S, s_chunk)


def check_int32_offsets(op: str, **extents: int) -> None:
    """The NCE kernels index their buffers with int32 offsets (cheaper in registers than int64 ones);
    raise a ValueError naming the extent before one of them could wrap (2**31 elements)."""
    for name, extent in extents.items():
        if extent >= 2 ** 31:
            raise ValueError(f"{op}: the Triton NCE kernels index with int32 offsets, but {name} = {extent} "
                             f"elements reaches 2**31; use the torch backend (RCA_FAST_BACKEND=torch) "
                             f"or fewer rows per call")

