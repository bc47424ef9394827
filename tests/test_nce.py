"""bank_nce_loss (eq. 4 with region mixup) against the float64 loop oracle, gradients, bad inputs."""
import pytest
import torch

import oracles
from oracles import torch_backend_unless_forced  # noqa: F401  (autouse: torch backend)
from rca_fast import ops

# (N, L, S, D): S=1, L=1 (no negatives), L=80, D=60.
SHAPES = [(5, 3, 4, 60), (4, 80, 3, 6), (6, 3, 1, 7), (3, 1, 5, 8), (1, 2, 1, 60), (7, 5, 9, 13)]
SHAPE_IDS = [f"N{n}-L{l}-S{s}-D{d}" for n, l, s, d in SHAPES]


def inputs(shape, gen, dtype=torch.float32):
    N, L, S, D = shape
    query = torch.randn(N, D, generator=gen).to(dtype)
    bank = torch.randn(L, S, D, generator=gen).to(dtype)
    target = torch.randint(L, (N,), generator=gen)
    return query, bank, target


def mixup(N, L, gen, per_row):
    mix_target = torch.randint(L, (N,), generator=gen)
    weight = torch.rand(N, generator=gen) if per_row else float(torch.rand((), generator=gen))
    return mix_target, weight


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("mix", ["nomix", "mix-scalar", "mix-rows"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_loop_oracle(shape, mix, reduction, gen):
    N, L, S, D = shape
    query, bank, target = inputs(shape, gen)
    kwargs = dict(reduction=reduction)
    if mix != "nomix":
        kwargs["mix_target"], kwargs["mix_weight"] = mixup(N, L, gen, per_row=(mix == "mix-rows"))
    loss = ops.bank_nce_loss(query, bank, target, **kwargs)
    want = oracles.bank_nce_loss(query, bank, target, **kwargs)
    assert loss.dtype == torch.float32
    assert loss.shape == (() if reduction == "mean" else (N,))
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.07, 0.5, 2.0])
def test_temperature_float64(temperature, gen):
    query, bank, target = inputs((4, 3, 5, 9), gen, torch.float64)
    loss = ops.bank_nce_loss(query, bank, target, temperature=temperature, reduction="none")
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, oracles.bank_nce_loss(query, bank, target, temperature=temperature,
                                                           reduction="none"), rtol=1e-10, atol=1e-10)


def test_bf16_bank(gen):
    query, bank, target = inputs((5, 3, 4, 60), gen)
    bank16 = bank.bfloat16()
    loss = ops.bank_nce_loss(query, bank16, target, reduction="none")
    torch.testing.assert_close(loss.double(), oracles.bank_nce_loss(query, bank16, target, reduction="none"),
                               rtol=1e-5, atol=1e-5)


def test_single_class_has_no_negatives(gen):
    """L=1: every term is -log(e^s / e^s) = 0; the gradient is 0 and finite."""
    query, bank, target = inputs((4, 1, 6, 7), gen)
    query.requires_grad_(True)
    mix_target, weight = mixup(4, 1, gen, per_row=True)
    loss = ops.bank_nce_loss(query, bank, target, mix_target=mix_target, mix_weight=weight)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert bool(torch.isfinite(query.grad).all()) and bool((query.grad == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("temperature", [0.07, 0.01])
def test_extreme_similarities_stay_finite(dtype, temperature, gen):
    """Queries equal to bank slots (cosine 1) of their own class, of another class, and the
    negation of a slot: logits of +-1/tau.  The loss and its gradient stay finite and match the
    oracle (which factors the max out of every log-sum-exp)."""
    L, S, D = 4, 3, 60
    bank = torch.randn(L, S, D, generator=gen).to(dtype)
    query = torch.stack([bank[0, 1], bank[2, 0] * 3.0, -bank[1, 2], bank[3, 2] * 1e-3,
                         bank[1, 0] + bank[2, 1]]).clone().requires_grad_(True)
    target = torch.tensor([0, 1, 1, 3, 2])
    mix_target = torch.tensor([2, 2, 0, 0, 1])
    weight = torch.tensor([0.25, 0.5, 1.0, 0.0, 0.75], dtype=dtype)
    loss = ops.bank_nce_loss(query, bank, target, temperature=temperature, mix_target=mix_target,
                             mix_weight=weight, reduction="none")
    loss.sum().backward()
    assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(query.grad).all())
    want = oracles.bank_nce_loss(query, bank, target, temperature=temperature, mix_target=mix_target,
                                 mix_weight=weight, reduction="none")
    # float32 cosines carry ~1e-7 error, scaled by 1/tau into the logits.
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(loss.double(), want, rtol=tol, atol=tol)


def test_zero_query_is_finite(gen):
    """A zero query has cosine 0 with every slot (norm floor), never NaN."""
    query, bank, target = inputs((3, 3, 4, 8), gen)
    query[1] = 0
    query.requires_grad_(True)
    loss = ops.bank_nce_loss(query, bank, target, reduction="none")
    loss.sum().backward()
    assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(query.grad).all())
    torch.testing.assert_close(loss.double(), oracles.bank_nce_loss(query, bank, target, reduction="none"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mix", ["nomix", "mix-scalar", "mix-rows"])
@pytest.mark.parametrize("shape", [(4, 3, 2, 6), (3, 2, 1, 5)], ids=["N4-L3-S2-D6", "N3-L2-S1-D5"])
def test_gradcheck_query(shape, mix, gen):
    N, L, S, D = shape
    query, bank, target = inputs(shape, gen, torch.float64)
    query.requires_grad_(True)
    kwargs = {}
    if mix != "nomix":
        kwargs["mix_target"], kwargs["mix_weight"] = mixup(N, L, gen, per_row=(mix == "mix-rows"))
        if isinstance(kwargs["mix_weight"], torch.Tensor):
            kwargs["mix_weight"] = kwargs["mix_weight"].double()
    assert torch.autograd.gradcheck(
        lambda q: ops.bank_nce_loss(q, bank, target, reduction="none", **kwargs), (query,))


def test_bank_gets_no_gradient(gen):
    query, bank, target = inputs((4, 3, 5, 6), gen)
    query.requires_grad_(True)
    bank.requires_grad_(True)
    mix_target, weight = mixup(4, 3, gen, per_row=False)
    ops.bank_nce_loss(query, bank, target, mix_target=mix_target, mix_weight=weight).backward()
    assert bank.grad is None
    assert query.grad is not None and bool(torch.isfinite(query.grad).all())


def test_mean_is_mean_of_rows(gen):
    query, bank, target = inputs((7, 5, 3, 13), gen)
    rows = ops.bank_nce_loss(query, bank, target, reduction="none")
    torch.testing.assert_close(ops.bank_nce_loss(query, bank, target), rows.mean())


def test_empty_rows_with_reduction_none(gen):
    _, bank, _ = inputs((1, 3, 2, 6), gen)
    loss = ops.bank_nce_loss(torch.zeros(0, 6), bank, torch.zeros(0, dtype=torch.long), reduction="none")
    assert loss.shape == (0,)


# ----------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("case, exc, name", [
    ("query-1d", ValueError, "query"),
    ("query-int", TypeError, "query"),
    ("query-empty-mean", ValueError, "query"),
    ("bank-2d", ValueError, "bank"),
    ("bank-dim", ValueError, "bank"),
    ("bank-device", ValueError, "bank"),
    ("bank-no-slots", ValueError, "bank"),
    ("target-float", TypeError, "target"),
    ("target-length", ValueError, "target"),
    ("target-high", ValueError, "target"),
    ("target-negative", ValueError, "target"),
    ("target-device", ValueError, "target"),
    ("temperature-zero", ValueError, "temperature"),
    ("temperature-str", TypeError, "temperature"),
    ("mix-target-alone", ValueError, "mix_target"),
    ("mix-target-high", ValueError, "mix_target"),
    ("mix-target-length", ValueError, "mix_target"),
    ("mix-weight-range", ValueError, "mix_weight"),
    ("mix-weight-rows-range", ValueError, "mix_weight"),
    ("mix-weight-length", ValueError, "mix_weight"),
    ("mix-weight-type", TypeError, "mix_weight"),
    ("reduction", ValueError, "reduction"),
])
def test_bad_inputs_name_the_argument(case, exc, name, gen):
    query, bank, target = inputs((4, 3, 2, 6), gen)
    kwargs = {}
    mix_target = torch.randint(3, (4,), generator=gen)
    if case == "query-1d":
        query = query[0]
    elif case == "query-int":
        query = query.long()
    elif case == "query-empty-mean":
        query, target = query[:0], target[:0]
    elif case == "bank-2d":
        bank = bank[0]
    elif case == "bank-dim":
        bank = bank[..., :5]
    elif case == "bank-device":
        bank = bank.to("meta")
    elif case == "bank-no-slots":
        bank = bank[:, :0]
    elif case == "target-float":
        target = target.float()
    elif case == "target-length":
        target = target[:3]
    elif case == "target-high":
        target[1] = 3
    elif case == "target-negative":
        target[2] = -1
    elif case == "target-device":
        target = target.to("meta")
    elif case == "temperature-zero":
        kwargs["temperature"] = 0.0
    elif case == "temperature-str":
        kwargs["temperature"] = "0.07"
    elif case == "mix-target-alone":
        kwargs["mix_target"] = mix_target
    elif case == "mix-target-high":
        mix_target[0] = 5
        kwargs.update(mix_target=mix_target, mix_weight=0.5)
    elif case == "mix-target-length":
        kwargs.update(mix_target=mix_target[:2], mix_weight=0.5)
    elif case == "mix-weight-range":
        kwargs.update(mix_target=mix_target, mix_weight=1.5)
    elif case == "mix-weight-rows-range":
        kwargs.update(mix_target=mix_target, mix_weight=torch.tensor([0.1, 0.2, -0.3, 0.4]))
    elif case == "mix-weight-length":
        kwargs.update(mix_target=mix_target, mix_weight=torch.rand(3, generator=gen))
    elif case == "mix-weight-type":
        kwargs.update(mix_target=mix_target, mix_weight="half")
    elif case == "reduction":
        kwargs["reduction"] = "sum"
    with pytest.raises(exc, match=rf"\b{name}\b"):  # the argument as a word, not inside the op name
        ops.bank_nce_loss(query, bank, target, **kwargs)
