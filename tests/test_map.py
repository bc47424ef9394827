"""masked_average_pool against the float64 loop oracle (tests/oracles.py), gradients, bad inputs."""
import pytest
import torch

import oracles
from oracles import torch_backend_unless_forced  # noqa: F401  (autouse: torch backend)
from rca_fast import ops
from rca_fast.ref import masked_average_pool as ref_map

# (B, L, D, H, W): odd sizes on purpose, L=3 and L=80, one image and several.
SHAPES = [(1, 3, 60, 7, 13), (2, 3, 5, 7, 13), (3, 80, 6, 7, 13), (2, 80, 60, 5, 3), (3, 4, 9, 1, 6)]
SHAPE_IDS = [f"B{b}-L{l}-D{d}-HW{h}x{w}" for b, l, d, h, w in SHAPES]


def random_labels(B, L, gen, dtype):
    labels = torch.rand(B, L, generator=gen) < 0.4
    labels[0, 0] = True    # at least one present pair ...
    labels[-1, -1] = False  # ... and one absent pair
    return labels if dtype == torch.bool else labels.to(dtype)


def inputs(shape, gen, dtype=torch.float32):
    B, L, D, H, W = shape
    features = torch.randn(B, D, H, W, generator=gen).to(dtype)
    cams = torch.randn(B, L, H, W, generator=gen).to(dtype)
    return features, cams


def tolerance(dtype):
    return {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("labels_dtype", [None, torch.bool, torch.int64, torch.float32],
                         ids=["nolabels", "labels-bool", "labels-int01", "labels-float01"])
def test_matches_loop_oracle(shape, labels_dtype, gen):
    features, cams = inputs(shape, gen)
    labels = None if labels_dtype is None else random_labels(shape[0], shape[1], gen, labels_dtype)
    emb, count = ops.masked_average_pool(features, cams, labels)
    want_emb, want_count = oracles.masked_average_pool(features, cams, labels)
    assert emb.shape == want_emb.shape and emb.dtype == features.dtype
    assert count.dtype == torch.int64
    assert torch.equal(count, want_count)
    torch.testing.assert_close(emb.double(), want_emb, rtol=1e-5, atol=1e-5)
    if labels is not None:  # absent classes are exactly 0
        absent = labels == 0
        assert bool((emb[absent] == 0).all()) and bool((count[absent] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
@pytest.mark.parametrize("with_labels", [False, True], ids=["nolabels", "labels"])
def test_other_dtypes(dtype, with_labels, gen):
    # 23x29 = 667 pixels: bf16 cannot hold most counts above 256 exactly, the int64 counts must.
    shape = (2, 3, 8, 23, 29)
    features, cams = inputs(shape, gen, dtype)
    labels = random_labels(2, 3, gen, torch.bool) if with_labels else None
    emb, count = ops.masked_average_pool(features, cams, labels)
    want_emb, want_count = oracles.masked_average_pool(features, cams, labels)
    assert emb.dtype == dtype
    assert torch.equal(count, want_count)
    torch.testing.assert_close(emb.double(), want_emb, rtol=tolerance(dtype), atol=tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("with_labels", [False, True], ids=["nolabels", "labels"])
def test_constant_cam_gives_empty_region(dtype, with_labels, gen):
    """A constant CAM has no pixel above its mean: count 0, emb 0, no NaN -- for any constant
    (a mean rounded in the map's precision would often put every pixel above it)."""
    B, L, D, H, W = 2, 5, 6, 7, 13
    features, cams = inputs((B, L, D, H, W), gen, dtype)
    constants = torch.randn(B, L, generator=gen) * 10
    flat = torch.rand(B, L, generator=gen) < 0.5
    flat[0, 1] = True
    cams = torch.where(flat[..., None, None], constants[..., None, None].to(dtype), cams)
    labels = torch.ones(B, L, dtype=torch.bool) if with_labels else None
    emb, count = ops.masked_average_pool(features, cams, labels)
    assert bool((count[flat] == 0).all())
    assert bool((emb[flat] == 0).all())
    assert bool(torch.isfinite(emb).all())
    want_emb, want_count = oracles.masked_average_pool(features, cams, labels)
    assert torch.equal(count, want_count)
    torch.testing.assert_close(emb.double(), want_emb, rtol=tolerance(dtype), atol=tolerance(dtype))


def test_all_absent_labels_give_zeros(gen):
    features, cams = inputs((2, 3, 5, 7, 13), gen)
    emb, count = ops.masked_average_pool(features, cams, torch.zeros(2, 3, dtype=torch.bool))
    assert bool((emb == 0).all()) and bool((count == 0).all())


def test_labels_path_equals_full_path_on_present_pairs(gen):
    features, cams = inputs((3, 80, 6, 7, 13), gen)
    labels = random_labels(3, 80, gen, torch.bool)
    emb_l, count_l = ref_map(features, cams, labels)
    emb_f, count_f = ref_map(features, cams)
    torch.testing.assert_close(emb_l[labels], emb_f[labels], rtol=1e-6, atol=1e-6)
    assert torch.equal(count_l[labels], count_f[labels])


@pytest.mark.parametrize("labels_kind", [None, "bool", "int01"])
def test_gradcheck_features(labels_kind, gen):
    B, L, D, H, W = 2, 4, 5, 3, 5
    features = torch.randn(B, D, H, W, generator=gen, dtype=torch.float64, requires_grad=True)
    cams = torch.randn(B, L, H, W, generator=gen, dtype=torch.float64)
    cams[1, 2] = 0.5  # an empty region: its gradient is 0, never NaN
    labels = None
    if labels_kind is not None:
        labels = random_labels(B, L, gen, torch.bool if labels_kind == "bool" else torch.int64)
        labels[1, 2] = 1
    assert torch.autograd.gradcheck(lambda f: ops.masked_average_pool(f, cams, labels)[0], (features,))


def test_gradient_matches_oracle_weights(gen):
    """d sum(emb * g) / d features[b, :, h, w] = sum over l with pixel in mask of g[b, l] / count."""
    B, L, D, H, W = 2, 3, 4, 7, 13
    features = torch.randn(B, D, H, W, generator=gen, dtype=torch.float64, requires_grad=True)
    cams = torch.randn(B, L, H, W, generator=gen, dtype=torch.float64)
    upstream = torch.randn(B, L, D, generator=gen, dtype=torch.float64)
    emb, count = ops.masked_average_pool(features, cams)
    (emb * upstream).sum().backward()
    c = cams.tolist()
    want = torch.zeros(B, D, H, W, dtype=torch.float64)
    for b in range(B):
        for l in range(L):
            mean = sum(c[b][l][h][w] for h in range(H) for w in range(W)) / (H * W)
            n = int(count[b, l])
            for h in range(H):
                for w in range(W):
                    if c[b][l][h][w] > mean:
                        for d in range(D):
                            want[b, d, h, w] += float(upstream[b, l, d]) / n
    torch.testing.assert_close(features.grad, want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------- bad inputs
def _good(gen):
    features, cams = inputs((2, 3, 5, 7, 13), gen)
    return features, cams, torch.ones(2, 3, dtype=torch.bool)


@pytest.mark.parametrize("case, exc, name", [
    ("features-3d", ValueError, "features"),
    ("features-int", TypeError, "features"),
    ("features-list", TypeError, "features"),
    ("cams-3d", ValueError, "cams"),
    ("cams-batch", ValueError, "cams"),
    ("cams-spatial", ValueError, "cams"),
    ("cams-int", TypeError, "cams"),
    ("cams-device", ValueError, "cams"),
    ("labels-shape", ValueError, "labels"),
    ("labels-1d", ValueError, "labels"),
    ("labels-values", ValueError, "labels"),
    ("labels-device", ValueError, "labels"),
])
def test_bad_inputs_name_the_argument(case, exc, name, gen):
    features, cams, labels = _good(gen)
    if case == "features-3d":
        features = features[0]
    elif case == "features-int":
        features = features.long()
    elif case == "features-list":
        features = features.tolist()
    elif case == "cams-3d":
        cams = cams[0]
    elif case == "cams-batch":
        cams = cams[:1]
    elif case == "cams-spatial":
        cams = cams[..., :-1]
    elif case == "cams-int":
        cams = cams.long()
    elif case == "cams-device":
        cams = cams.to("meta")
    elif case == "labels-shape":
        labels = labels[:, :2]
    elif case == "labels-1d":
        labels = labels[0]
    elif case == "labels-values":
        labels = labels.long() * 2
    elif case == "labels-device":
        labels = labels.to("meta")
    with pytest.raises(exc, match=rf"\b{name}\b"):  # the argument as a word, not inside the op name
        ops.masked_average_pool(features, cams, labels)
