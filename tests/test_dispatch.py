"""The one dispatch point of rca_fast.ops: RCA_FAST_BACKEND, fallbacks, missing providers.

Every test swaps in fresh provider caches with monkeypatch (restored afterwards), so the
dispatcher's cache of loaded providers seen by the other test modules is left as it was.
"""
import sys
import types
import warnings

import pytest
import torch

import rca_fast.ref as ref
from rca_fast import ops
from rca_fast.ops import _dispatch

OPS = ["masked_average_pool", "bank_nce_loss", "prototype_attention", "ema_update_", "kmeans"]
FAKE_MODULE = "rca_fast_test_fake_provider"
MISSING_MODULE = "rca_fast._extension_that_is_not_there"


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """Empty provider caches and no forced backend for the duration of one test."""
    monkeypatch.setattr(_dispatch, "_loaded", {})
    monkeypatch.setattr(_dispatch, "_load_errors", {})
    monkeypatch.setattr(_dispatch, "_warned", set())
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    return monkeypatch


@pytest.fixture
def fake_cuda_kmeans(fresh_dispatch):
    """A stand-in compiled provider of kmeans that records its calls and runs the reference."""
    calls = []

    def kmeans(points, k, *, iters, tol, seed, init, n_init):
        calls.append(dict(points=points, k=k, iters=iters, tol=tol, seed=seed, init=init, n_init=n_init))
        return ref.kmeans(points, k, iters=iters, tol=tol, seed=seed, init=init, n_init=n_init)

    module = types.ModuleType(FAKE_MODULE)
    module.kmeans = kmeans
    module.supports = lambda op, device, dtypes: None   # the stand-in backend runs everything
    fresh_dispatch.setitem(sys.modules, FAKE_MODULE, module)
    fresh_dispatch.setitem(_dispatch.PROVIDERS["kmeans"], "cuda", f"{FAKE_MODULE}:kmeans")
    fresh_dispatch.setitem(_dispatch.CAPABILITIES, "cuda", f"{FAKE_MODULE}:supports")
    return calls


def test_available_provider_is_preferred_on_cpu(fake_cuda_kmeans, gen):
    points = torch.randn(2, 9, 5, generator=gen)
    assert _dispatch.backend_for("kmeans", points.device) == "cuda"
    ops.kmeans(points, 3, seed=4)
    # The provider got validated arguments with the reference's keyword signature.
    assert len(fake_cuda_kmeans) == 1
    assert fake_cuda_kmeans[0]["k"] == 3 and fake_cuda_kmeans[0]["seed"] == 4
    assert fake_cuda_kmeans[0]["init"] == "k-means++" and fake_cuda_kmeans[0]["points"] is points


@pytest.mark.parametrize("value", ["torch", " Torch ", "TORCH"])
def test_forced_torch_uses_the_reference(value, fake_cuda_kmeans, fresh_dispatch, gen):
    fresh_dispatch.setenv(_dispatch.ENV_VAR, value)
    points = torch.randn(2, 9, 5, generator=gen)
    for op in OPS:
        assert _dispatch.backend_for(op, points.device) == "torch", op
        assert _dispatch.implementation(op, points.device) is getattr(ref, op), op
    got = ops.kmeans(points, 3, seed=7)
    want = ref.kmeans(points, 3, seed=7)
    assert fake_cuda_kmeans == []  # the preferred (fake) provider was bypassed
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_unknown_backend_raises_naming_the_variable(fresh_dispatch, gen):
    fresh_dispatch.setenv(_dispatch.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=_dispatch.ENV_VAR):
        ops.kmeans(torch.randn(2, 9, 5, generator=gen), 3)
    with pytest.raises(ValueError, match="gpu"):
        _dispatch.backend_for("masked_average_pool", torch.device("cpu"))


@pytest.mark.parametrize("fn", ["backend_for", "available_backends"])
def test_unknown_op_raises_naming_it_and_string_devices_work(fn, fresh_dispatch):
    with pytest.raises(ValueError, match="no_such_op"):
        getattr(ops, fn)("no_such_op", torch.device("cpu"))
    assert getattr(ops, fn)("kmeans", "cpu") == getattr(ops, fn)("kmeans", torch.device("cpu"))


@pytest.mark.parametrize("forced, op", [("triton", "kmeans"), ("triton", "ema_update_"),
                                        ("cuda", "masked_average_pool"), ("cuda", "bank_nce_loss"),
                                        ("cuda", "prototype_attention")])
def test_forcing_a_backend_the_op_lacks_falls_back_to_torch(forced, op, fresh_dispatch):
    assert forced not in _dispatch.PROVIDERS[op]
    fresh_dispatch.setenv(_dispatch.ENV_VAR, forced)
    assert _dispatch.backend_for(op, torch.device("cpu")) == "torch"
    assert _dispatch.implementation(op, torch.device("cpu")) is getattr(ref, op)


def test_forcing_a_backend_the_op_lacks_runs_the_reference(fresh_dispatch, gen):
    fresh_dispatch.setenv(_dispatch.ENV_VAR, "cuda")
    query = torch.randn(2, 5, 6, generator=gen)
    key, value = torch.randn(3, 6, generator=gen), torch.randn(3, 4, generator=gen)
    assert torch.equal(ops.prototype_attention(query, key, value), ref.prototype_attention(query, key, value))


@pytest.mark.parametrize("op", ["ema_update_", "kmeans"])
def test_forcing_cuda_without_the_extension_says_why(op, fresh_dispatch, gen):
    fresh_dispatch.setitem(_dispatch.PROVIDERS[op], "cuda", f"{MISSING_MODULE}:{op}")
    fresh_dispatch.setenv(_dispatch.ENV_VAR, "cuda")
    bank, ptr = torch.randn(3, 4, 5, generator=gen), torch.zeros(3, dtype=torch.long)
    before = bank.clone()
    why = rf"{_dispatch.ENV_VAR}=cuda.*{op}.*cannot be loaded.*ModuleNotFoundError"
    with pytest.raises(RuntimeError, match=why):
        if op == "ema_update_":
            ops.ema_update_(bank, ptr, torch.randn(2, 5, generator=gen), torch.tensor([0, 2]))
        else:
            ops.kmeans(bank, 2)
    assert torch.equal(bank, before) and bool((ptr == 0).all())


def test_missing_extension_falls_back_with_one_warning(fresh_dispatch, gen):
    for op in ("ema_update_", "kmeans"):
        fresh_dispatch.setitem(_dispatch.PROVIDERS[op], "cuda", f"{MISSING_MODULE}:{op}")
    points = torch.randn(2, 9, 5, generator=gen)
    with pytest.warns(RuntimeWarning, match="extension is not available"):
        assert _dispatch.backend_for("kmeans", points.device) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second op of the same extension does not warn again
        assert _dispatch.backend_for("ema_update_", points.device) == "torch"
        got = ops.kmeans(points, 3, seed=2)
    want = ref.kmeans(points, 3, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_providers_are_loaded_once_and_failures_remembered(fresh_dispatch):
    spec = f"{MISSING_MODULE}:kmeans"
    assert _dispatch._load(spec) is None
    assert "ModuleNotFoundError" in _dispatch._load_errors[spec]
    imports = []
    real_import = _dispatch._import_provider
    fresh_dispatch.setattr(_dispatch, "_import_provider",
                           lambda name: imports.append(name) or real_import(name))
    assert _dispatch._load(spec) is None
    first = _dispatch._load("rca_fast.ref.kmeans:kmeans")
    assert _dispatch._load("rca_fast.ref.kmeans:kmeans") is first is ref.kmeans
    assert imports == ["rca_fast.ref.kmeans"]  # the failed spec is not retried, the good one cached


def test_triton_is_not_chosen_for_cpu_tensors_unless_forced(fresh_dispatch):
    for op in ("masked_average_pool", "bank_nce_loss", "prototype_attention"):
        assert _dispatch.backend_for(op, torch.device("cpu")) == "torch"


def test_first_call_inside_fullgraph_compile_loads_its_provider(fresh_dispatch, gen):
    """An op whose provider has not been loaded yet, first called inside
    torch.compile(fullgraph=True): the provider is imported while Dynamo traces (importlib is on
    Dynamo's skip list, so loading it that way broke the graph).  The Triton provider (a
    torch.library op, under the interpreter on CPU); checked against the float64 loop."""
    import oracles

    fresh_dispatch.setenv(_dispatch.ENV_VAR, "triton")

    B, L, D, H, W = 2, 3, 5, 7, 6
    features = torch.randn(B, D, H, W, generator=gen, dtype=torch.float64)
    cams = torch.randn(B, L, H, W, generator=gen, dtype=torch.float64)
    labels = torch.rand(B, L, generator=gen) > 0.3

    def step(f, c, lab):
        return ops.masked_average_pool(f, c, lab)

    torch._dynamo.reset()
    emb, count = torch.compile(step, fullgraph=True, backend="aot_eager")(features, cams, labels)
    want_emb, want_count = oracles.masked_average_pool(features, cams, labels)
    assert torch.equal(count, want_count)
    torch.testing.assert_close(emb, want_emb, rtol=1e-12, atol=1e-12)
