"""How every Triton kernel of rca_fast is launched: one launch plan per launch, one rule to run it.

A launcher (``map/``, ``nce/``, ``attention/``) computes its sizes and buffers, then builds a
``LaunchPlan``: the kernel, the grid (a function of the config's blocks), the arguments, the
constexprs that are not tuned, the candidate configs and the fixed rule's choice.  ``launch(plan)``
is the one place that decides how it runs:

* the fixed rule (default): the plan's ``fixed`` config.  Determinism rule: a launch's
  configuration (block sizes, warps, stages) is a pure function of the shapes, dtypes and the
  device's SM count, so two processes, two runs and all DDP ranks of one machine type run the same
  binaries and sum in the same order (``--resume`` ends with the same weights, every rank holds the
  same bank);
* ``RCA_FAST_AUTOTUNE=1``: Triton times every candidate in each process (the benchmarks use it to
  find the rule; not deterministic across processes);
* ``capturing(sms)``: the plan is recorded instead of launched.  The offline compile check
  (``compile_specs.py``) calls the real launchers on fake CUDA tensors this way and compiles every
  captured plan x candidate for sm_90a: what it compiles is what the launchers launch.

Under the interpreter (CPU tensors, ``TRITON_INTERPRET=1``) the launchers put their small
interpreter config in ``fixed`` (and no candidates).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

AUTOTUNE_ENV = "RCA_FAST_AUTOTUNE"

# ptxas, left to itself, caps some kernels at 128 registers and spills a few bytes to fit two blocks
# per SM (sm_90a, ptxas of Triton 3.8: 12-96 B of spills at exactly 128 registers, in NCE and MAP
# kernels whose need was 150-170).  Every launch passes maxnreg=255 (PTX .maxnreg): ptxas then uses
# the registers the kernel needs, the compile check's zero-spill rule holds, and occupancy is set by
# the config (warps, tiles) rather than by spilling.
MAXNREG = 255
# Headroom rule (compile check and tests): a fixed-rule config may need at most this many registers
# under the Triton it is compiled with, so that another ptxas version (Triton 3.6's) does not spill.
FIXED_RULE_MAX_REGISTERS = 240
# programs a CUDA grid may have on its x, y and z axes
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)


def autotune_requested() -> bool:
    """Whether ``RCA_FAST_AUTOTUNE`` asks for autotuning (1/true/yes/on)."""
    return os.environ.get(AUTOTUNE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def config_label(kwargs: dict, num_warps: int, num_stages: int) -> str:
    """A short name of a config for tables: its block sizes, warps and stages."""
    blocks = "-".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in sorted(kwargs.items()))
    return f"{blocks}-w{num_warps}-s{num_stages}"


_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def dtype_label(*tensors: torch.Tensor) -> str:
    """"fp32/bf16"-style label of the tensors' dtypes (the compile check's dtype column)."""
    return "/".join(_SHORT.get(t.dtype, str(t.dtype)) for t in tensors)


def launch_options(cfg) -> dict:
    """num_warps, num_stages and maxnreg of a ``triton.Config`` (maxnreg defaults to MAXNREG)."""
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg or MAXNREG)


def as_config(blocks: dict):
    """A ``triton.Config`` of a dict of blocks that may also name num_warps / num_stages / maxnreg."""
    import triton
    blocks = dict(blocks)
    options = {k: blocks.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in blocks}
    return triton.Config(blocks, **options)


def block_config(warps: int, stages: int, **blocks: int):
    """A launchable ``triton.Config``: the block sizes, ``warps`` x ``stages``, maxnreg MAXNREG (every
    op's config lists are built with it)."""
    import triton
    return triton.Config(blocks, num_warps=warps, num_stages=stages, maxnreg=MAXNREG)


# ------------------------------------------------------------------------------- device facts
_capture: Optional[List["LaunchPlan"]] = None
_capture_sms: int = 0


def interpreting(device: torch.device) -> bool:
    """Whether a launch on ``device`` runs in Triton's interpreter (CPU tensors, or
    TRITON_INTERPRET=1), never while plans are captured for the compile check."""
    if _capture is not None:
        return device.type != "cuda"
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def sm_count(device: torch.device, interpreted: int) -> int:
    """Streaming multiprocessors of ``device`` (the captured SM count while capturing;
    ``interpreted`` in the interpreter, small so the tests exercise the splitting)."""
    if _capture is not None and device.type == "cuda":
        return _capture_sms
    if interpreting(device):
        return interpreted
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one (no-op otherwise)."""
    if device.type == "cuda" and _capture is None and not interpreting(device):
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# -------------------------------------------------------------------------------------- plans
@dataclasses.dataclass
class LaunchPlan:
    """One kernel launch: everything the fixed rule, the autotuner and the compile check need.

    ``grid(meta)`` takes the merged constexprs and config kwargs; ``args`` are the positional
    arguments (tensors, ints, floats); ``constexprs`` the untuned constexprs; ``fixed`` the fixed
    rule's ``triton.Config``; ``candidates`` what RCA_FAST_AUTOTUNE=1 times (the fixed one first);
    ``dtypes`` a row label for the compile check (e.g. "fp32/bf16": query / bank); ``axes`` names
    what each grid axis counts (for the grid-limit error)."""
    name: str
    kernel: Any
    grid: Callable[[dict], Tuple[int, ...]]
    args: Tuple[Any, ...]
    constexprs: Dict[str, Any]
    fixed: Any
    device: torch.device
    dtypes: str
    candidates: Sequence[Any] = ()
    tune_key: Sequence[str] = ()
    axes: Sequence[str] = ()

    def configs(self) -> list:
        """Every config this plan may launch: the fixed one and the autotune candidates."""
        seen, out = set(), []
        for cfg in [self.fixed, *self.candidates]:
            sig = (tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages, cfg.maxnreg)
            if sig not in seen:
                seen.add(sig)
                out.append(cfg)
        return out


_tuned: dict = {}


def _autotuned(plan: LaunchPlan):
    """``plan.kernel`` under ``triton.autotune`` over the plan's candidates, built once per
    (kernel, candidate list, key) and kept."""
    key = (plan.kernel, tuple(config_label(c.kwargs, c.num_warps, c.num_stages) for c in plan.candidates),
           tuple(plan.tune_key))
    if key not in _tuned:
        import triton
        _tuned[key] = triton.autotune(configs=list(plan.candidates), key=list(plan.tune_key))(plan.kernel)
    return _tuned[key]


def check_grid(plan: LaunchPlan) -> None:
    """Raise a ValueError naming the axis when a config of ``plan`` needs more programs on a grid
    axis than CUDA allows (65,535 on y and z): a launch would fail, or its kernel never see them."""
    for cfg in plan.configs():
        grid = plan.grid(dict(plan.constexprs, **cfg.kwargs))
        for axis, (n, limit) in enumerate(zip(grid, GRID_LIMITS)):
            if n > limit:
                what = plan.axes[axis] if axis < len(plan.axes) else "programs"
                raise ValueError(
                    f"{plan.name}: the launch needs {n} programs on CUDA grid axis {'xyz'[axis]} "
                    f"({what}), more than its limit of {limit:,}; use the torch backend "
                    f"(RCA_FAST_BACKEND=torch) or fewer/smaller inputs per call"
                )


def launch(plan: LaunchPlan) -> None:
    """Run ``plan`` by the rule of this module (or record it while capturing), after
    ``check_grid``."""
    check_grid(plan)
    if _capture is not None:
        _capture.append(plan)
        return
    with on_device(plan.device):
        if len(plan.candidates) > 1 and autotune_requested() and not interpreting(plan.device):
            _autotuned(plan)[plan.grid](*plan.args, **plan.constexprs)
            return
        meta = dict(plan.constexprs, **plan.fixed.kwargs)
        options = launch_options(plan.fixed)
        if interpreting(plan.device):
            options = dict(num_warps=plan.fixed.num_warps)
        plan.kernel[plan.grid(meta)](*plan.args, **meta, **options)


@contextlib.contextmanager
def capturing(sms: int):
    """Record the plans of every launcher called inside (on CUDA tensors, typically fake ones)
    instead of launching them; ``sms`` is the SM count the launchers size their grids for."""
    global _capture, _capture_sms
    saved = (_capture, _capture_sms)
    _capture, _capture_sms = [], int(sms)
    try:
        yield _capture
    finally:
        _capture, _capture_sms = saved


_DNS: Dict[Any, frozenset] = {}


def _do_not_specialize(fn) -> frozenset:
    """The kernel's do_not_specialize names.  The interpreter's InterpretedFunction does not keep
    them, so they are read from the decorator in the source then (the same names either way)."""
    if fn not in _DNS:
        if hasattr(fn, "do_not_specialize"):
            names = {fn.arg_names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}
        else:
            import ast
            import inspect
            import textwrap
            tree = ast.parse(textwrap.dedent(inspect.getsource(fn.fn)))
            names = {e.value for d in tree.body[0].decorator_list if isinstance(d, ast.Call)
                     for kw in d.keywords if kw.arg == "do_not_specialize" for e in kw.value.elts}
        _DNS[fn] = frozenset(names)
    return _DNS[fn]


def _arg_key(fn, index: int, value) -> Any:
    """How Triton specialises one positional argument (finer than Triton, never coarser); a tensor
    may be given as its dtype (compile jobs)."""
    if isinstance(value, torch.Tensor):
        value = value.dtype
    if isinstance(value, torch.dtype):
        return ("tensor", str(value))
    if isinstance(value, bool) or value is None:
        return ("const", value)
    if isinstance(value, int):
        dns = fn.arg_names[index] in _do_not_specialize(fn)
        width = 64 if not -2 ** 31 <= value < 2 ** 31 else 32
        return ("int", width) if dns else ("int", width, value == 1, value % 16 == 0)
    if isinstance(value, float):
        return ("float",)
    return ("other", repr(value))


def spec_key(fn, args: Sequence[Any], kwargs: Dict[str, Any]) -> tuple:
    """The compile identity of launching the @triton.jit ``fn`` with ``args`` (tensors or dtypes)
    and ``kwargs`` (constexprs and launch options), cheaply (no Triton binder): the kernel, how each
    argument is specialised, the constexprs, blocks and options."""
    return (f"{fn.fn.__module__}:{fn.fn.__name__}",
            tuple(_arg_key(fn, i, a) for i, a in enumerate(args)),
            tuple(sorted((k, repr(v)) for k, v in kwargs.items())))


def plan_key(plan: LaunchPlan, cfg) -> tuple:
    """``spec_key`` of ``plan`` launched with ``cfg`` (one of ``plan.configs()``)."""
    return spec_key(plan.kernel, plan.args, dict(plan.constexprs, **cfg.kwargs, **launch_options(cfg)))
