"""``ops.backend_for`` names the backend that really runs (issue 21), and the one float64 rule.

For every op, for float64 / float32 / bfloat16 inputs, in four situations -- CPU tensors (default
selection), CPU tensors with ``RCA_FAST_BACKEND=triton`` (the interpreter), and CUDA as the
dispatcher sees it with and without ``TRITON_INTERPRET=1`` (faked: the dispatcher is asked for
``cuda`` while the tensors stay on the CPU, where the interpreted kernels run them) -- every
provider function is replaced by a spy that counts its calls (in its module, so a provider that
imported another provider's function internally would call the spy too), the public op runs,
and exactly one call must have reached exactly the backend ``backend_for`` names.  A provider that
fell back by itself again (the float64 fallbacks the Triton providers and the extension wrapper
had) fails this.  The backend named is also checked against the routing table written out below
from the dispatcher's docstring (the oracle of the float64 rule), so a dispatcher that forgot the
rule fails too.
"""
import sys
import warnings

import pytest
import torch

from rca_fast import ops
from rca_fast.ops import _dispatch

OPS = ["masked_average_pool", "bank_nce_loss", "prototype_attention", "ema_update_", "kmeans"]
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}
SITUATIONS = ["cpu", "cpu-forced-triton", "cuda-interpreted", "cuda"]
TRITON_OPS = ("masked_average_pool", "bank_nce_loss", "prototype_attention")


def _extension_backend(device_type):
    """What the extension ops should run on: ``cuda`` when the extension loads (and, for CUDA
    tensors, was built with its CUDA sources), else the reference."""
    try:
        import rca_fast._ext as ext
    except ImportError:
        return "torch"
    return "cuda" if device_type == "cpu" or ext.WITH_CUDA else "torch"


def expected_backend(op, situation, dtype):
    """The routing table of the dispatcher's docstring: extension first, then Triton (on CUDA, or
    on the CPU when forced, in the interpreter), then the reference; float64 reaches a Triton kernel
    only in the interpreter, and never the NCE kernel (it has no float64 path); a forced backend the
    op lacks gives the reference."""
    if op not in TRITON_OPS:   # forcing Triton, which they lack, gives the reference
        if situation == "cpu-forced-triton":
            return "torch"
        return _extension_backend("cpu" if situation == "cpu" else "cuda")
    if situation == "cpu":
        return "torch"
    if dtype == torch.float64 and (op == "bank_nce_loss" or situation == "cuda"):
        return "torch"
    return "triton"


def make_call(op, dtype, gen):
    """A tiny valid call of the public op in ``dtype`` (odd sizes)."""
    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    if op == "masked_average_pool":
        return lambda: ops.masked_average_pool(rand(2, 3, 4, 5), rand(2, 3, 4, 5),
                                               torch.tensor([[True, False, True], [True, True, False]]))
    if op == "bank_nce_loss":
        return lambda: ops.bank_nce_loss(rand(3, 5), rand(2, 3, 5), torch.tensor([0, 1, 1]))
    if op == "prototype_attention":
        return lambda: ops.prototype_attention(rand(1, 3, 5), rand(4, 5), rand(4, 3))
    if op == "ema_update_":
        return lambda: ops.ema_update_(rand(2, 3, 5), torch.zeros(2, dtype=torch.long), rand(3, 5),
                                       torch.tensor([0, 1, 0]), gamma=0.9)
    return lambda: ops.kmeans(rand(2, 7, 3), 2, iters=3, seed=1)


@pytest.fixture
def spies(monkeypatch):
    """Every provider function of every op replaced, in its module (and in ``rca_fast.ref`` for the
    reference's re-exports), by a spy appending (op, backend) to the returned list; the
    dispatcher's caches emptied so it loads the spies."""
    calls = []
    for op, specs in _dispatch.PROVIDERS.items():
        for backend, spec in specs.items():
            real = _dispatch._load(spec)
            if real is None:
                continue               # not available here (the extension, say): never chosen

            def spy(*args, _real=real, _op=op, _backend=backend, **kwargs):
                calls.append((_op, _backend))
                return _real(*args, **kwargs)
            module_name, fn_name = spec.split(":")
            monkeypatch.setattr(sys.modules[module_name], fn_name, spy)
            if backend == "torch":
                monkeypatch.setattr(sys.modules["rca_fast.ref"], fn_name, spy)
    # loaded above (Triton kernels built in interpreted form) before any situation sets the env
    monkeypatch.setattr(_dispatch, "_loaded", {})
    monkeypatch.setattr(_dispatch, "_load_errors", {})
    monkeypatch.setattr(_dispatch, "_warned", set())
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    return calls


def enter(situation, monkeypatch):
    """Set up ``situation``; returns the device the dispatcher is asked about."""
    if situation == "cpu-forced-triton":
        monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    if situation.startswith("cpu"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        return torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1" if situation == "cuda-interpreted" else "0")
    cuda = torch.device("cuda")
    real = _dispatch.implementation
    # the op asks about its CPU tensors' device: answer as for CUDA tensors
    monkeypatch.setattr(_dispatch, "implementation", lambda op, device, dtypes=None: real(op, cuda, dtypes))
    return cuda


@pytest.mark.filterwarnings("ignore:rca_fast. the compiled extension:RuntimeWarning")
@pytest.mark.parametrize("situation", SITUATIONS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("op", OPS)
def test_backend_for_is_the_backend_that_runs(op, dtype_name, situation, spies, monkeypatch, gen):
    dtype = DTYPES[dtype_name]
    call = make_call(op, dtype, gen)
    device = enter(situation, monkeypatch)
    compute = {"bank_nce_loss": (dtype, dtype), "ema_update_": (dtype, dtype)}.get(op, (dtype,))
    named = ops.backend_for(op, device, compute)
    assert named == expected_backend(op, situation, dtype), (op, dtype_name, situation)
    call()
    assert spies == [(op, named)], f"backend_for named {named!r}, but {spies} ran"


def test_nce_with_one_float64_input_runs_the_reference(spies, monkeypatch, gen):
    """A float32 query against a float64 bank: the kernel has no float64 path, so the reference."""
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    dtypes = (torch.float32, torch.float64)
    assert ops.backend_for("bank_nce_loss", "cpu", dtypes) == "torch"
    assert "triton" not in ops.available_backends("bank_nce_loss", "cpu", dtypes)
    query, bank = torch.randn(3, 5, generator=gen), torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    ops.bank_nce_loss(query, bank, torch.tensor([0, 1, 1]))
    assert spies == [("bank_nce_loss", "torch")]


def test_extension_built_without_cuda_is_passed_over_with_one_warning(monkeypatch):
    """The extension's own ``supports`` refuses CUDA tensors when it has no CUDA code: the dispatcher
    says so once and names the reference (the wrapper used to fall back silently by itself)."""
    monkeypatch.setattr(_dispatch, "_loaded", {})
    monkeypatch.setattr(_dispatch, "_load_errors", {})
    monkeypatch.setattr(_dispatch, "_warned", set())
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    fake = type(sys)("rca_fast_test_cpu_only_extension")
    fake.kmeans = fake.ema_update_ = lambda *a, **k: None
    fake.supports = lambda op, device, dtypes: (
        "rca_fast._C was built without its CUDA sources" if device.type == "cuda" else None)
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setitem(_dispatch.CAPABILITIES, "cuda", f"{fake.__name__}:supports")
    for op in ("kmeans", "ema_update_"):
        monkeypatch.setitem(_dispatch.PROVIDERS[op], "cuda", f"{fake.__name__}:{op}")
    assert ops.backend_for("kmeans", "cpu") == "cuda"
    with pytest.warns(RuntimeWarning, match="without its CUDA sources"):
        assert ops.backend_for("kmeans", "cuda", (torch.float32,)) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.backend_for("ema_update_", "cuda", (torch.float32,)) == "torch"
    assert ops.available_backends("kmeans", "cuda") == ["torch"]
