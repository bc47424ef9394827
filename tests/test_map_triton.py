"""The Triton masked average pooling (kernels/map/) against rca_fast.ref and the loop oracle.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), with the interpreter's
small tiles (16/32 wide, 2 classes a pass), so the odd shapes below cross several D blocks,
H*W tiles with ragged tails, and more present classes than one pass holds.  The tests marked
``gpu`` repeat the comparison at the benchmark's size in float32 and bfloat16 with the rule
"our error against a float64 reference <= 2x the error of rca_fast.ref in the same dtype".
"""
import pytest
import torch

import oracles
from rca_fast import ops
from rca_fast.ops import _dispatch
from rca_fast.ref import masked_average_pool as ref_map

kmap = pytest.importorskip("rca_fast.kernels.map.forward")
kmap_bwd = pytest.importorskip("rca_fast.kernels.map.backward")

OP = "masked_average_pool"
DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (B, L, D, H, W): non-powers of two on purpose; L=80 is COCO.
SHAPES = [(2, 3, 60, 7, 13), (3, 5, 33, 1, 6), (2, 80, 6, 5, 3), (1, 4, 17, 9, 1)]
SHAPE_IDS = [f"B{b}-L{l}-D{d}-HW{h}x{w}" for b, l, d, h, w in SHAPES]


def make_inputs(shape, gen, dtype=torch.float64, cam_dtype=None, labels=True):
    """Random features/CAMs, one constant CAM (empty mask), one CAM with ties at its mean, labels
    with an image holding three present classes (more than one interpreter pass) and an absent
    pair."""
    B, L, D, H, W = shape
    features = torch.randn(B, D, H, W, generator=gen, dtype=torch.float64).to(dtype)
    cams = torch.randn(B, L, H, W, generator=gen, dtype=torch.float64).to(cam_dtype or dtype)
    cams[-1, L // 2] = 0.3                                # constant map: empty region
    # a map with pixels exactly at its mean (0, as is the first pixel): +1 x k, -1 x k, rest 0;
    # only the +1 pixels are in the region (a ">=" would take the ties too)
    k = (H * W - 1) // 3
    ties = torch.zeros(H * W, dtype=cams.dtype)
    ties[1:1 + k] = 1
    ties[1 + k:1 + 2 * k] = -1
    cams[0, 1] = ties.reshape(H, W)
    lab = None
    if labels:
        lab = torch.rand(B, L, generator=gen) < 0.5
        lab[0, :3] = True                                 # three present classes in image 0
        lab[-1, L // 2] = True                            # the empty region is present
        if L > 1:
            lab[-1, (L // 2 + 1) % L] = False             # and an absent pair
    return features.to(DEV), cams.to(DEV), None if lab is None else lab.to(DEV)


def run_both(features, cams, labels, upstream):
    """(emb, count, grad) of the Triton provider and of the reference."""
    out = []
    for fn in (kmap.masked_average_pool, ref_map):
        f = features.detach().clone().requires_grad_(True)
        emb, count = fn(f, cams, labels)
        (grad,) = torch.autograd.grad(emb, f, upstream)
        out.append((emb.detach(), count, grad))
    return out


@pytest.fixture
def force_triton(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")


def test_backend_is_triton(force_triton):
    assert ops.backend_for(OP, torch.device(DEV)) == "triton"
    assert _dispatch.implementation(OP, torch.device(DEV)) is kmap.masked_average_pool


@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "nolabels"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_reference_float64(shape, with_labels, gen):
    features, cams, labels = make_inputs(shape, gen, labels=with_labels)
    upstream = torch.randn(shape[0], shape[1], shape[2], generator=gen, dtype=torch.float64).to(DEV)
    (emb, count, grad), (want_emb, want_count, want_grad) = run_both(features, cams, labels, upstream)
    assert emb.dtype == torch.float64 and count.dtype == torch.int64
    assert torch.equal(count, want_count)
    torch.testing.assert_close(emb, want_emb, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)
    assert not torch.isnan(emb).any() and not torch.isnan(grad).any()
    B, L = shape[:2]
    assert int(count[-1, L // 2]) == 0 and bool((emb[-1, L // 2] == 0).all())   # empty region
    if labels is not None:
        assert bool((emb[~labels] == 0).all()) and bool((count[~labels] == 0).all())


@pytest.mark.parametrize("labels_kind", ["bool", "int01", None])
def test_public_op_matches_loop_oracle(labels_kind, force_triton, gen):
    """Through rca_fast.ops (validation + dispatch) against the float64 literal-loop oracle."""
    shape = (2, 3, 5, 7, 13)
    features, cams, labels = make_inputs(shape, gen, dtype=torch.float32, labels=labels_kind is not None)
    if labels_kind == "int01":
        labels = labels.long()
    emb, count = ops.masked_average_pool(features, cams, labels)
    want_emb, want_count = oracles.masked_average_pool(features.cpu(), cams.cpu(),
                                                       None if labels is None else labels.cpu())
    assert emb.dtype == torch.float32
    assert torch.equal(count.cpu(), want_count)
    torch.testing.assert_close(emb.double().cpu(), want_emb, rtol=1e-5, atol=1e-6)


def test_gradient_matches_loop_weights(force_triton, gen):
    """d sum(emb * g) / d features[b, :, h, w] = sum of g[b, l] / count over the masks holding
    the pixel, written as literal loops (independent of the reference's autograd)."""
    B, L, D, H, W = 2, 3, 4, 5, 7
    features, cams, labels = make_inputs((B, L, D, H, W), gen)
    features.requires_grad_(True)
    upstream = torch.randn(B, L, D, generator=gen, dtype=torch.float64).to(DEV)
    emb, count = ops.masked_average_pool(features, cams, labels)
    (emb * upstream).sum().backward()
    c = cams.cpu().tolist()
    want = torch.zeros(B, D, H, W, dtype=torch.float64)
    for b in range(B):
        for l in range(L):
            if not bool(labels[b, l]):
                continue
            first = c[b][l][0][0]
            shifted = [[c[b][l][h][w] - first for w in range(W)] for h in range(H)]
            mean = sum(shifted[h][w] for h in range(H) for w in range(W)) / (H * W)
            for h in range(H):
                for w in range(W):
                    if shifted[h][w] > mean:
                        for d in range(D):
                            want[b, d, h, w] += float(upstream[b, l, d]) / int(count[b, l])
    torch.testing.assert_close(features.grad.cpu(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_narrow_dtypes_match_reference(dtype, gen):
    """float32 CAMs, narrower features: fp32 accumulation, so our result equals the reference's
    to the output dtype's rounding, and counts are exact."""
    shape = (2, 5, 60, 7, 13)
    features, cams, labels = make_inputs(shape, gen, dtype=dtype, cam_dtype=torch.float32)
    upstream = torch.randn(2, 5, 60, generator=gen).to(DEV, dtype)
    (emb, count, grad), (want_emb, want_count, want_grad) = run_both(features, cams, labels, upstream)
    assert emb.dtype == dtype and grad.dtype == dtype
    assert torch.equal(count, want_count)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(emb.float(), want_emb.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("cam_dtype", [torch.bfloat16, torch.float16], ids=["cam-bf16", "cam-f16"])
def test_narrow_cams_give_the_reference_masks(cam_dtype, gen):
    """The mask is decided in float64 like the reference (a bf16 map with many equal values)."""
    shape = (2, 4, 9, 11, 13)
    features, cams, labels = make_inputs(shape, gen, dtype=torch.float32, cam_dtype=cam_dtype)
    cams = (cams * 4).round() / 4                         # ties with the mean are likely
    upstream = torch.randn(2, 4, 9, generator=gen).to(DEV)
    (emb, count, grad), (want_emb, want_count, want_grad) = run_both(features, cams, labels, upstream)
    assert torch.equal(count, want_count)
    torch.testing.assert_close(emb, want_emb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["channels_last", "spatial_slice", "expanded_grad"])
def test_strided_inputs(layout, gen):
    shape = (2, 3, 20, 6, 7)
    features, cams, labels = make_inputs(shape, gen)
    upstream = torch.randn(2, 3, 20, generator=gen, dtype=torch.float64).to(DEV)
    if layout == "channels_last":
        features = features.to(memory_format=torch.channels_last)
        cams = cams.to(memory_format=torch.channels_last)
    elif layout == "spatial_slice":     # H and W cannot be walked as one index: copied first
        big_f = torch.randn(2, 20, 9, 11, generator=gen, dtype=torch.float64).to(DEV)
        big_c = torch.randn(2, 3, 9, 11, generator=gen, dtype=torch.float64).to(DEV)
        features, cams = big_f[:, :, 1:7, 2:9], big_c[:, :, 2:8, 3:10]
    else:                               # upstream gradient with stride 0 (as from .sum())
        upstream = torch.randn(1, 1, 1, generator=gen, dtype=torch.float64).to(DEV).expand(2, 3, 20)
    (emb, count, grad), (want_emb, want_count, want_grad) = run_both(features, cams, labels, upstream)
    assert torch.equal(count, want_count)
    torch.testing.assert_close(emb, want_emb, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)
    if layout == "channels_last":      # the gradient keeps the features' layout
        assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(2, 3, 0, 3, 4), (2, 3, 5, 1, 1), (2, 1, 5, 2, 3)],
                         ids=["B2-L3-D0-HW3x4", "B2-L3-D5-HW1x1", "B2-L1-D5-HW2x3"])
def test_degenerate_sizes(shape, gen):
    B, L, D, H, W = shape
    features = torch.randn(B, D, H, W, generator=gen, dtype=torch.float64).to(DEV)
    cams = torch.randn(B, L, H, W, generator=gen, dtype=torch.float64).to(DEV)
    labels = torch.ones(B, L, dtype=torch.bool, device=DEV)
    upstream = torch.randn(B, L, D, generator=gen, dtype=torch.float64).to(DEV)
    for lab in (labels, None):
        (emb, count, grad), (want_emb, want_count, want_grad) = run_both(features, cams, lab, upstream)
        assert torch.equal(count, want_count)
        torch.testing.assert_close(emb, want_emb, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)


def _gpu_candidates():
    """(kind, slots, fp64, config) of every autotuning candidate the GPU may pick."""
    out = []
    for fp64 in (False, True):
        for slots in (4, 8):
            out += [("fwd", slots, fp64, c) for c in kmap._fwd_configs(slots, fp64)]
        out += [("bwd", slots, fp64, c) for slots in (4, 8) for c in kmap_bwd._bwd_configs(fp64, slots)]
    return out


GPU_CANDIDATES = _gpu_candidates()


@pytest.mark.skipif(DEV == "cuda", reason="on a GPU the autotuner runs every candidate itself")
@pytest.mark.parametrize("kind, slots, fp64, config", GPU_CANDIDATES, ids=[
    f"{k}-S{s}-{'f64' if f else 'f32'}-" + "-".join(f"{n}{v}" for n,
                                                    v in c.kwargs.items()) + f"-w{c.num_warps}"
    for k, s, f, c in GPU_CANDIDATES])
def test_gpu_configs_in_interpreter(kind, slots, fp64, config, gen):
    """The GPU's tile sizes (wider than the interpreter's) on a shape with ragged tails:
    B2-L6-D21-HW13x17 has 221 pixels, 5 present classes in image 0 (two passes at 4 slots)."""
    B, L, D, H, W = 2, 6, 21, 13, 17
    dtype = torch.float64 if fp64 else torch.float32
    features, cams, labels = make_inputs((B, L, D, H, W), gen, dtype=dtype)
    labels[0, :5] = True
    want_emb, want_count = ref_map(features, cams, labels)
    if kind == "fwd":
        emb, count, _ = kmap._launch_fwd(features, cams, labels, config=config, slots=slots)
        assert torch.equal(count, want_count)
        torch.testing.assert_close(emb, want_emb, rtol=1e-5, atol=1e-6)
        return
    _, count, mean = kmap._launch_fwd(features, cams, labels)
    upstream = torch.randn(B, L, D, generator=gen, dtype=torch.float64).to(DEV, dtype)
    grad = kmap_bwd._launch_bwd(upstream, cams, labels, mean, count, False, config=config, slots=slots)
    f = features.clone().requires_grad_(True)
    (want_grad,) = torch.autograd.grad(ref_map(f, cams, labels)[0], f, upstream)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_all_absent_and_cams_get_no_gradient(gen):
    B, L, D, H, W = 2, 3, 5, 4, 6
    features, cams, _ = make_inputs((B, L, D, H, W), gen)
    labels = torch.zeros(B, L, dtype=torch.bool, device=DEV)
    labels[1, 2] = True
    features.requires_grad_(True)
    cams.requires_grad_(True)
    emb, count = kmap.masked_average_pool(features, cams, labels)
    assert bool((emb[0] == 0).all()) and bool((count[0] == 0).all())
    emb.sum().backward()
    assert cams.grad is None
    assert bool((features.grad[0] == 0).all()) and not torch.isnan(features.grad).any()


def test_opcheck(gen):
    features, cams, labels = make_inputs((2, 3, 5, 3, 5), gen)
    features.requires_grad_(True)
    torch.library.opcheck(torch.ops.rca_fast.map_fwd.default, (features, cams, labels))
    torch.library.opcheck(torch.ops.rca_fast.map_fwd.default, (features, cams, None))
    emb, count, mean = torch.ops.rca_fast.map_fwd(features.detach(), cams, labels)
    grad_emb = torch.randn_like(emb)
    torch.library.opcheck(torch.ops.rca_fast.map_bwd.default, (grad_emb, cams, labels, mean, count, False))


def test_torch_compile_fullgraph(force_triton, gen):
    """fullgraph=True: the custom ops trace without graph breaks, forward and backward.  On CPU
    the aot_eager backend is used (inductor would compile C++ around an interpreted kernel)."""
    features, cams, labels = make_inputs((2, 3, 7, 5, 6), gen)
    upstream = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64).to(DEV)

    def step(f, c, lab):
        emb, count = ops.masked_average_pool(f, c, lab)
        return (emb * upstream).sum(), count

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if DEV == "cuda" else "aot_eager")
    f1 = features.clone().requires_grad_(True)
    f2 = features.clone().requires_grad_(True)
    loss, count = compiled(f1, cams, labels)
    loss.backward()
    want_loss, want_count = step(f2, cams, labels)
    want_loss.backward()
    assert torch.equal(count, want_count)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-12, atol=1e-12)
    # equal to eager, and right: the loss and counts from the float64 loop
    loop_emb, loop_count = oracles.masked_average_pool(features, cams, labels)
    assert torch.equal(count.cpu(), loop_count)
    torch.testing.assert_close(loss.cpu(), (loop_emb * upstream.cpu()).sum(), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ GPU, full size
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", ["B8-L20-D512-HW46x46-labels", "B8-L20-D512-HW46x46-nolabels",
                                  "B4-L80-D256-HW33x41-labels", "B8-L20-D512-HW46x46-camsbf16"])
def test_gpu_error_within_2x_of_reference(case, dtype, gen):
    torch.cuda.manual_seed(gen.initial_seed())
    B, L, D, H, W = {"B8-L20": (8, 20, 512, 46, 46), "B4-L80": (4, 80, 256, 33, 41)}[case[:6]]
    features = torch.randn(B, D, H, W, device="cuda")
    cams = torch.randn(B, L, H, W, device="cuda")
    if case.endswith("camsbf16"):
        cams = cams.bfloat16()
    labels = None
    if not case.endswith("nolabels"):
        # 1-3 present classes per image, as in VOC
        labels = torch.zeros(B, L, dtype=torch.bool, device="cuda")
        for b in range(B):
            labels[b, torch.randperm(L, device="cuda")[: 1 + b % 3]] = True
    upstream = torch.randn(B, L, D, device="cuda")
    feats = features.to(dtype)
    (emb, count, grad), (r_emb, r_count, r_grad) = run_both(feats, cams, labels, upstream.to(dtype))
    f64 = feats.double().requires_grad_(True)
    e64, c64 = ref_map(f64, cams, labels)
    (g64,) = torch.autograd.grad(e64, f64, upstream.to(dtype).double())
    assert torch.equal(count, c64) and torch.equal(r_count, c64)
    # the floor is relative to the largest value (embeddings peak near 0.12, gradients near 0.01:
    # an absolute 1e-3 let a 5-10% bf16 gradient error pass)
    oracles.assert_close_as_reference(emb, r_emb, e64, what="emb")
    oracles.assert_close_as_reference(grad, r_grad, g64, what="grad_features")


@pytest.mark.gpu
def test_gpu_default_backend_is_triton_and_matches_the_loop(gen):
    """The default on CUDA is Triton, and what the public op returns there equals the float64 loop."""
    assert ops.backend_for(OP, torch.device("cuda")) == "triton"
    features, cams, labels = make_inputs(SHAPES[0], gen, torch.float32)
    emb, count = ops.masked_average_pool(features.cuda(), cams.cuda(), labels.cuda())
    want_emb, want_count = oracles.masked_average_pool(features, cams, labels)
    assert torch.equal(count.cpu(), want_count)
    torch.testing.assert_close(emb.cpu().double(), want_emb, rtol=1e-5,
                               atol=1e-6 * float(want_emb.abs().max()))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_tensors_on_second_device(gen):
    """Tensors on cuda:1 while cuda:0 is current: the kernels launch on the tensors' device."""
    torch.cuda.set_device(0)
    features, cams, labels = (t.to("cuda:1") for t in make_inputs(SHAPES[0], gen, torch.float32))
    upstream = torch.randn(features.shape[0], cams.shape[1], features.shape[1], generator=gen).to(features)
    (emb, count, grad), (r_emb, r_count, r_grad) = run_both(features, cams, labels, upstream)
    assert torch.equal(count, r_count)
    torch.testing.assert_close(emb, r_emb)
    torch.testing.assert_close(grad, r_grad)
