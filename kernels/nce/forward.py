"""Bank NCE with region mixup (eq. 4 against the whole memory bank) as fused Triton kernels.

Math (``rca_fast.ref.nce``): for a row q of class c, with s_li = cos(q, m_li) / tau,

    NCE(q, c) = mean_j softplus(G_c - s_cj),    G_c = logsumexp_{l != c, i} s_li,

and with mixup a row's loss is ``w * NCE(q, t) + (1 - w) * NCE(q, mt)``.

Forward, flash-style, never writing the N x (L*S) similarities:
  1. ``_nce_lse_kernel``: one program per (block of BLOCK_N rows, "unit" = one class's chunk of
     at most S_CHUNK slots).  It streams the unit's slots in [BLOCK_S, BLOCK_D] tiles, normalises
     rows and slots on the fly (``tiles.sim_tile``), keeps the running max / sum of exp of
     s over the unit, and writes one logsumexp per (row, unit): an N x (L * chunks) buffer.  The
     similarities of a row with the slots of ITS target (and mix target) class are written as
     well (N x S floats each): that is the "second pass over the positive slots", done for free
     while the tile is in registers instead of re-reading S x D slots per row.
  2. ``_nce_row_kernel``: one program per row: class logsumexps from the unit parts, G_t and G_mt
     as logsumexps over the classes != t (resp. mt) -- computed directly, never as a difference of
     exponentials, so they stay exact when the positive class dominates -- then the mean of
     softplus(G - s) over the positive slots, the mixup sum, and the per-row statistics the
     backward needs (G_t, A_t, G_mt, A_mt with A_c = mean_j sigmoid(G_c - s_cj)).
Backward (``backward.py``) recomputes the tiles.  Extra device memory: N*(L*chunks + S (+ S))
floats, a few MB at N = 512, L = S = 1000.

Layering: kernels -> launchers (``forward``; ``backward.backward``) -> torch.library custom ops
``rca_fast::nce_fwd`` / ``rca_fast::nce_bwd`` (fake implementations, autograd) -> the provider
``bank_nce_loss`` (signature of ``rca_fast.ref.nce.bank_nce_loss``).  No float64 path (Triton's
fp64 dot is not used here): ``rca_fast.ops`` routes float64 inputs to the reference.
"""
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from ..launch_rule import (MAXNREG, LaunchPlan, block_config, dtype_label, interpreting, launch,
                           launch_options, sm_count)
from ..precise_math import exp_precise, log_precise
from .backward import backward
from .tiles import (DOT_NATIVE, DOT_SPLIT2_BF16, DOT_SPLIT_BF16, S_GRANULE_GPU, S_GRANULE_INTERPRET, cdiv,
                    check_int32_offsets, dot_mode, row_inv_norms, sim_tile, split_units)


# ----------------------------------------------------------------------------------------- kernels
# Grid bookkeeping and the row count (it changes every training step) are not specialised on
# (divisible by 16 / equal to 1): one binary for every N, and fewer compiles.
@triton.jit(do_not_specialize=["N", "S", "n_row_blocks", "n_chunks", "n_units"])
def _nce_lse_kernel(q_ptr, m_ptr, t_ptr, mt_ptr, lse_ptr, pos_t_ptr, pos_m_ptr,
                    N, S, D, n_row_blocks, n_chunks, n_units, S_CHUNK, scale,
                    stride_qn, stride_qd, stride_ml, stride_ms, stride_md,
                    HAS_MIX: tl.constexpr, MODE: tl.constexpr, INTERPRET: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """lse[n, unit] = logsumexp of s over the unit's slots; positives' s into pos_t / pos_m."""
    pid = tl.program_id(0)
    row_block = pid % n_row_blocks          # row blocks vary fastest: programs that run together
    unit = pid // n_row_blocks              # share the unit's bank tiles in L2
    cls = unit // n_chunks
    chunk = unit % n_chunks
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    inv_q = row_inv_norms(q_ptr, stride_qn, stride_qd, rows, row_ok, D, BLOCK_N, BLOCK_D)

    is_t = (tl.load(t_ptr + rows, mask=row_ok, other=-1) == cls) & row_ok
    any_t = tl.max(is_t.to(tl.int32), axis=0) > 0
    if HAS_MIX:
        is_m = (tl.load(mt_ptr + rows, mask=row_ok, other=-1) == cls) & row_ok
        any_m = tl.max(is_m.to(tl.int32), axis=0) > 0

    m_base = m_ptr + cls.to(tl.int64) * stride_ml
    s_lo = chunk * S_CHUNK
    s_hi = tl.minimum(s_lo + S_CHUNK, S)
    run_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    offs_s = tl.arange(0, BLOCK_S)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        slots = s0 + offs_s
        slot_ok = slots < s_hi
        s, inv_m = sim_tile(q_ptr, stride_qn, stride_qd, rows, row_ok, inv_q,
                            m_base, stride_ms, stride_md, slots, slot_ok, D, scale,
                            BLOCK_N, BLOCK_S, BLOCK_D, MODE, INTERPRET)
        s_valid = tl.where(slot_ok[None, :], s, float("-inf"))
        # every tile holds >= 1 valid slot, so new_max is finite and exp(-inf - new_max) = 0
        new_max = tl.maximum(run_max, tl.max(s_valid, axis=1))
        run_sum = (run_sum * exp_precise(run_max - new_max)
                   + tl.sum(exp_precise(s_valid - new_max[:, None]), axis=1))
        run_max = new_max
        pos_off = rows[:, None] * S + slots[None, :]
        if any_t:
            tl.store(pos_t_ptr + pos_off, s, mask=is_t[:, None] & slot_ok[None, :])
        if HAS_MIX:
            if any_m:
                tl.store(pos_m_ptr + pos_off, s, mask=is_m[:, None] & slot_ok[None, :])
    tl.store(lse_ptr + rows * n_units + unit, run_max + log_precise(run_sum), mask=row_ok)


@triton.jit
def _neg_lse_update(run_max, run_sum, vals):
    """Online logsumexp over chunks; ``vals`` may be all -inf (no NaN: the shift is then 0)."""
    new_max = tl.maximum(run_max, tl.max(vals, axis=0))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    run_sum = run_sum * exp_precise(run_max - shift) + tl.sum(exp_precise(vals - shift), axis=0)
    return new_max, run_sum


@triton.jit
def _finish_lse(run_max, run_sum):
    """run_max + log(run_sum); -inf (not a log(0) of an empty set) when there was nothing."""
    empty = run_max == float("-inf")
    return tl.where(empty, float("-inf"), run_max + log_precise(tl.where(empty, 1.0, run_sum)))


@triton.jit
def _positive_terms(pos_ptr, n, S, g, BLOCK_P: tl.constexpr):
    """(mean_j softplus(g - s_j), mean_j sigmoid(g - s_j)) over the row's S positive slots."""
    offs = tl.arange(0, BLOCK_P)
    acc_sp = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc_sg = tl.zeros([BLOCK_P], dtype=tl.float32)
    for j0 in range(0, S, BLOCK_P):
        j = j0 + offs
        ok = j < S
        s = tl.load(pos_ptr + n * S + j, mask=ok, other=0.0)
        x = tl.where(ok, g - s, float("-inf"))       # -inf contributes 0 to both sums
        # softplus(x) = log(1 + e^x) without overflow, accurate for very negative x: Goldberg's
        # log1p(y) = log(u) * y / (u - 1) with u = 1 + y (u - 1 is exact), = y when u == 1
        y = exp_precise(-tl.abs(x))
        u = 1.0 + y
        log1p_y = tl.where(u == 1.0, y, log_precise(u) * tl.div_rn(y, tl.where(u == 1.0, 1.0, u - 1.0)))
        acc_sp += tl.maximum(x, 0.0) + log1p_y
        # sigmoid, 0 below -80 (where it is < 2e-35) so that exp never overflows to inf
        acc_sg += tl.where(x < -80.0, 0.0, tl.div_rn(tl.full([BLOCK_P], 1.0, tl.float32),
                                                    1.0 + exp_precise(-tl.maximum(x, -80.0))))
    s_count = tl.zeros([], dtype=tl.float32) + S   # (S may be a constexpr 1: no .to on it)
    return tl.div_rn(tl.sum(acc_sp, axis=0), s_count), tl.div_rn(tl.sum(acc_sg, axis=0), s_count)


@triton.jit(do_not_specialize=["L", "n_chunks"])
def _nce_row_kernel(lse_ptr, pos_t_ptr, pos_m_ptr, t_ptr, mt_ptr, w_ptr, loss_ptr, stats_ptr,
                    L, S, n_chunks, HAS_MIX: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Per row: G_t, G_mt (logsumexp over the other classes), NCE terms, mixup sum, statistics."""
    n = tl.program_id(0).to(tl.int64)
    tgt = tl.load(t_ptr + n)
    mix = tgt
    if HAS_MIX:
        mix = tl.load(mt_ptr + n)
    n_units = L * n_chunks
    offs_l = tl.arange(0, BLOCK_L)
    offs_c = tl.arange(0, BLOCK_C)
    max_t = tl.full([], float("-inf"), dtype=tl.float32)
    sum_t = tl.zeros([], dtype=tl.float32)
    max_m = tl.full([], float("-inf"), dtype=tl.float32)
    sum_m = tl.zeros([], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        cls = l0 + offs_l
        ok = cls < L
        parts = tl.load(lse_ptr + n * n_units + cls[:, None] * n_chunks + offs_c[None, :],
                        mask=ok[:, None] & (offs_c < n_chunks)[None, :], other=float("-inf"))
        pmax = tl.max(parts, axis=1)
        pshift = tl.where(pmax == float("-inf"), 0.0, pmax)
        class_lse = _finish_lse(pmax, tl.sum(exp_precise(parts - pshift[:, None]), axis=1))  # -inf if !ok
        max_t, sum_t = _neg_lse_update(max_t, sum_t, tl.where(cls != tgt, class_lse, float("-inf")))
        if HAS_MIX:
            max_m, sum_m = _neg_lse_update(max_m, sum_m, tl.where(cls != mix, class_lse, float("-inf")))
    # L == 1: no negatives, G = -inf, and every term below is exactly 0
    g_t = _finish_lse(max_t, sum_t)
    nce_t, a_t = _positive_terms(pos_t_ptr, n, S, g_t, BLOCK_P)
    loss = nce_t
    g_m = g_t
    a_m = a_t
    if HAS_MIX:
        g_m = _finish_lse(max_m, sum_m)
        nce_m, a_m = _positive_terms(pos_m_ptr, n, S, g_m, BLOCK_P)
        w = tl.load(w_ptr + n)
        loss = w * nce_t + (1.0 - w) * nce_m
    tl.store(loss_ptr + n, loss)
    tl.store(stats_ptr + n * 4 + 0, g_t)
    tl.store(stats_ptr + n * 4 + 1, a_t)
    tl.store(stats_ptr + n * 4 + 2, g_m)
    tl.store(stats_ptr + n * 4 + 3, a_m)


def _cfg(block_s, block_d, warps, stages):
    return block_config(warps, stages, BLOCK_S=block_s, BLOCK_D=block_d)


# Launchable configs of the forward tile kernel per dot scheme (``tiles.dot_acc``), each checked by
# the sm_90a compile check (no spills, shared memory within the limit; registers at BLOCK_N = 64,
# D = 512, Triton 3.8).  The FIRST entry is the fixed rule's choice; the others are what
# RCA_FAST_AUTOTUNE=1 times.  128-wide slot or D tiles spill whenever one side is fp32 (tf32x3 and the
# bf16 split hold 2-3 copies of each operand tile); with both sides 16-bit they fit.
LSE_CONFIGS = {
    "native": [_cfg(64, 64, 4, 3), _cfg(64, 128, 8, 2), _cfg(32, 64, 4, 2)],
    # split: (64, 64, 8, 2) needed 250-254 registers at BLOCK_N 32 (fp32 query): over the 240 of the
    # headroom rule as the fixed choice; (64, 32, 8, 3) needs 168-180 (sm_90a, Triton 3.8)
    "split": [_cfg(64, 32, 8, 3), _cfg(64, 64, 8, 2), _cfg(32, 32, 4, 2)],
    "f32x3": [_cfg(64, 32, 8, 3), _cfg(32, 32, 4, 2)],      # (32, 64, 8 warps) spilled 68 B at BLOCK_N 32
}
_INTERPRET_LSE_CONFIG = triton.Config(dict(BLOCK_S=16, BLOCK_D=32))  # small, smaller than the test sizes


def config_family(mode: int) -> str:
    """The config list of a dot scheme: both operands 16-bit, a bf16 bank against a wider query
    (split into bf16 parts), or tf32x3 (an fp32 / fp16 bank against another dtype)."""
    if mode == DOT_NATIVE:
        return "native"
    return "split" if mode in (DOT_SPLIT_BF16, DOT_SPLIT2_BF16) else "f32x3"


# the autotune key holds no N (it changes every step): BLOCK_N buckets it instead
LSE_TUNE_KEY = ["BLOCK_N", "D", "S", "MODE", "HAS_MIX"]


def lse_launch_config(mode: int) -> dict:
    """The fixed rule: the first config of the scheme's list, whatever the shapes (it is spill-free
    at every BLOCK_N; the slot chunking already adapts the grid to the shapes)."""
    cfg = LSE_CONFIGS[config_family(mode)][0]
    return dict(cfg.kwargs, **launch_options(cfg))


# --------------------------------------------------------------------------------------- launcher
def fwd_block_n(N: int, interpret: bool) -> int:
    """Rows per program.  The bank is re-read (mostly from L2) once per row block, so large N wants
    large blocks, but 128 rows spill registers on sm_90 (ptxas -v of the sm_90 build): 64 at most."""
    if interpret:
        return 16
    return 16 if N <= 16 else 32 if N <= 32 else 64


def row_kernel_blocks(L: int, n_chunks: int, interpret: bool) -> dict:
    """Blocks of ``_nce_row_kernel``: classes per step (the parts of BLOCK_L classes are one
    [BLOCK_L, BLOCK_C] tile of <= 4096 floats) and positive slots per step."""
    n_chunk_pad = triton.next_power_of_2(n_chunks)
    return dict(BLOCK_L=64 if interpret else max(16, min(triton.next_power_of_2(L), 4096 // n_chunk_pad)),
                BLOCK_C=n_chunk_pad, BLOCK_P=16 if interpret else 256)


def row_kernel_config(L: int, n_chunks: int, interpret: bool) -> triton.Config:
    """The one config of ``_nce_row_kernel`` (its blocks follow the shapes; 4 warps)."""
    return triton.Config(
        row_kernel_blocks(L, n_chunks, interpret), num_warps=4, num_stages=3, maxnreg=MAXNREG
    )


def forward(query: torch.Tensor, bank: torch.Tensor, target: torch.Tensor,
            mix_target: Optional[torch.Tensor], mix_weight: Optional[torch.Tensor],
            temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses (N,) fp32 and statistics (N, 4) fp32 = (G_t, A_t, G_mt, A_mt).

    query (N, D), bank (L, S, D) any strides; target / mix_target (N,) int64 contiguous;
    mix_weight (N,) fp32 contiguous or None (with mix_target None).
    """
    N, D = query.shape
    L, S, _ = bank.shape
    dev = query.device
    row_loss = torch.empty(N, dtype=torch.float32, device=dev)
    stats = torch.empty(N, 4, dtype=torch.float32, device=dev)
    if N == 0:
        return row_loss, stats
    interpret = interpreting(dev)
    has_mix = mix_target is not None
    block_n = fwd_block_n(N, interpret)
    n_row_blocks = cdiv(N, block_n)
    granule = S_GRANULE_INTERPRET if interpret else S_GRANULE_GPU
    s_chunk, n_chunks = split_units(S, L, n_row_blocks, 2 * sm_count(dev, 4), granule)
    n_units = L * n_chunks
    check_int32_offsets("bank_nce_loss", **{
        "N * S (positive similarities)": N * S, "N * L * chunks (logsumexp parts)": N * n_units,
        "the query's extent": (N - 1) * abs(query.stride(0)) + (D - 1) * abs(query.stride(1)),
        "one class of the bank's extent": (S - 1) * abs(bank.stride(1)) + (D - 1) * abs(bank.stride(2))})
    lse = torch.empty(N, n_units, dtype=torch.float32, device=dev)
    pos_t = torch.empty(N, S, dtype=torch.float32, device=dev)
    pos_m = torch.empty(N, S, dtype=torch.float32, device=dev) if has_mix else pos_t
    mt = mix_target if has_mix else target
    w = mix_weight if has_mix else row_loss
    mode = dot_mode(query.dtype, bank.dtype)
    candidates = () if interpret else LSE_CONFIGS[config_family(mode)]
    launch(LaunchPlan(
        "nce_lse", _nce_lse_kernel, lambda meta: (n_row_blocks * n_units,),
        (query, bank, target, mt, lse, pos_t, pos_m,
         N, S, D, n_row_blocks, n_chunks, n_units, s_chunk, 1.0 / temperature,
         query.stride(0), query.stride(1), bank.stride(0), bank.stride(1), bank.stride(2)),
        dict(HAS_MIX=has_mix, MODE=mode, INTERPRET=interpret, BLOCK_N=block_n),
        _INTERPRET_LSE_CONFIG if interpret else candidates[0], dev, dtype_label(query, bank),
        candidates, LSE_TUNE_KEY))
    launch(LaunchPlan(
        "nce_row", _nce_row_kernel, lambda meta: (N,),
        (lse, pos_t, pos_m, target, mt, w, row_loss, stats, L, S, n_chunks), dict(HAS_MIX=has_mix),
        row_kernel_config(L, n_chunks, interpret), dev, "fp32"))
    return row_loss, stats


# ----------------------------------------------------------------------- torch.library custom ops
@torch.library.custom_op("rca_fast::nce_fwd", mutates_args=())
def nce_fwd(query: torch.Tensor, bank: torch.Tensor, target: torch.Tensor,
            mix_target: Optional[torch.Tensor], mix_weight: Optional[torch.Tensor],
            temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(row_loss (N,) fp32, stats (N, 4) fp32); see ``forward``."""
    return forward(query, bank, target, mix_target, mix_weight, temperature)


@nce_fwd.register_fake
def _nce_fwd_fake(query, bank, target, mix_target, mix_weight, temperature):
    N = query.shape[0]
    return (query.new_empty((N,), dtype=torch.float32), query.new_empty((N, 4), dtype=torch.float32))


@torch.library.custom_op("rca_fast::nce_bwd", mutates_args=())
def nce_bwd(grad_rows: torch.Tensor, query: torch.Tensor, bank: torch.Tensor, target: torch.Tensor,
            mix_target: Optional[torch.Tensor], mix_weight: Optional[torch.Tensor],
            stats: torch.Tensor, temperature: float) -> torch.Tensor:
    """d(sum_n grad_rows[n] * row_loss[n]) / d query, (N, D) in query's dtype."""
    return backward(grad_rows, query, bank, target, mix_target, mix_weight, stats, temperature)


@nce_bwd.register_fake
def _nce_bwd_fake(grad_rows, query, bank, target, mix_target, mix_weight, stats, temperature):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    query, bank, target, mix_target, mix_weight, temperature = inputs
    ctx.save_for_backward(query, bank, target, mix_target, mix_weight, output[1])
    ctx.temperature = temperature


def _backward(ctx, grad_rows, grad_stats):
    query, bank, target, mix_target, mix_weight, stats = ctx.saved_tensors
    grad_query = None
    if ctx.needs_input_grad[0]:
        grad_query = nce_bwd(grad_rows, query, bank, target, mix_target, mix_weight, stats,
                             ctx.temperature)
    # the bank is a buffer and the targets / mixup weights are data: no gradient for them
    return grad_query, None, None, None, None, None


nce_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------- provider
def _row_weights(mix_weight: Union[float, torch.Tensor], N: int, device: torch.device) -> torch.Tensor:
    """The mixup weight of every row, (N,) fp32 contiguous (not differentiated: w is sampled data)."""
    if isinstance(mix_weight, torch.Tensor):
        w = mix_weight.detach().to(device=device, dtype=torch.float32)
        return (w.expand(N) if w.dim() == 0 else w).contiguous()
    return torch.full((N,), float(mix_weight), dtype=torch.float32, device=device)


def bank_nce_loss(query: torch.Tensor, bank: torch.Tensor, target: torch.Tensor, *,
                  temperature: float = 0.07, mix_target: Optional[torch.Tensor] = None,
                  mix_weight: Union[float, torch.Tensor, None] = None,
                  reduction: str = "mean") -> torch.Tensor:
    """Triton provider of ``rca_fast.ops.bank_nce_loss`` (arguments already validated).

    query (N, D) fp32/bf16/fp16 (differentiable), bank (L, S, D) fp32/bf16/fp16 (a constant),
    target / mix_target (N,) int, mix_weight float or () / (N,) tensor -> float32 loss, scalar
    ("mean") or (N,) ("none").  No float64 path: ``rca_fast.kernels.supports`` says so, and the
    dispatcher sends float64 inputs to ``rca_fast.ref``.
    """
    N = query.shape[0]
    weights = None
    if mix_target is not None:
        mix_target = mix_target.to(torch.int64).contiguous()
        weights = _row_weights(mix_weight, N, query.device)
    row_loss, _ = nce_fwd(query, bank.detach(), target.to(torch.int64).contiguous(), mix_target,
                          weights, float(temperature))
    return row_loss.mean() if reduction == "mean" else row_loss
