"""ema_update_: bit-for-bit the sequential loop (tests/oracles.py), pointers, bad inputs."""
import pytest
import torch

import oracles
from oracles import torch_backend_unless_forced  # noqa: F401  (autouse: torch backend)
from rca_fast import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
DTYPE_IDS = ["f32", "bf16", "f64"]


def run_both(bank, ptr, emb, target, gamma):
    """Apply the op to copies and the loop oracle to other copies; return both states."""
    got_bank, got_ptr = bank.clone(), ptr.clone()
    out = ops.ema_update_(got_bank, got_ptr, emb, target, gamma=gamma)
    assert out is got_bank  # updated in place and returned
    want_bank, want_ptr = bank.clone(), ptr.clone()
    oracles.ema_update_(want_bank, want_ptr, emb, target, gamma=gamma)
    return got_bank, got_ptr, want_bank, want_ptr


def assert_bitwise(got_bank, got_ptr, want_bank, want_ptr):
    assert got_bank.dtype == want_bank.dtype
    assert torch.equal(got_ptr, want_ptr)
    assert torch.equal(got_bank,
                       want_bank), f"max diff {(got_bank.double() - want_bank.double()).abs().max()}"


# (L, S, D, N): repeated classes, wrap-around (random start pointers), more rows of one class than
# slots (N >> S), a single slot (S=1).
SHAPES = [(3, 4, 60, 11), (5, 7, 13, 40), (2, 1, 9, 6), (80, 3, 6, 50), (1, 2, 5, 9)]
SHAPE_IDS = [f"L{l}-S{s}-D{d}-N{n}" for l, s, d, n in SHAPES]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bitwise_equal_to_sequential_loop(shape, dtype, gen):
    L, S, D, N = shape
    bank = torch.randn(L, S, D, generator=gen).to(dtype)
    ptr = torch.randint(S, (L,), generator=gen)
    emb = torch.randn(N, D, generator=gen)
    target = torch.randint(min(L, 3), (N,), generator=gen)  # few classes -> many repeats per class
    got = run_both(bank, ptr, emb, target, 0.99)
    assert_bitwise(*got)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_more_than_s_rows_of_one_class(dtype, gen):
    """9 rows of class 1 with S=4: slots p, p+1, ..., wrapping twice; the later rows see the
    earlier rows' results (slots revisited in order)."""
    L, S, D = 3, 4, 7
    bank = torch.randn(L, S, D, generator=gen).to(dtype)
    ptr = torch.tensor([0, 3, 2])
    emb = torch.randn(9, D, generator=gen)
    target = torch.full((9,), 1)
    got_bank, got_ptr, want_bank, want_ptr = run_both(bank, ptr, emb, target, 0.5)
    assert_bitwise(got_bank, got_ptr, want_bank, want_ptr)
    assert got_ptr.tolist() == [0, (3 + 9) % 4, 2]
    assert torch.equal(got_bank[0], bank[0]) and torch.equal(got_bank[2], bank[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_single_slot(dtype, gen):
    L, S, D, N = 2, 1, 6, 7
    bank = torch.randn(L, S, D, generator=gen).to(dtype)
    ptr = torch.zeros(L, dtype=torch.long)
    emb = torch.randn(N, D, generator=gen)
    target = torch.randint(L, (N,), generator=gen)
    got = run_both(bank, ptr, emb, target, 0.9)
    assert_bitwise(*got)
    assert got[1].tolist() == [0, 0]


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.99, 1.0])
def test_gamma_values(gamma, gen):
    L, S, D, N = 3, 5, 8, 12
    bank = torch.randn(L, S, D, generator=gen).bfloat16()
    ptr = torch.randint(S, (L,), generator=gen)
    emb = torch.randn(N, D, generator=gen)
    target = torch.randint(L, (N,), generator=gen)
    got = run_both(bank, ptr, emb, target, gamma)
    assert_bitwise(*got)
    if gamma == 1.0:
        assert torch.equal(got[0], bank)


def test_ptr_advances_by_rows_per_class(gen):
    L, S, D, N = 6, 5, 4, 23
    bank = torch.randn(L, S, D, generator=gen)
    ptr = torch.randint(S, (L,), generator=gen)
    target = torch.randint(L, (N,), generator=gen)
    new_ptr = ptr.clone()
    ops.ema_update_(bank, new_ptr, torch.randn(N, D, generator=gen), target)
    for c in range(L):
        assert int(new_ptr[c]) == (int(ptr[c]) + int((target == c).sum())) % S


def test_float32_equals_plain_user_loop(gen):
    """In float32 the contract's arithmetic is exactly the loop a user writes with torch."""
    L, S, D, N = 4, 3, 60, 17
    bank = torch.randn(L, S, D, generator=gen)
    ptr = torch.randint(S, (L,), generator=gen)
    emb = torch.randn(N, D, generator=gen)
    target = torch.randint(L, (N,), generator=gen)
    want_bank, want_ptr = bank.clone(), ptr.clone()
    for i in range(N):
        c = int(target[i])
        p = int(want_ptr[c])
        want_bank[c, p] = 0.99 * want_bank[c, p] + (1 - 0.99) * emb[i]
        want_ptr[c] = (p + 1) % S
    ops.ema_update_(bank, ptr, emb, target, gamma=0.99)
    assert torch.equal(bank, want_bank) and torch.equal(ptr, want_ptr)


def test_successive_calls_equal_one_loop(gen):
    L, S, D = 3, 4, 5
    bank = torch.randn(L, S, D, generator=gen).bfloat16()
    ptr = torch.randint(S, (L,), generator=gen)
    emb = torch.randn(15, D, generator=gen)
    target = torch.randint(L, (15,), generator=gen)
    got_bank, got_ptr = bank.clone(), ptr.clone()
    for lo, hi in ((0, 4), (4, 5), (5, 15)):
        ops.ema_update_(got_bank, got_ptr, emb[lo:hi], target[lo:hi])
    oracles.ema_update_(bank, ptr, emb, target)
    assert_bitwise(got_bank, got_ptr, bank, ptr)


def test_rows_that_are_views_of_the_bank(gen):
    """emb = bank rows (a view): read as they were before the call, as on the other backends."""
    bank = torch.randn(3, 5, 37, generator=gen)
    ptr = torch.tensor([0, 2, 4])
    emb, target = bank[1, 1:4], torch.tensor([1, 1, 2])  # the first rows overwrite slots emb reads
    want_bank, want_ptr = bank.clone(), ptr.clone()
    oracles.ema_update_(want_bank, want_ptr, emb.clone(), target, gamma=0.7)
    ops.ema_update_(bank, ptr, emb, target, gamma=0.7)
    assert_bitwise(bank, ptr, want_bank, want_ptr)


def test_no_rows_is_a_no_op(gen):
    bank = torch.randn(3, 4, 5, generator=gen)
    ptr = torch.tensor([1, 2, 3])
    before_bank, before_ptr = bank.clone(), ptr.clone()
    ops.ema_update_(bank, ptr, torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    assert torch.equal(bank, before_bank) and torch.equal(ptr, before_ptr)


@pytest.mark.parametrize("target_dtype", [torch.int32, torch.uint8])
def test_other_integer_targets(target_dtype, gen):
    bank = torch.randn(3, 4, 5, generator=gen)
    ptr = torch.randint(4, (3,), generator=gen)
    emb = torch.randn(8, 5, generator=gen)
    target = torch.randint(3, (8,), generator=gen)
    got = run_both(bank, ptr, emb, target.to(target_dtype), 0.99)
    assert_bitwise(*got)


# ----------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("case, exc, name", [
    ("bank-2d", ValueError, "bank"),
    ("bank-int", TypeError, "bank"),
    ("bank-requires-grad", ValueError, "bank"),
    ("bank-noncontiguous", ValueError, "bank"),
    ("ptr-int32", TypeError, "ptr"),
    ("ptr-length", ValueError, "ptr"),
    ("ptr-range", ValueError, "ptr"),
    ("ptr-device", ValueError, "ptr"),
    ("emb-1d", ValueError, "emb"),
    ("emb-dim", ValueError, "emb"),
    ("emb-nan", ValueError, "emb"),
    ("emb-device", ValueError, "emb"),
    ("target-float", TypeError, "target"),
    ("target-length", ValueError, "target"),
    ("target-range", ValueError, "target"),
    ("target-negative", ValueError, "target"),
    ("gamma-range", ValueError, "gamma"),
    ("gamma-str", TypeError, "gamma"),
    ("gamma-nan", ValueError, "gamma"),
])
def test_bad_inputs_name_the_argument(case, exc, name, gen):
    L, S, D, N = 3, 4, 5, 6
    bank = torch.randn(L, S, D, generator=gen)
    ptr = torch.zeros(L, dtype=torch.long)
    emb = torch.randn(N, D, generator=gen)
    target = torch.randint(L, (N,), generator=gen)
    kwargs = {}
    if case == "bank-2d":
        bank = bank[0]
    elif case == "bank-int":
        bank = bank.long()
    elif case == "bank-requires-grad":
        bank.requires_grad_(True)
    elif case == "bank-noncontiguous":
        bank = torch.randn(L, D, S, generator=gen).transpose(1, 2)
    elif case == "ptr-int32":
        ptr = ptr.int()
    elif case == "ptr-length":
        ptr = ptr[:2]
    elif case == "ptr-range":
        ptr[1] = S
    elif case == "ptr-device":
        ptr = ptr.to("meta")
    elif case == "emb-1d":
        emb = emb[0]
    elif case == "emb-dim":
        emb = emb[:, :4]
    elif case == "emb-nan":
        emb[2, 3] = float("nan")
    elif case == "emb-device":
        emb = emb.to("meta")
    elif case == "target-float":
        target = target.float()
    elif case == "target-length":
        target = target[:5]
    elif case == "target-range":
        target[0] = L
    elif case == "target-negative":
        target[0] = -1
    elif case == "gamma-range":
        kwargs["gamma"] = 1.5
    elif case == "gamma-str":
        kwargs["gamma"] = "0.99"
    elif case == "gamma-nan":
        kwargs["gamma"] = float("nan")
    before = bank.detach().clone()
    with pytest.raises(exc, match=rf"\b{name}\b"):  # the argument as a word, not inside the op name
        ops.ema_update_(bank, ptr, emb, target, **kwargs)
    assert torch.equal(bank.detach(), before)  # a rejected call leaves the bank alone
