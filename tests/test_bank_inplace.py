"""An in-place bank update never silently changes a gradient (issue 19, point 2).

``ops.bank_nce_loss`` saves the bank for its backward.  Updating the bank in place
(``ops.ema_update_``) before ``backward()`` must raise autograd's in-place error on every
backend pair -- the torch reference, the Triton NCE (interpreter on CPU), the compiled EMA
(extension, CPU twin) -- rather than compute the gradient against the new bank.  The oracle is
autograd's own version check: the same calls without the update pass, and their gradient equals
the float64 reference's.
"""
import pytest
import torch

from rca_fast import ops
from rca_fast.ops import _dispatch
from rca_fast.ref.ema import ema_update_ as ref_ema
from rca_fast.ref.nce import bank_nce_loss as ref_nce

INPLACE = "modified by an inplace operation"


def _nce_providers():
    out = [pytest.param(ref_nce, id="nce-torch")]
    spec = _dispatch.PROVIDERS["bank_nce_loss"]["triton"]   # the dispatcher's own name for it
    triton_nce = _dispatch._load(spec)
    out.append(pytest.param(triton_nce, id="nce-triton", marks=[] if triton_nce else pytest.mark.skip(
        reason=f"no Triton: {_dispatch._load_errors.get(spec)}")))
    return out


def _ema_providers():
    out = [pytest.param(ref_ema, id="ema-torch")]
    try:
        from rca_fast._ext import ema_update_ as ext_ema
        out.append(pytest.param(ext_ema, id="ema-extension"))
    except ImportError as exc:
        out.append(pytest.param(None, id="ema-extension", marks=pytest.mark.skip(reason=str(exc))))
    return out


def make(gen, N=5, L=3, S=7, D=19):
    query = torch.randn(N, D, generator=gen, requires_grad=True)
    bank = torch.randn(L, S, D, generator=gen)
    target = torch.randint(L, (N,), generator=gen)
    mix = torch.randint(L, (N,), generator=gen)
    weight = torch.rand(N, generator=gen)
    ptr = torch.randint(S, (L,), generator=gen)
    emb = 3 * torch.randn(4, D, generator=gen)
    rows = torch.randint(L, (4,), generator=gen)
    return query, bank, target, mix, weight, ptr, emb, rows


@pytest.mark.parametrize("ema", _ema_providers())
@pytest.mark.parametrize("nce", _nce_providers())
def test_update_before_backward_raises(nce, ema, gen):
    query, bank, target, mix, weight, ptr, emb, rows = make(gen)
    # control: without the update the backward runs and matches the float64 reference
    loss = nce(query, bank, target, mix_target=mix, mix_weight=weight)
    loss.backward()
    q64 = query.detach().double().requires_grad_(True)
    ref_nce(q64, bank.double(), target, mix_target=mix, mix_weight=weight.double()).backward()
    torch.testing.assert_close(query.grad.double(), q64.grad, rtol=1e-4, atol=1e-6)
    # the update between forward and backward: autograd's error, never a gradient on the new bank
    query.grad = None
    loss = nce(query, bank, target, mix_target=mix, mix_weight=weight)
    with torch.no_grad():  # as MemoryBank.update runs it
        ema(bank, ptr, emb, rows, gamma=0.9)
    with pytest.raises(RuntimeError, match=INPLACE):
        loss.backward()
    assert query.grad is None


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_through_ops_with_a_forced_backend(backend, gen, monkeypatch):
    """RCA_FAST_BACKEND=torch|triton|cuda through the public ops (cuda = the extension's CPU twin)."""
    monkeypatch.setenv(_dispatch.ENV_VAR, backend)
    for op in ("bank_nce_loss", "ema_update_"):
        spec = _dispatch.PROVIDERS[op].get(backend)
        if spec is not None and _dispatch._load(spec) is None:
            pytest.skip(f"the {backend} backend of {op} is not available here")
    query, bank, target, mix, weight, ptr, emb, rows = make(gen)
    loss = ops.bank_nce_loss(query, bank, target, mix_target=mix, mix_weight=weight)
    with torch.no_grad():
        ops.ema_update_(bank, ptr, emb, rows, gamma=0.9)
    with pytest.raises(RuntimeError, match=INPLACE):
        loss.backward()


def test_extension_op_bumps_the_version_counters(gen):
    """The compiled op itself (torch.ops.rca_fast.ema_update_) marks bank and ptr as changed."""
    pytest.importorskip(
        "rca_fast._ext", reason="the extension rca_fast._C is not built", exc_type=ImportError
    )
    query, bank, target, mix, weight, ptr, emb, rows = make(gen)
    v_bank, v_ptr = bank._version, ptr._version
    torch.ops.rca_fast.ema_update_(bank, ptr, emb, rows, 0.9)
    assert bank._version > v_bank and ptr._version > v_ptr
