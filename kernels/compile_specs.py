"""Every launch the Triton kernels of rca_fast can make on a GPU, as offline compile jobs, taken from
the launchers themselves.

``capture(shape, mode, sms)`` calls the real launchers (``map/``, ``nce/``, ``attention/``: forward
and backward, as a training step does; an eval step runs the forwards only, a subset) on fake CUDA
tensors (``FakeTensorMode``: nothing is allocated, no GPU is needed) inside
``launch_rule.capturing(sms)``, which records each ``LaunchPlan`` instead of launching it.
``jobs(shape, mode)`` turns the plans captured at every SM count of ``SMS`` into compile jobs: one
per plan x config the plan may launch (the fixed rule's choice and every autotune candidate), with
the launch's own arguments (so the integer specialisation -- divisible by 16, equal to 1 -- and the
shape-derived constexprs are the launch's).  ``python -m rca_fast.profile compile`` compiles them for
sm_90a (``offline_compile.compile_job``).  A change to a launcher changes its plans, hence the jobs.

Precision modes (the dtypes a launch can get; fp64 never reaches a compiled kernel: the dispatcher's
float64 rule sends it to rca_fast.ref on a GPU):
  ``fp32``, ``bf16``, ``fp16``: every float tensor of that dtype;
  ``mix``: the NCE's other (query, bank) pairs the MemoryBank accepts (fp32 / bf16 / fp16 banks),
           and MAP fp16 features with fp32 CAM probabilities (fp16 autocast);
  ``amp``: the trainer's --amp (bf16 autocast) with its default fp32 bank: a bf16 query against
           the fp32 bank, MAP bf16 features with fp32 CAM probabilities (region_contrast).
Each scenario runs with mixup on and off (the eval forward and --no-mixup have none), MAP with and
without labels, fp32 attention with IEEE and TF32 dots (torch's allow_tf32), at 132 SMs (H100 SXM /
H200), 114 (H100 PCIe) and 16 (a MIG slice).

A shape is a dict with B, L, S, D, H, W, K and Np (NCE query rows); P = L * K attention keys and
M = B * H * W attention rows follow.
"""
import contextlib
import dataclasses
from typing import Dict, List

import torch

from . import launch_rule
from .attention import backward as attention_bwd, forward as attention
from .launch_rule import LaunchPlan, config_label, launch_options, plan_key
from .map import backward as kmap_bwd, forward as kmap
from .nce import backward as nce_bwd, forward as nce
from .nce.tiles import dot_mode
from .offline_compile import Job

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
SMS = (132, 114, 16)
MODES = ("fp32", "bf16", "fp16", "mix", "amp")
KERNELS = ("nce_lse", "nce_row", "nce_bwd", "attn_fwd", "attn_bwd_scores", "attn_bwd_grads",
           "attn_sum_splits", "map_fwd", "map_bwd")
# mode -> (NCE (query, bank) pairs, MAP (features, cams) pairs, attention dtypes)
PRECISIONS = {
    "fp32": ([(F32, F32)], [(F32, F32)], [F32]),
    "bf16": ([(BF16, BF16)], [(BF16, BF16)], [BF16]),
    "fp16": ([(F16, F16)], [(F16, F16)], [F16]),
    "mix": ([(F32, BF16), (F32, F16), (BF16, F16), (F16, BF16), (F16, F32)], [(F16, F32)], []),
    "amp": ([(BF16, F32)], [(BF16, F32)], []),
}
# constexprs shown in a row's config label beside the config's own blocks
_LABEL_KEYS = ("BLOCK_N", "BLOCK_DV", "SLOTS", "HAS_MIX", "HAS_LABELS", "PRECISION")


def _cuda(*shape, dtype=F32):
    return torch.empty(*shape, dtype=dtype, device="cuda")


def _nce_launches(s: dict, pairs) -> None:
    N, L, S, D = s["Np"], s["L"], s["S"], s["D"]
    for q_dt, b_dt in pairs:
        query, bank, target = _cuda(N, D, dtype=q_dt), _cuda(L, S, D, dtype=b_dt), _cuda(N, dtype=torch.int64)
        for mix in (True, False):
            mt, w = (_cuda(N, dtype=torch.int64), _cuda(N)) if mix else (None, None)
            _, stats = nce.forward(query, bank, target, mt, w, 0.07)
            nce_bwd.backward(_cuda(N), query, bank, target, mt, w, stats, 0.07)


def _map_launches(s: dict, pairs) -> None:
    B, L, D, H, W = s["B"], s["L"], s["D"], s["H"], s["W"]
    for f_dt, c_dt in pairs:
        features, cams = _cuda(B, D, H, W, dtype=f_dt), _cuda(B, L, H, W, dtype=c_dt)
        for labels in (_cuda(B, L, dtype=torch.bool), None):
            emb, count, mean = kmap._launch_fwd(features, cams, labels)
            kmap_bwd._launch_bwd(torch.empty_like(emb), cams, labels, mean, count, False)


@contextlib.contextmanager
def allow_tf32(value: bool):
    """torch's TF32 switch for fp32 matmuls set to ``value`` inside (fp32 attention follows it)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = value
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _attention_launches(s: dict, dtypes) -> None:
    M, P, D = s["B"] * s["H"] * s["W"], s["L"] * s["K"], s["D"]
    for dt in dtypes:
        for tf32 in ((False, True) if dt == F32 else (False,)):
            with allow_tf32(tf32):
                q, k, v = _cuda(M, D, dtype=dt), _cuda(P, D, dtype=dt), _cuda(P, D, dtype=dt)
                out, lse = attention.attention_forward(q, k, v, D ** -0.5)
                attention_bwd.attention_backward(torch.empty_like(out), q, k, v, out, lse, D ** -0.5)


def capture(shape: Dict[str, int], mode: str, sms: int) -> List[LaunchPlan]:
    """The plans of every launch a training step makes at ``shape`` in precision ``mode`` on a GPU
    with ``sms`` SMs (fake CUDA tensors; nothing runs)."""
    if mode not in MODES:
        raise ValueError(f"dtype mode must be one of {MODES}, got {mode!r}")
    from torch._subclasses.fake_tensor import FakeTensorMode
    nce_pairs, map_pairs, attn_dtypes = PRECISIONS[mode]
    with FakeTensorMode(), launch_rule.capturing(sms) as plans:
        _nce_launches(shape, nce_pairs)
        _map_launches(shape, map_pairs)
        _attention_launches(shape, attn_dtypes)
    return list(plans)


def plan_jobs(plans, mode: str) -> List[Job]:
    """One compile job per (plan, config it may launch), identical compiles (``plan_key``) once;
    ``fixed`` marks a job that is some plan's fixed-rule choice (the register-headroom rule)."""
    out, seen = [], {}
    for plan in plans:
        for cfg in plan.configs():
            key = plan_key(plan, cfg)
            is_fixed = cfg is plan.fixed
            if key in seen:
                if is_fixed and not out[seen[key]].fixed:
                    out[seen[key]] = dataclasses.replace(out[seen[key]], fixed=True)
                continue
            seen[key] = len(out)
            shown = {
                k: int(v) if isinstance(v, bool) else v
                for k, v in plan.constexprs.items()
                if k in _LABEL_KEYS
            }
            fn = plan.kernel.fn
            out.append(Job(plan.name, config_label(dict(cfg.kwargs, **shown), cfg.num_warps, cfg.num_stages),
                           plan.dtypes, f"{fn.__module__}:{fn.__name__}",
                           tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in plan.args),
                           dict(plan.constexprs, **cfg.kwargs, **launch_options(cfg)), fixed=is_fixed))
    return out


def jobs(shape: Dict[str, int], mode: str, sms=SMS) -> List[Job]:
    """Every launchable kernel x config of ``shape`` in precision ``mode`` at the SM counts ``sms``."""
    return plan_jobs([p for n in sms for p in capture(shape, mode, n)], mode)


def planted_spill_job() -> Job:
    """A launchable-marked config known to spill and to exceed shared memory (the old NCE forward
    config BLOCK_S = BLOCK_D = 128 with an fp32 bank: ~1.8 KB of spills, 163,840 B of shared memory
    at 4 warps and 2 stages): the compile check must fail on it (its test plants it)."""
    I64 = torch.int64
    args = (
        F32,
        F32,
        I64,
        I64,
        F32,
        F32,
        F32,
        512,
        1000,
        512,
        8,
        1,
        20,
        1024,
        1 / 0.07,
        512,
        1,
        512000,
        512,
        1,
    )
    kw = dict(HAS_MIX=True, MODE=dot_mode(F32, F32), INTERPRET=False, BLOCK_N=64, BLOCK_S=128, BLOCK_D=128,
              num_warps=4, num_stages=2)
    return Job(
        "nce_lse", "PLANTED-N64-S128-D128-w4-s2", "fp32", "rca_fast.kernels.nce.forward:_nce_lse_kernel",
        args, kw,
    )
