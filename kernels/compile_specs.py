"""Every launch the Triton kernels of rca_fast can make on a GPU, as offline compile jobs.

``jobs(shape, dtype_mode)`` lists, for one problem shape and one precision mode, every kernel x
launchable config the launchers can run: the fixed rule's choice and every candidate of the
autotune lists (RCA_FAST_AUTOTUNE=1), with the arguments the launchers pass (so the integer
specialisation -- divisible by 16, equal to 1 -- and the shape-derived constexprs such as BLOCK_N are
the launch's).  ``python -m rca_fast.profile compile`` compiles them for sm_90a
(``offline_compile.compile_job``).

Precision modes: ``fp32``, ``bf16``, ``fp16`` (every float tensor of that dtype), ``mix``: an
fp32 query against a bf16 bank (the trainer's --bank-dtype bf16 without --amp), which only the NCE
has (its dot scheme changes with it; attention takes one dtype for all inputs), and ``amp``: the
trainer's --amp with its default fp32 bank, whose bf16 autocast gives the NCE a bf16 query against
the fp32 bank (the tf32x3 scheme) and MAP bf16 features with fp32 CAM probabilities.  fp64 never
reaches a compiled kernel
(the providers send it to rca_fast.ref on a GPU).

A shape is a dict with B, L, S, D, H, W, K and Np (NCE query rows); P = L * K attention keys and
M = B * H * W attention rows follow.  Launch sizes use 132 SMs (H100 SXM / H200).
"""
import dataclasses
from typing import Dict, List

import torch
import triton
import triton.language as tl

from .attention import backward as attention_bwd, forward as attention
from .attention.tiles import clamp_configs
from .launch_rule import config_label, launch_options
from .map import backward as kmap_bwd, forward as kmap, tiles as kmap_tiles
from .nce import backward as nce_bwd, forward as nce
from .nce.tiles import S_GRANULE_GPU, cdiv, dot_mode, split_units
from .offline_compile import Job

F32, BF16, F16, I64, U8 = torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8
SMS = 132
MODES = ("fp32", "bf16", "fp16", "mix", "amp")
KERNELS = ("nce_lse", "nce_row", "nce_bwd", "attn_fwd", "attn_bwd_scores", "attn_bwd_grads",
           "attn_sum_splits", "map_fwd", "map_bwd")
_ONE = {"fp32": F32, "bf16": BF16, "fp16": F16}


def _label(cfg_kwargs: dict, warps: int, stages: int, **shape_constexprs) -> str:
    return config_label(dict(cfg_kwargs, **shape_constexprs), warps, stages)


def _nce_jobs(s: dict, mode: str) -> List[Job]:
    q_dt, m_dt = {"mix": (F32, BF16), "amp": (BF16, F32)}.get(mode) or (_ONE[mode], _ONE[mode])
    N, L, S, D = s["Np"], s["L"], s["S"], s["D"]
    out = []
    # forward tile kernel: the launcher's sizes (nce.forward)
    block_n = nce.fwd_block_n(N, False)
    n_rb = cdiv(N, block_n)
    s_chunk, n_chunks = split_units(S, L, n_rb, 2 * SMS, S_GRANULE_GPU)
    n_units = L * n_chunks
    dmode = dot_mode(q_dt, m_dt)
    for cfg in nce.LSE_CONFIGS[nce.config_family(dmode)]:
        args = (q_dt, m_dt, I64, I64, F32, F32, F32, N, S, D, n_rb, n_chunks, n_units, s_chunk, 1 / 0.07,
                D, 1, S * D, D, 1)
        kw = dict(HAS_MIX=True, MODE=dmode, INTERPRET=False, BLOCK_N=block_n, **cfg.kwargs, **launch_options(cfg))
        out.append(Job("nce_lse", _label(cfg.kwargs, cfg.num_warps, cfg.num_stages, BLOCK_N=block_n), mode,
                       "rca_fast.kernels.nce.forward:_nce_lse_kernel", args, kw))
    # per-row kernel (fp32 buffers only: the same for every mode)
    blocks = nce.row_kernel_blocks(L, n_chunks, False)
    out.append(Job("nce_row", _label(blocks, 4, 3), mode, "rca_fast.kernels.nce.forward:_nce_row_kernel",
                   (F32, F32, F32, I64, I64, F32, F32, F32, L, S, n_chunks), dict(HAS_MIX=True, **blocks)))
    # backward (nce_bwd.backward)
    block_n, block_dv = nce_bwd.bwd_blocks(N, D, m_dt, False)
    n_rb, n_dvb = cdiv(N, block_n), cdiv(D, block_dv)
    outer = n_rb * n_dvb
    s_chunk, n_chunks = split_units(S, L, outer, 2 * SMS, S_GRANULE_GPU)
    n_units = L * n_chunks
    ups = cdiv(n_units, max(1, min(n_units, cdiv(2 * SMS, outer))))
    for cfg in nce_bwd.BWD_CONFIGS[nce_bwd.bwd_family(m_dt)]:
        args = (q_dt, m_dt, I64, I64, F32, F32, F32, F32, F32, N, S, D, n_rb, n_dvb, n_chunks, n_units, ups,
                s_chunk, 1 / 0.07, D, 1, S * D, D, 1)
        kw = dict(HAS_MIX=True, MODE=dmode, VMODE=dot_mode(F32, m_dt), INTERPRET=False, BLOCK_N=block_n,
                  BLOCK_DV=block_dv, **cfg.kwargs, **launch_options(cfg))
        out.append(Job("nce_bwd", _label(cfg.kwargs, cfg.num_warps, cfg.num_stages, BLOCK_N=block_n,
                                         BLOCK_DV=block_dv), mode, "rca_fast.kernels.nce.backward:_nce_bwd_kernel",
                       args, kw))
    return out


def _attention_jobs(s: dict, mode: str) -> List[Job]:
    if mode in ("mix", "amp"):
        return []                       # one dtype for query, key and value (ops.prototype_attention)
    dt = _ONE[mode]
    M, P, D = s["B"] * s["H"] * s["W"], s["L"] * s["K"], s["D"]
    DV = D
    meta = dict(ACC_DTYPE=tl.float32, PRECISION="ieee", INTERP_BF16=False)
    sizes = dict(P=P, D=D, DV=DV)
    fam = attention.precision_family(dt)
    out = []
    for cfg in clamp_configs(attention.FWD_CONFIGS[fam], sizes, attention.FWD_CAPS):
        out.append(Job("attn_fwd", _label(cfg.kwargs, cfg.num_warps, cfg.num_stages), mode,
                       "rca_fast.kernels.attention.forward:_attn_fwd_kernel",
                       (dt, dt, dt, dt, F32, M, P, D, DV, 0.044, 1e-10),
                       dict(meta, **cfg.kwargs, **launch_options(cfg))))
    ldp = attention_bwd.padded_cols(P)
    for cfg in clamp_configs(attention_bwd.SCORES_CONFIGS[fam], sizes, attention_bwd.SCORES_CAPS):
        out.append(Job("attn_bwd_scores", _label(cfg.kwargs, cfg.num_warps, cfg.num_stages), mode,
                       "rca_fast.kernels.attention.backward:_attn_bwd_scores_kernel",
                       (dt, dt, dt, dt, dt, F32, dt, dt, M, P, D, DV, ldp, 0.044, 1e-10),
                       dict(meta, **cfg.kwargs, **launch_options(cfg))))
    g = dict(attention_bwd.GPU_GRADS_BLOCKS[fam])
    warps, stages, maxnreg = g.pop("num_warps"), g.pop("num_stages"), g.pop("maxnreg", None)
    reduce_tiles = cdiv(P, g["BLOCK_P_R"]) * (cdiv(D, g["BLOCK_N_R"]) + cdiv(DV, g["BLOCK_N_R"]))
    want = max(1, cdiv(4 * SMS, reduce_tiles))
    splits = max(1, min(want, cdiv(M, 4 * g["BLOCK_M_R"])))
    rows_per_split = cdiv(cdiv(M, splits), g["BLOCK_M_R"]) * g["BLOCK_M_R"]
    out.append(Job("attn_bwd_grads", _label(g, warps, stages), mode,
                   "rca_fast.kernels.attention.backward:_attn_bwd_grads_kernel",
                   (dt, dt, dt, dt, dt, dt, F32, M, P, D, DV, ldp, rows_per_split),
                   dict(meta, **g, num_warps=warps, num_stages=stages, maxnreg=maxnreg)))
    if dt == F32:
        # fp32 dots run as tf32 when torch allows TF32 matmuls (attention.tiles.dot_precision):
        # other instructions and registers than IEEE, so those launches are compiled too
        out += [dataclasses.replace(j, config=j.config + "-tf32", kwargs=dict(j.kwargs, PRECISION="tf32"))
                for j in out]
    out.append(Job("attn_sum_splits", f"BLOCK{attention_bwd.SUM_BLOCK}-w4-s3", mode,
                   "rca_fast.kernels.attention.backward:_sum_splits_kernel",
                   (F32, dt, dt, cdiv(M, rows_per_split), P, D, DV),
                   dict(INTERP_BF16=False, BLOCK=attention_bwd.SUM_BLOCK)))
    return out


def _map_jobs(s: dict, mode: str) -> List[Job]:
    if mode == "mix":
        return []                       # the mix mode is the NCE's (fp32 query, bf16 bank)
    # under --amp the features are bf16 and the CAM probabilities fp32 (model.rca.region_contrast)
    f_dt, c_dt = (BF16, F32) if mode == "amp" else (_ONE[mode], _ONE[mode])
    B, L, D, HW = s["B"], s["L"], s["D"], s["H"] * s["W"]
    lp = triton.next_power_of_2(max(L, 1))
    out = []
    for has_labels in (True, False):
        slots = kmap_tiles.slots_per_pass(True, has_labels, L)
        meta = dict(HAS_LABELS=has_labels, LP=lp, SLOTS=slots, ACC_FP64=False)
        tag = dict(SLOTS=slots, LABELS=int(has_labels))
        present = U8 if has_labels else c_dt        # without labels the launcher passes the CAMs
        for cfg in kmap._fwd_configs(slots, False):
            # features contiguous (B, D, H, W), cams (B, L, H, W), emb (B, L, D)
            args = (f_dt, c_dt, present, torch.float64, I64, f_dt, L, D, HW,
                    D * HW, HW, 1, L * HW, HW, 1, L * D, D, 1)
            out.append(Job("map_fwd", _label(cfg.kwargs, cfg.num_warps, 3, **tag), mode,
                           "rca_fast.kernels.map.forward:_map_fwd_kernel", args,
                           dict(meta, **cfg.kwargs, num_warps=cfg.num_warps, maxnreg=cfg.maxnreg)))
        for cfg in kmap_bwd._bwd_configs(False, slots):
            args = (f_dt, c_dt, present, torch.float64, I64, f_dt, L, D, HW,
                    L * D, D, 1, L * HW, HW, 1, D * HW, HW, 1)
            out.append(Job("map_bwd", _label(cfg.kwargs, cfg.num_warps, 3, **tag), mode,
                           "rca_fast.kernels.map.backward:_map_bwd_kernel", args,
                           dict(meta, **cfg.kwargs, num_warps=cfg.num_warps, maxnreg=cfg.maxnreg)))
    return out


def jobs(shape: Dict[str, int], mode: str) -> List[Job]:
    """Every launchable kernel x config of ``shape`` in precision ``mode`` (see the module note)."""
    if mode not in MODES:
        raise ValueError(f"dtype mode must be one of {MODES}, got {mode!r}")
    return _nce_jobs(shape, mode) + _attention_jobs(shape, mode) + _map_jobs(shape, mode)


def planted_spill_job() -> Job:
    """A launchable-marked config known to spill and to exceed shared memory (the old NCE forward
    config BLOCK_S = BLOCK_D = 128 with an fp32 bank: ~1.8 KB of spills, 163,840 B of shared memory
    at 4 warps and 2 stages): the compile check must fail on it (its test plants it)."""
    args = (F32, F32, I64, I64, F32, F32, F32, 512, 1000, 512, 8, 1, 20, 1024, 1 / 0.07, 512, 1, 512000, 512, 1)
    kw = dict(HAS_MIX=True, MODE=dot_mode(F32, F32), INTERPRET=False, BLOCK_N=64, BLOCK_S=128, BLOCK_D=128,
              num_warps=4, num_stages=2)
    return Job("nce_lse", "PLANTED-N64-S128-D128-w4-s2", "fp32", "rca_fast.kernels.nce.forward:_nce_lse_kernel", args, kw)
