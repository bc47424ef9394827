"""Triton bank NCE (kernels/nce/: forward.py, backward.py) against rca_fast.ref: forward and d(query).

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1): the
shapes are small and odd on purpose (D=60 over two D chunks, S=37 over three slot tiles and several
slot chunks per class, N=19 over two row blocks, S=1, L=1, L=80).  The oracle is
``rca_fast.ref.nce.bank_nce_loss`` run in float64 on the same (upcast) inputs.  GPU tests (marker
``gpu``; ``python -m pytest tests -m gpu``) use full sizes and the rule "our error against float64
<= 2x the error of rca_fast.ref run in the same dtype, plus a small floor".
"""
import math

import pytest
import torch

import oracles
from rca_fast import ops
from rca_fast.ops import _dispatch
from rca_fast.ref.nce import bank_nce_loss as ref_nce

nce = pytest.importorskip("rca_fast.kernels.nce.forward")

# (N, L, S, D, query dtype, bank dtype, mixup): every dot scheme of nce_tile.dot_mode appears
CASES = [
    (5, 3, 37, 60, torch.float32, torch.float32, "rows"),      # tf32x3 dots, 3 slot chunks
    (19, 4, 37, 60, torch.float32, torch.bfloat16, "scalar"),  # 3-part bf16 split, 2 row blocks
    (6, 3, 21, 40, torch.bfloat16, torch.bfloat16, "rows"),    # native bf16
    (6, 3, 21, 40, torch.float16, torch.float16, "none"),      # native fp16
    (6, 3, 21, 40, torch.float16, torch.bfloat16, "0d"),       # 2-part bf16 split
    (6, 3, 21, 40, torch.float32, torch.float16, "rows"),      # fp16 bank via tf32x3
    (7, 80, 1, 20, torch.float32, torch.float32, "rows"),      # S=1, many classes
    (4, 2, 1, 16, torch.float32, torch.float32, "none"),       # one negative slot in all
]
DT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
CASE_IDS = [f"N{n}-L{l}-S{s}-D{d}-q{DT[qd]}-m{DT[md]}-mix{mix}" for n, l, s, d, qd, md, mix in CASES]


def make_inputs(N, L, S, D, qdtype, mdtype, mix, gen):
    query = torch.randn(N, D, generator=gen).to(qdtype)
    bank = torch.randn(L, S, D, generator=gen).to(mdtype)
    target = torch.randint(L, (N,), generator=gen)
    kwargs = {}
    if mix != "none":
        kwargs["mix_target"] = torch.randint(L, (N,), generator=gen)
        kwargs["mix_weight"] = {"rows": torch.rand(N, generator=gen),
                                "0d": torch.rand((), generator=gen),
                                "scalar": float(torch.rand((), generator=gen))}[mix]
    return query, bank, target, kwargs


def float64_reference(query, bank, target, kwargs, upstream, temperature=0.07):
    """Loss rows and d(sum upstream * rows)/d query of rca_fast.ref in float64."""
    q = query.detach().double().requires_grad_(True)
    kw = dict(kwargs)
    if isinstance(kw.get("mix_weight"), torch.Tensor):
        kw["mix_weight"] = kw["mix_weight"].double()
    rows = ref_nce(q, bank.double(), target, temperature=temperature, reduction="none", **kw)
    (grad,) = torch.autograd.grad((rows * upstream.double()).sum(), q)
    return rows.detach(), grad


def triton_rows_and_grad(query, bank, target, kwargs, upstream, temperature=0.07):
    q = query.detach().clone().requires_grad_(True)
    rows = nce.bank_nce_loss(q, bank, target, temperature=temperature, reduction="none", **kwargs)
    (grad,) = torch.autograd.grad((rows * upstream).sum(), q)
    return rows.detach(), grad


def assert_grad_close(grad, want, qdtype):
    """Elementwise closeness scaled by the largest entry; the gradient is returned in the query's
    dtype, so bf16/fp16 queries carry that dtype's rounding (as the reference's gradient does)."""
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[qdtype]
    scale = want.abs().max().item()
    assert grad.dtype == qdtype and grad.shape == want.shape
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), want, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_and_grad_match_reference(case, gen):
    N, L, S, D, qdtype, mdtype, mix = case
    query, bank, target, kwargs = make_inputs(N, L, S, D, qdtype, mdtype, mix, gen)
    upstream = torch.randn(N, generator=gen)
    rows, grad = triton_rows_and_grad(query, bank, target, kwargs, upstream)
    want_rows, want_grad = float64_reference(query, bank, target, kwargs, upstream)
    assert rows.dtype == torch.float32 and rows.shape == (N,)
    torch.testing.assert_close(rows.double(), want_rows, rtol=2e-6, atol=2e-6)
    assert_grad_close(grad, want_grad, qdtype)


@pytest.mark.parametrize("temperature", [0.05, 0.2])
@pytest.mark.parametrize("mix", ["rows", "scalar"])
def test_mixup_temperature_forward_and_grad(temperature, mix, gen):
    """Mixup away from the default tau = 0.07: a kernel (forward or backward) that ignored the
    temperature or used the default passes every tau = 0.07 case.  Forward rows against the float64
    literal loop of tests/oracles.py, the gradient against the float64 reference's autograd."""
    N, L, S, D = 6, 3, 11, 24
    query, bank, target, kwargs = make_inputs(N, L, S, D, torch.float32, torch.float32, mix, gen)
    upstream = torch.randn(N, generator=gen)
    rows, grad = triton_rows_and_grad(query, bank, target, kwargs, upstream, temperature)
    want_rows = oracles.bank_nce_loss(query, bank, target, temperature=temperature, reduction="none",
                                      **kwargs)
    _, want_grad = float64_reference(query, bank, target, kwargs, upstream, temperature)
    torch.testing.assert_close(rows.double(), want_rows, rtol=2e-6, atol=2e-6)
    assert_grad_close(grad, want_grad, torch.float32)


def test_public_op_dispatches_to_triton(monkeypatch, gen):
    monkeypatch.setenv("RCA_FAST_BACKEND", "triton")
    assert ops.backend_for("bank_nce_loss", torch.device("cpu")) == "triton"
    query, bank, target, kwargs = make_inputs(5, 3, 19, 24, torch.float32, torch.float32, "rows", gen)
    query.requires_grad_(True)
    loss = ops.bank_nce_loss(query, bank, target, **kwargs)          # reduction="mean"
    assert loss.shape == () and loss.dtype == torch.float32
    # the loss came out of the Triton custom op (mean over its rows), not out of the reference
    assert "rca_fast_nce_fwd" in type(loss.grad_fn.next_functions[0][0]).__name__
    loss.backward()
    want_rows, want_grad = float64_reference(query, bank, target, kwargs, torch.full((5,), 1 / 5))
    torch.testing.assert_close(loss.double(), want_rows.mean(), rtol=2e-6, atol=2e-6)
    assert_grad_close(query.grad, want_grad, torch.float32)
    with pytest.raises(ValueError, match="target"):  # validation still runs before the kernel
        ops.bank_nce_loss(query, bank, torch.full((5,), 3))


def extreme_draw(temperature, gen):
    """One draw of the extreme case (see the test): checks the loss rows and returns (our max
    gradient error, the fp32 reference's, the largest gradient entry), all against float64."""
    N, L, S, D = 5, 3, 21, 36
    e = torch.randn(D, generator=gen)
    directions = torch.stack([e, -e, -e])
    target = torch.tensor([0, 1, 2, 0, 1])
    noise = 1e-3  # keeps the gradients (which vanish at exactly +-1) away from pure rounding
    query = directions[target] * (1 + torch.arange(N, dtype=torch.float32))[:, None] \
        + noise * torch.randn(N, D, generator=gen)
    bank = directions[:, None, :] * (1 + torch.rand(L, S, 1, generator=gen)) \
        + noise * torch.randn(L, S, D, generator=gen)
    kwargs = dict(mix_target=(target + 1) % L, mix_weight=0.25)
    upstream = torch.randn(N, generator=gen)
    rows, grad = triton_rows_and_grad(query, bank, target, kwargs, upstream, temperature)
    want_rows, want_grad = float64_reference(query, bank, target, kwargs, upstream, temperature)
    assert torch.isfinite(rows).all() and want_rows.max() > 1.5 / temperature
    torch.testing.assert_close(rows.double(), want_rows, rtol=1e-5, atol=1e-5)
    q32 = query.clone().requires_grad_(True)
    ref_rows = ref_nce(q32, bank, target, temperature=temperature, reduction="none", **kwargs)
    (ref_grad,) = torch.autograd.grad((ref_rows * upstream).sum(), q32)
    return ((grad.double() - want_grad).abs().max().item(),
            (ref_grad.double() - want_grad).abs().max().item(),
            want_grad.abs().max().item())


@pytest.mark.parametrize("temperature", [0.07, 0.01])
def test_extreme_similarities_are_stable(temperature, gen):
    """Cosines of +-1 (s = +-100 at tau = 0.01: exp(s) overflows fp32): class directions e, -e, -e.
    Class-0 rows see positives at +1/tau and every negative at -1/tau (loss ~ e^(-2/tau), kept by
    the accurate softplus); class-1 rows see class 2's slots at +1/tau too; with mixup to the next
    class, class-0 rows get positives at -1/tau against negatives at +1/tau (loss ~ 2/tau + log S).

    Near +-1 cosines the gradient is a difference of nearly parallel vectors (the tangent
    projection of the normalisation), so fp32 itself loses digits: we are held to the fp32
    reference's own error.  Both errors are rounding noise of the same size (ours / the
    reference's: median 0.66 over 300 draws), so one draw's ratio passed 2 in 2% of the draws;
    summed over 8 draws the worst ratio in 20,000 resamplings of those 300 draws was 1.41."""
    draws = [extreme_draw(temperature, gen) for _ in range(8)]
    ours, theirs, scale = (sum(d[i] for d in draws) for i in range(3))
    # summed over the draws the floor can be 10x below the one-tensor floor
    oracles.assert_within_twice_ref_error(ours, theirs, scale, floor=0.1 * oracles.REL_ERROR_FLOOR,
                                          what="grad, 8 draws")


def test_zero_query_and_zero_slot_give_no_nan(gen):
    N, L, S, D = 4, 3, 17, 20
    query, bank, target, kwargs = make_inputs(N, L, S, D, torch.float32, torch.float32, "rows", gen)
    query[1] = 0.0
    bank[0, 3] = 0.0
    bank[2, :] = 0.0  # a whole class of zero slots: similarity 0 everywhere
    upstream = torch.randn(N, generator=gen)
    rows, grad = triton_rows_and_grad(query, bank, target, kwargs, upstream)
    want_rows, want_grad = float64_reference(query, bank, target, kwargs, upstream)
    torch.testing.assert_close(rows.double(), want_rows, rtol=2e-6, atol=2e-6)
    # the zero row's gradient is (dL/dqn) / eps as F.normalize's: huge but finite, compare relatively
    for n in range(N):
        assert_grad_close(grad[n:n + 1], want_grad[n:n + 1], torch.float32)


@pytest.mark.parametrize("mix", ["none", "rows"])
def test_single_class_has_zero_loss_and_zero_grad(mix, gen):
    query, bank, target, kwargs = make_inputs(5, 1, 9, 20, torch.float32, torch.float32, mix, gen)
    rows, grad = triton_rows_and_grad(query, bank, target, kwargs, torch.randn(5, generator=gen))
    assert torch.equal(rows, torch.zeros(5))
    assert torch.equal(grad, torch.zeros_like(grad))


def test_strided_inputs_and_empty_rows(gen):
    big_query = torch.randn(6, 50, generator=gen)
    big_bank = torch.randn(3, 40, 33, generator=gen)
    query, bank = big_query[:, 5:35], big_bank[:, ::2, 1:31]  # non-contiguous views
    target = torch.randint(3, (6,), generator=gen)
    upstream = torch.randn(6, generator=gen)
    rows, grad = triton_rows_and_grad(query, bank, target, {}, upstream)
    want_rows, want_grad = float64_reference(query, bank, target, {}, upstream)
    torch.testing.assert_close(rows.double(), want_rows, rtol=2e-6, atol=2e-6)
    assert_grad_close(grad, want_grad, torch.float32)
    empty = torch.zeros(0, 30, requires_grad=True)
    out = nce.bank_nce_loss(empty, bank, torch.zeros(0, dtype=torch.long), reduction="none")
    assert out.shape == (0,)
    out.sum().backward()
    assert empty.grad.shape == (0, 30)


def test_bank_gets_no_gradient_and_float64_uses_reference(gen, monkeypatch):
    query, bank, target, kwargs = make_inputs(3, 2, 5, 16, torch.float32, torch.float32, "rows", gen)
    bank.requires_grad_(True)
    query.requires_grad_(True)
    nce.bank_nce_loss(query, bank, target, **kwargs).backward()
    assert bank.grad is None and query.grad is not None
    q64, m64 = query.detach().double(), bank.detach().double()
    # float64 goes to the reference, by the dispatcher (the kernel has no float64 path): even with
    # Triton forced; checked against the literal loop, not against that reference
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    assert ops.backend_for("bank_nce_loss", q64.device, (q64.dtype, m64.dtype)) == "torch"
    got = ops.bank_nce_loss(q64, m64, target, reduction="none", **kwargs)
    assert got.dtype == torch.float64
    want = oracles.bank_nce_loss(q64, m64, target, reduction="none", **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_opcheck_custom_ops(gen):
    query, bank, target, _ = make_inputs(3, 2, 5, 16, torch.float32, torch.float32, "none", gen)
    mix_target = torch.randint(2, (3,), generator=gen)
    weights = torch.rand(3, generator=gen)
    query.requires_grad_(True)
    torch.library.opcheck(torch.ops.rca_fast.nce_fwd.default,
                          (query, bank, target, mix_target, weights, 0.07),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    rows, stats = torch.ops.rca_fast.nce_fwd(query.detach(), bank, target, None, None, 0.5)
    torch.library.opcheck(torch.ops.rca_fast.nce_bwd.default,
                          (torch.ones(3), query.detach(), bank, target, None, None, stats, 0.5),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph(gen):
    """No graph break through the provider and its autograd (aot_eager: no C++ compiler on CPU CI)."""
    query, bank, target, kwargs = make_inputs(4, 3, 9, 16, torch.float32, torch.float32, "rows", gen)

    def step(q):
        return nce.bank_nce_loss(q, bank, target, **kwargs)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    q1 = query.clone().requires_grad_(True)
    q2 = query.clone().requires_grad_(True)
    loss1, loss2 = compiled(q1), step(q2)
    loss1.backward()
    loss2.backward()
    torch.testing.assert_close(loss1, loss2)
    torch.testing.assert_close(q1.grad, q2.grad)
    # and both are right, not just equal: against the float64 reference
    want_rows, want_grad = float64_reference(query, bank, target, kwargs, torch.full((4,), 1 / 4))
    torch.testing.assert_close(loss1.double(), want_rows.mean(), rtol=2e-6, atol=2e-6)
    assert_grad_close(q1.grad, want_grad, torch.float32)


# ------------------------------------------------------------------------------------------- GPU
def assert_gpu_error_within_twice_reference(query, bank, target, kwargs, upstream, temperature=0.07):
    """Rows and grads of the Triton kernels within twice the same-dtype reference's error against
    float64 (the rows at the default floor; the grads, through exp, at the GPU's approximate one)."""
    want_rows, want_grad = float64_reference(query, bank, target, kwargs, upstream, temperature)
    rows, grad = triton_rows_and_grad(query, bank, target, kwargs, upstream, temperature)
    q = query.detach().clone().requires_grad_(True)
    ref_rows = ref_nce(q, bank, target, temperature=temperature, reduction="none", **kwargs)
    (ref_grad,) = torch.autograd.grad((ref_rows * upstream).sum(), q)
    oracles.assert_close_as_reference(rows, ref_rows, want_rows, what="rows")
    oracles.assert_close_as_reference(grad, ref_grad, want_grad, floor=oracles.GPU_APPROX_ERROR_FLOOR,
                                      what="grad")


GPU_CASES = [  # (N, L, S, D, query dtype, bank dtype)
    (512, 1000, 1000, 512, torch.bfloat16, torch.bfloat16),
    (512, 1000, 1000, 512, torch.float32, torch.bfloat16),
    (256, 200, 500, 512, torch.float32, torch.float32),
    (4096, 64, 250, 1024, torch.float32, torch.float32),
    (16, 20, 500, 512, torch.float32, torch.float32),     # VOC defaults
    (33, 21, 37, 1000, torch.bfloat16, torch.bfloat16),   # odd sizes at full D
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES,
                         ids=[f"N{n}-L{l}-S{s}-D{d}-q{DT[q]}-m{DT[m]}" for n, l, s, d, q, m in GPU_CASES])
def test_gpu_error_within_twice_reference(case, gen):
    N, L, S, D, qdtype, mdtype = case
    query, bank, target, kwargs = make_inputs(N, L, S, D, qdtype, mdtype, "rows", gen)
    dev = torch.device("cuda")
    query, bank, target = query.to(dev), bank.to(dev), target.to(dev)
    kwargs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    upstream = torch.randn(N, generator=gen).to(dev)
    assert_gpu_error_within_twice_reference(query, bank, target, kwargs, upstream)


@pytest.mark.gpu
def test_gpu_extreme_and_single_class(gen):
    dev = torch.device("cuda")
    N, L, S, D = 64, 50, 300, 512
    query = torch.randn(N, D, generator=gen)
    target = torch.randint(L, (N,), generator=gen)
    bank = torch.randn(L, S, D, generator=gen)
    bank[target] = query[:, None, :] * (1 + torch.rand(N, S, 1, generator=gen))  # s = +1/tau
    query, bank, target = query.to(dev), bank.to(dev), target.to(dev)
    for temperature in (0.07, 0.01):
        assert_gpu_error_within_twice_reference(query, bank, target, {}, torch.ones(N, device=dev),
                                                temperature)
    q = query.clone().requires_grad_(True)
    rows = nce.bank_nce_loss(q, bank[:1].contiguous(), torch.zeros(N, dtype=torch.long, device=dev),
                             reduction="none")
    rows.sum().backward()
    assert torch.equal(rows, torch.zeros_like(rows)) and torch.equal(q.grad, torch.zeros_like(q.grad))


@pytest.mark.gpu
def test_gpu_no_similarity_matrix_and_compile():
    dev = torch.device("cuda")
    N, L, S, D = 512, 1000, 1000, 512
    query = torch.randn(N, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    bank = torch.randn(L, S, D, device=dev, dtype=torch.bfloat16)
    target = torch.randint(L, (N,), device=dev)
    mix_target = torch.randint(L, (N,), device=dev)
    weights = torch.rand(N, device=dev)
    nce.bank_nce_loss(query, bank, target, mix_target=mix_target, mix_weight=weights).backward()  # autotune
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    nce.bank_nce_loss(query, bank, target, mix_target=mix_target, mix_weight=weights).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 64 * 2 ** 20, extra  # the similarities alone would be N * L * S * 4 = 2 GB
    step = lambda q: nce.bank_nce_loss(q, bank, target, mix_target=mix_target, mix_weight=weights)  # noqa: E731
    compiled = torch.compile(step, fullgraph=True)
    got = compiled(query)
    torch.testing.assert_close(got, step(query))
    # not only equal to eager: within 2x the bf16 reference's error against float64 (+ a floor)
    kw = dict(mix_target=mix_target, mix_weight=weights)
    want = ref_nce(query.detach().double(), bank.double(), target, mix_target=mix_target,
                   mix_weight=weights.double())
    same_dtype = ref_nce(query.detach(), bank, target, **kw)
    assert math.isfinite(float(got))
    oracles.assert_close_as_reference(got, same_dtype, want, what="compiled loss")
