"""Correctly rounded / full-accuracy maths for the Triton kernels (all dtypes they compute in).

On a GPU, Triton lowers ``tl.exp`` to ``ex2.approx.f32`` (after a multiply by log2(e), so the error
grows with |x|), ``tl.log`` to ``lg2.approx.f32``, ``tl.sqrt`` to ``sqrt.approx.f32`` and ``/`` to
``div.full.f32`` (2 ulp).  The interpreter computes all of them with numpy, exactly, so the CPU tests
never see the difference; the GPU tests' rule (our error at most 2x the fp32 reference's, against
float64) would.  Where a result is formed -- norms, softmax / logsumexp terms, final divisions --
the kernels therefore use:

* ``tl.sqrt_rn`` and ``tl.div_rn`` (IEEE round-to-nearest; both exist in Triton 3.6 and 3.8; fp32
  only, so ``div_precise`` below keeps ``/`` for fp64, where it is already IEEE);
* ``exp_precise`` / ``log_precise`` below: libdevice's ``__nv_expf`` / ``__nv_logf`` (about 1 ulp,
  like the CUDA maths torch uses) when compiled, numpy's in the interpreter (libdevice calls return
  nothing there).
"""
import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def exp_precise(x):
    """exp(x) to about 1 ulp (libdevice) on a GPU; numpy's exp in the interpreter."""
    if _INTERPRET:
        y = tl.exp(x)
    else:
        y = libdevice.exp(x)
    return y


@triton.jit
def log_precise(x):
    """log(x) to about 1 ulp (libdevice) on a GPU; numpy's log in the interpreter."""
    if _INTERPRET:
        y = tl.log(x)
    else:
        y = libdevice.log(x)
    return y


@triton.jit
def div_precise(x, y):
    """x / y correctly rounded: ``tl.div_rn`` for fp32 (the only dtype it takes); fp64 ``/`` is
    already the IEEE division (div.rn.f64)."""
    if x.dtype == tl.float64:
        z = x / y
    else:
        z = tl.div_rn(x, y)
    return z
