"""Compile one Triton kernel launch for sm_90a on a machine without a GPU, and read what ptxas says.

``compile_job(job)`` binds the launch's arguments exactly as ``kernel[grid](*args, **kwargs)``
would (Triton's own binder: the same signature, constexprs and the same specialisation of integers
divisible by 16 or equal to 1), compiles it with ``triton.compile(..., target=GPUTarget("cuda", 90,
32))`` and returns the registers, spill bytes and stack frame of ptxas ``-v`` (Triton's
``dump_ptxas_log``) and Triton's shared-memory allocation (``metadata.shared``).  Nothing touches a
CUDA driver: ``CompiledKernel.n_regs`` / ``n_spills`` need one (they are filled when the module is
loaded on a device), so the ptxas log is read instead.

A ``Job`` names its kernel as "module:function" and its pointer arguments as ``torch.dtype``s, so a
job pickles and runs in a worker process.  ``job_key`` is the compile's identity (the same for two
launches that compile to the same binary): callers dedupe on it.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from .launch_rule import FIXED_RULE_MAX_REGISTERS

SM90_SHARED_LIMIT = 232448      # bytes of shared memory one block may use on sm_90 (opt-in maximum)
SM90_TARGET = ("cuda", 90, 32)  # GPUTarget: capability 90 compiles for sm_90a


@dataclass(frozen=True)
class Job:
    """One launch to compile.  ``args``: the positional arguments, a torch.dtype for a tensor;
    ``kwargs``: constexprs and launch options (num_warps, num_stages)."""
    kernel: str                       # row label, e.g. "nce_lse"
    config: str                       # row label of the config, e.g. "S64-D64-w4-s3"
    dtype: str                        # precision mode label: fp32, bf16, fp16, mix
    fn: str                           # "module:function" of the @triton.jit function
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any] = field(default_factory=dict)
    launchable: bool = True           # False: compiled for the table only, never launched
    fixed: bool = False               # the fixed rule's choice of some launch (headroom rule)


def _resolve(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _placeholder(arg):
    """A tensor for a dtype (only its dtype and its 16-byte alignment matter to the compile)."""
    if isinstance(arg, torch.dtype):
        return torch.empty(16, dtype=arg)
    return arg


def _bind(job: Job):
    """(fn, target, src, options) of the job, bound by Triton's binder for an sm_90a target."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _resolve(job.fn)
    target = GPUTarget(*SM90_TARGET)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(job.kwargs, debug=False, instrumentation_mode="")
    bound, specialization, options = binder(*(_placeholder(a) for a in job.args), **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return fn, target, ASTSource(fn, signature, constexprs, attrs), options


def job_key(job: Job) -> str:
    """The compile's identity: Triton's source hash (function, signature, constants, attributes)
    and the options (warps, stages, ...)."""
    _, _, src, options = _bind(job)
    return src.hash() + "-" + repr(sorted(options.__dict__.items()))


_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def parse_ptxas(log: str) -> Dict[str, int]:
    """registers, spill_bytes (stores + loads) and stack_bytes of a ptxas -v log (one kernel)."""
    regs = [int(m) for m in _USED.findall(log)]
    spills = [int(a) + int(b) for a, b in _SPILL.findall(log)]
    stack = [int(m) for m in _STACK.findall(log)]
    if not regs:
        raise ValueError(f"no 'Used N registers' line in the ptxas log:\n{log[-2000:]}")
    return dict(registers=max(regs), spill_bytes=max(spills, default=0), stack_bytes=max(stack, default=0))


def compile_job(job: Job) -> Dict[str, Any]:
    """Compile ``job`` for sm_90a; a row {kernel, config, dtype, shared_bytes, registers,
    spill_bytes, launchable} plus ``stack_bytes`` and ``error`` (None, or the failure's text).

    The ptxas log is only printed when ptxas runs, so the caller must give each process a Triton
    cache that does not yet hold this compile (``TRITON_CACHE_DIR``, fresh per run; compiles are
    deduped by ``job_key`` before they are sent here)."""
    import triton
    from triton import knobs

    row = dict(kernel=job.kernel, config=job.config, dtype=job.dtype, shared_bytes=None, registers=None,
               spill_bytes=None, launchable=job.launchable, fixed=job.fixed, stack_bytes=None, error=None)
    try:
        _, target, src, options = _bind(job)
        knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
        row["shared_bytes"] = int(compiled.metadata.shared)
        row.update(parse_ptxas(log.getvalue()))
    except Exception as exc:  # a compile failure is a result: reported in the row, and fails the check
        row["error"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
    return row


def row_problems(row: Dict[str, Any], shared_limit: int = SM90_SHARED_LIMIT,
                 max_fixed_registers: int = FIXED_RULE_MAX_REGISTERS) -> Optional[str]:
    """Why a row fails the check (None when it passes): a compile error, a launchable config
    that spills or needs more shared memory than one sm_90 block gets, or a fixed-rule config that
    needs more than ``max_fixed_registers`` registers (no headroom left for another ptxas)."""
    if row.get("error"):
        return "compile failed"
    if not row["launchable"]:
        return None
    if row["spill_bytes"]:
        return f"spills {row['spill_bytes']} B"
    if row["shared_bytes"] > shared_limit:
        return f"needs {row['shared_bytes']} B of shared memory (limit {shared_limit})"
    if row.get("fixed") and row["registers"] > max_fixed_registers:
        return (f"fixed-rule config uses {row['registers']} registers (headroom rule: at most "
                f"{max_fixed_registers})")
    return None
