"""The compiled EMA bank update (rca_fast._C: CPU twin, CUDA on a GPU) against the sequential loop.

Bit-for-bit equality with ``oracles.ema_update_`` (the row-by-row loop with float32 arithmetic):
repeated classes, wrap-around of the ring pointer, more than S rows of one class in one call,
float32/bfloat16/float16/float64 banks.  Also torch.library.opcheck and torch.compile tracing.
"""
import pytest
import torch

pytest.importorskip("rca_fast._C", reason="the extension rca_fast._C is not built "
                                           "(python setup.py build_ext --inplace)")

import oracles  # noqa: E402
from rca_fast import _ext, ops  # noqa: E402
from rca_fast.ops import _dispatch  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

# (L, S, D, N): several rows per class, S=1 (every row of a class revisits the one slot),
# N >> S (rows wrap around more than once), L=80, D=60, D=600 (several feature tiles on CUDA).
SHAPES = [(3, 5, 60, 9), (5, 1, 7, 12), (2, 3, 13, 20), (80, 4, 6, 50), (4, 7, 600, 33), (1, 2, 5, 1)]
SHAPE_IDS = [f"L{l}-S{s}-D{d}-N{n}" for l, s, d, n in SHAPES]


@pytest.fixture(autouse=True)
def extension_backend(monkeypatch):
    """Route rca_fast.ops through the extension (the 'cuda' provider also holds the CPU twin)."""
    monkeypatch.setenv("RCA_FAST_BACKEND", "cuda")


def make_inputs(shape, gen, bank_dtype, emb_dtype=torch.float32, device="cpu"):
    L, S, D, N = shape
    bank = torch.randn(L, S, D, generator=gen).to(bank_dtype)
    ptr = torch.randint(S, (L,), generator=gen)
    emb = (3 * torch.randn(N, D, generator=gen)).to(emb_dtype)
    # Few classes so that classes repeat (and, with N > S, wrap around) in one call.
    target = torch.randint(max(1, min(L, 3)), (N,), generator=gen)
    return [t.to(device) for t in (bank, ptr, emb, target)]


def expected(bank, ptr, emb, target, gamma):
    bank, ptr = bank.cpu().clone(), ptr.cpu().clone()
    oracles.ema_update_(bank, ptr, emb.cpu(), target.cpu(), gamma=gamma)
    return bank, ptr


def test_dispatch_uses_the_extension():
    assert _dispatch.backend_for("ema_update_", torch.device("cpu")) == "cuda"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["f32", "bf16", "f16", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_bit_exact_sequential_loop(shape, dtype, device, gen):
    bank, ptr, emb, target = make_inputs(shape, gen, dtype, device=device)
    gamma = float(torch.rand((), generator=gen))
    want_bank, want_ptr = expected(bank, ptr, emb, target, gamma)
    out = ops.ema_update_(bank, ptr, emb, target, gamma=gamma)
    assert out is bank
    assert torch.equal(ptr.cpu(), want_ptr)
    assert torch.equal(bank.cpu(), want_bank)  # bit for bit, not close


@pytest.mark.parametrize("device", DEVICES)
def test_rows_that_are_views_of_the_bank(device, gen):
    """emb = bank rows (a view): read as they were before the call, also by the one-launch kernel."""
    bank, ptr, _, _ = make_inputs((3, 5, 37, 0), gen, torch.float32, device=device)
    emb = bank[1, 1:4]                              # 3 rows of class 1 (a view of the bank)
    target = torch.tensor([1, 1, 2], device=device)  # the first rows overwrite slots emb reads
    ptr[1] = 2
    want_bank, want_ptr = expected(bank, ptr, emb.clone(), target, 0.7)
    ops.ema_update_(bank, ptr, emb, target, gamma=0.7)
    assert torch.equal(ptr.cpu(), want_ptr)
    assert torch.equal(bank.cpu(), want_bank)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("emb_dtype", [torch.bfloat16, torch.float64, torch.float16],
                         ids=["bf16", "f64", "f16"])
def test_emb_of_another_dtype(emb_dtype, device, gen):
    bank, ptr, emb, target = make_inputs((3, 4, 60, 11), gen, torch.float32, emb_dtype, device)
    want_bank, want_ptr = expected(bank, ptr, emb, target, 0.99)
    ops.ema_update_(bank, ptr, emb, target, gamma=0.99)
    assert torch.equal(bank.cpu(), want_bank) and torch.equal(ptr.cpu(), want_ptr)


@pytest.mark.parametrize("device", DEVICES)
def test_one_class_many_more_rows_than_slots(device, gen):
    """70 rows of class 1 into S=3: each slot is revisited 23-24 times, in row order."""
    L, S, D, N = 2, 3, 33, 70
    bank = torch.randn(L, S, D, generator=gen).to(device)
    ptr = torch.tensor([0, 2], device=device)
    emb = torch.randn(N, D, generator=gen).to(device)
    target = torch.ones(N, dtype=torch.long, device=device)
    want_bank, want_ptr = expected(bank, ptr, emb, target, 0.9)
    before = bank[0].clone()
    ops.ema_update_(bank, ptr, emb, target, gamma=0.9)
    assert torch.equal(bank.cpu(), want_bank) and torch.equal(ptr.cpu(), want_ptr)
    assert int(ptr[1]) == (2 + N) % S and torch.equal(bank[0], before)  # class 0 untouched


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gamma", [0.0, 1.0], ids=["gamma0", "gamma1"])
def test_gamma_extremes(gamma, device, gen):
    bank, ptr, emb, target = make_inputs((3, 5, 17, 8), gen, torch.float32, device=device)
    want_bank, want_ptr = expected(bank, ptr, emb, target, gamma)
    ops.ema_update_(bank, ptr, emb, target, gamma=gamma)
    assert torch.equal(bank.cpu(), want_bank) and torch.equal(ptr.cpu(), want_ptr)


@pytest.mark.parametrize("device", DEVICES)
def test_int32_targets_and_empty_call(device, gen):
    bank, ptr, emb, target = make_inputs((4, 6, 9, 10), gen, torch.float32, device=device)
    want_bank, want_ptr = expected(bank, ptr, emb, target, 0.5)
    _ext.ema_update_(bank, ptr, emb, target.int(), gamma=0.5)
    assert torch.equal(bank.cpu(), want_bank) and torch.equal(ptr.cpu(), want_ptr)
    before, ptr_before = bank.clone(), ptr.clone()
    _ext.ema_update_(bank, ptr, emb[:0], target[:0], gamma=0.5)
    assert torch.equal(bank, before) and torch.equal(ptr, ptr_before)


def test_bad_target_raises_from_ops(gen):
    bank, ptr, emb, target = make_inputs((3, 4, 5, 6), gen, torch.float32)
    target[2] = 3
    with pytest.raises(ValueError, match="target"):
        ops.ema_update_(bank, ptr, emb, target)


def test_opcheck(gen):
    bank, ptr, emb, target = make_inputs((3, 4, 10, 9), gen, torch.float32)
    torch.library.opcheck(torch.ops.rca_fast.ema_update_.default, (bank, ptr, emb, target, 0.9))


def test_torch_compile_traces_the_op(gen):
    bank, ptr, emb, target = make_inputs((3, 4, 10, 9), gen, torch.float32)
    want_bank, want_ptr = expected(bank, ptr, emb, target, 0.75)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(bank, ptr, emb, target):
        torch.ops.rca_fast.ema_update_(bank, ptr, emb * 1.0, target, 0.75)
        return bank.sum()

    step(bank, ptr, emb, target)
    assert torch.equal(bank, want_bank) and torch.equal(ptr, want_ptr)
