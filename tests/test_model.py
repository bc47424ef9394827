"""RCAModel: backbones, heads, region contrast, bank update, pretrained loading, input checks.

Oracles are float64 literal loops written here (per region, per slot, per branch, per pixel).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from rca_fast.model import RCAModel, RCAOutput
from rca_fast.model.backbones import load_pretrained
from rca_fast.model.heads import PrototypeAggregation
from rca_fast.model.rca import draw_mixup, region_contrast

pytestmark = pytest.mark.filterwarnings("ignore:rca_fast. the compiled extension:RuntimeWarning")


def random_labels(B, L, gen, p=0.4):
    """(B, L) float 0/1 with at least one present class per image."""
    labels = (torch.rand(B, L, generator=gen) < p).double()
    labels[torch.arange(B), torch.randint(L, (B,), generator=gen)] = 1
    return labels


# ----------------------------------------------------------------------------- float64 oracles

def oracle_regions(features, query_features, coarse_cams, coarse_logits, labels):
    """Rows (image, class, bank emb, query emb, score) of the non-empty present regions, looped."""
    B, L = labels.shape
    rows = []
    for b in range(B):
        probs = torch.softmax(coarse_cams[b].double(), dim=0)               # over classes, per pixel
        for l in range(L):
            if labels[b, l] == 0:
                continue
            mask = probs[l] > probs[l].mean()
            n = int(mask.sum())
            if n == 0:
                continue
            emb = sum(features[b][:, i, j].double() for i, j in mask.nonzero().tolist()) / n
            query = sum(query_features[b][:, i, j].double() for i, j in mask.nonzero().tolist()) / n
            score = 1 / (1 + math.exp(-float(coarse_logits[b, l])))
            rows.append((b, l, emb, query, score))
    return rows


def oracle_nce(q, bank, c, tau):
    """Eq. 4 for one query q (D,) of class c: mean over positive slots, negatives = other classes."""
    L, S, _ = bank.shape
    def sim(m):
        return torch.dot(q, m) / (q.norm() * m.norm()) / tau
    neg = sum(torch.exp(sim(bank[l, i])) for l in range(L) if l != c for i in range(S)) if L > 1 else 0.0
    terms = []
    for j in range(S):
        pos = torch.exp(sim(bank[c, j]))
        terms.append(-torch.log(pos / (pos + neg)))
    return sum(terms) / S


def oracle_contrast(rows, bank, B, tau, partner=None, weight=None):
    """Per-image mean of the (mixed) region NCE, summed over images."""
    per_image = [[] for _ in range(B)]
    for i, (b, l, _, q, _) in enumerate(rows):
        if partner is None:
            per_image[b].append(oracle_nce(q, bank, l, tau))
            continue
        w, p = float(weight[i]), int(partner[i])
        mixed = w * q + (1 - w) * rows[p][3]
        per_image[b].append(w * oracle_nce(mixed, bank, l, tau) + (1 - w) * oracle_nce(mixed, bank,
                                                                                       rows[p][1], tau))
    return sum(sum(v) / len(v) for v in per_image if v)


# ----------------------------------------------------------------------------- forward / backward

@pytest.mark.parametrize("backbone,B,L,H,W", [
    ("vgg16", 2, 3, 64, 64), ("resnet50", 2, 3, 64, 64), ("tiny", 2, 20, 97, 61), ("tiny", 3, 1, 16, 23),
], ids=["vgg16-B2-L3-64x64", "resnet50-B2-L3-64x64", "tiny-B2-L20-97x61", "tiny-B3-L1-16x23"])
def test_forward_backward_every_backbone(backbone, B, L, H, W, gen):
    model = RCAModel(L, backbone=backbone, bank_slots=7, prototypes=3)
    model.refresh_prototypes(seed=1)
    images = torch.randn(B, 3, H, W, generator=gen)
    labels = random_labels(B, L, gen).float()
    out = model(images, labels, generator=gen)
    h, w = (H // 8, W // 8) if backbone == "vgg16" else (math.ceil(H / 8), math.ceil(W / 8))
    D = model.feature_dim
    assert D == (64 if backbone == "tiny" else 512)
    assert out.cams.shape == out.coarse_cams.shape == (B, L, h, w)
    assert out.logits.shape == out.coarse_logits.shape == (B, L)
    torch.testing.assert_close(out.logits, out.cams.mean(dim=(2, 3)))
    torch.testing.assert_close(out.coarse_logits, out.coarse_cams.mean(dim=(2, 3)))
    N = out.bank_emb.shape[0]
    assert N <= int(labels.sum()) and out.bank_emb.shape == (N, D) and not out.bank_emb.requires_grad
    assert out.bank_target.dtype == torch.int64 and out.bank_score.shape == (N,)
    assert bool((labels[out.region_image, out.bank_target] == 1).all())
    assert out.contrast_loss.dim() == 0 and torch.isfinite(out.contrast_loss)
    (out.logits.sum() + out.coarse_logits.sum() + out.contrast_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    assert model.update_bank(out) == int((out.bank_score > model.bank.score_threshold).sum())


def test_inference_and_eval_mode(gen):
    model = RCAModel(5, backbone="tiny", bank_slots=4, prototypes=2)
    images = torch.randn(2, 3, 33, 40, generator=gen)
    out = model(images)
    assert out.contrast_loss is None and out.bank_emb is None
    model.eval()
    out = model(images, random_labels(2, 5, gen))
    assert out.mix_partner is None and out.contrast_loss is not None   # eval: contrast without mixup
    off = RCAModel(5, backbone="tiny", bank_slots=4, prototypes=2, contrast=False)
    out = off(images, random_labels(2, 5, gen))
    assert out.contrast_loss is None and out.bank_emb is not None and off.projector is None


# ----------------------------------------------------------------------------- heads

# (the per-class final head's implementations: tests/test_final_heads.py)


def aggregation_pixel_loop(agg, feats, protos, coefficients):
    """The aggregation written out per pixel in float64: query, keys and values of the prototypes,
    ``coefficients(scores)`` (the attention weights over the L*K prototypes), context, out conv,
    fuse conv on [feature, context]."""
    L, K, D = protos.shape
    P = L * K
    keys = [agg.key.weight @ protos.reshape(P, D)[p] + agg.key.bias for p in range(P)]
    values = [agg.value.weight @ protos.reshape(P, D)[p] + agg.value.bias for p in range(P)]
    want = torch.empty_like(feats)
    for b in range(feats.shape[0]):
        for i in range(feats.shape[2]):
            for j in range(feats.shape[3]):
                f = feats[b, :, i, j]
                q = agg.query.weight[:, :, 0, 0] @ f + agg.query.bias
                coef = coefficients([float(q @ k) for k in keys])
                ctx = sum(c * v for c, v in zip(coef, values))
                o = agg.out.weight[:, :, 0, 0] @ ctx + agg.out.bias
                want[b, :, i, j] = agg.fuse.weight[:, :, 0, 0] @ torch.cat([f, o]) + agg.fuse.bias
    return want


def softmax_coefficients(scale):
    def coefficients(scores):
        e = [math.exp(scale * s - scale * max(scores)) for s in scores]
        return [v / sum(e) for v in e]
    return coefficients


@pytest.mark.parametrize("mode", ["softmax", "linear", "none"])
def test_aggregation_against_pixel_loop(mode, gen):
    L, K, D, h, w = 3, 2, 12, 5, 7
    agg = PrototypeAggregation(D, mode).double()
    feats = torch.randn(2, D, h, w, generator=gen, dtype=torch.float64)
    protos = torch.randn(L, K, D, generator=gen, dtype=torch.float64)
    got = agg(feats, protos)
    agg.requires_grad_(False)
    if mode == "none":
        assert got is feats and not list(agg.parameters())
        return
    if mode == "softmax":
        coefficients = softmax_coefficients(1 / math.sqrt(D))
    else:  # the public code's `matmul(query, key) / K * 20`, left to right, no softmax
        def coefficients(scores):
            return [s / K * 20 for s in scores]
    torch.testing.assert_close(got, aggregation_pixel_loop(agg, feats, protos, coefficients))


@pytest.mark.parametrize("attention_scale", ["one", "learned"])
def test_attention_scale_against_pixel_loop(attention_scale, gen):
    """softmax(scale * q k^T) v with scale 1 (the paper's formula) or the learned exp(log_scale)
    (set off its 1/sqrt(D) start here), which also gets a gradient."""
    L, K, D, h, w = 2, 3, 8, 3, 5
    agg = PrototypeAggregation(D, "softmax", attention_scale).double()
    scale = 1.0
    if attention_scale == "learned":
        scale = float(torch.empty(()).uniform_(0.05, 0.9, generator=gen))
        with torch.no_grad():
            agg.log_scale.fill_(math.log(scale))
    feats = torch.randn(2, D, h, w, generator=gen, dtype=torch.float64)
    protos = torch.randn(L, K, D, generator=gen, dtype=torch.float64)
    got = agg(feats, protos)
    if attention_scale == "learned":
        got.sum().backward()
        assert float(agg.log_scale.grad.abs()) > 0
    with torch.no_grad():
        want = aggregation_pixel_loop(agg, feats, protos, softmax_coefficients(scale))
    torch.testing.assert_close(got.detach(), want)


def test_shared_vs_per_class_final_head(gen):
    per_class = RCAModel(4, backbone="tiny", bank_slots=4, prototypes=2)
    shared = RCAModel(4, backbone="tiny", bank_slots=4, prototypes=2, shared_final_head=True)
    n_per_class = sum(p.numel() for p in per_class.final_head.parameters())
    n_shared = sum(p.numel() for p in shared.final_head.parameters())
    D = per_class.feature_dim   # per class: first conv D -> 4D, two grouped 4D -> 4D convs, 4 maps
    assert n_per_class == (D * 4 * D * 9 + 4 * D) + 2 * (4 * D * D * 9 + 4 * D) + (4 * D + 4)
    assert n_shared == 3 * (D * D * 9 + D) + (D * 4 + 4)
    images = torch.randn(2, 3, 24, 40, generator=gen)
    for model in (per_class, shared):
        out = model(images, random_labels(2, 4, gen))
        assert out.cams.shape == (2, 4, 3, 5)
        out.logits.sum().backward()


# ----------------------------------------------------------------------------- region contrast

@pytest.mark.parametrize("B,L,S,D,h,w", [(2, 4, 5, 60, 7, 13), (3, 80, 1, 12, 5, 6)],
                         ids=["B2-L4-S5-D60-HW7x13", "B3-L80-S1-D12-HW5x6"])
@pytest.mark.parametrize("mixup", [True, False], ids=["mixup", "plain"])
def test_region_contrast_against_loop(B, L, S, D, h, w, mixup, gen):
    f64 = dict(generator=gen, dtype=torch.float64)
    feats = torch.randn(B, D, h, w, **f64)
    qfeats = torch.randn(B, D, h, w, **f64, requires_grad=True)
    cams = torch.randn(B, L, h, w, **f64)
    if L == 4:
        cams[0] = 0.0          # image 0: uniform softmax (exactly 1/4) -> every region of it is empty
    logits = cams.mean(dim=(2, 3))
    labels = random_labels(B, L, gen, p=0.1 if L == 80 else 0.5)
    bank = torch.randn(L, S, D, **f64)
    seed = int(torch.randint(2 ** 31, (1,), generator=gen))
    res = region_contrast(feats, qfeats, cams, logits, labels.bool(), bank, temperature=0.07, mixup=mixup,
                          generator=torch.Generator().manual_seed(seed))
    rows = oracle_regions(feats, qfeats, cams, logits, labels)
    assert [(b, l) for b, l, *_ in rows] == list(zip(res.image.tolist(), res.target.tolist()))
    if L == 4:
        assert 0 not in res.image.tolist()
    for i, (_, _, emb, _, score) in enumerate(rows):
        torch.testing.assert_close(res.emb[i], emb)
        assert math.isclose(float(res.score[i]), score, rel_tol=1e-9)
    if mixup:
        img_of = res.image.tolist()
        assert all(0 <= p < len(rows) for p in res.partner.tolist())
        assert bool(((res.weight >= 0) & (res.weight <= 1)).all())
        again = region_contrast(feats, qfeats, cams, logits, labels.bool(), bank, mixup=True,
                                generator=torch.Generator().manual_seed(seed))
        assert torch.equal(again.partner, res.partner) and torch.equal(again.weight, res.weight)
        assert set(img_of[p] for p in res.partner.tolist()) <= set(img_of)
    want = oracle_contrast(rows, bank, B, 0.07, res.partner, res.weight)
    torch.testing.assert_close(res.loss, want)
    grad, = torch.autograd.grad(res.loss, qfeats)
    want_grad, = torch.autograd.grad(want, qfeats)
    torch.testing.assert_close(grad, want_grad)


def test_draw_mixup_distribution(gen):
    # images with 1, 3, 0 and 2 rows: an image is drawn uniformly among the 3 holding rows,
    # then one of its rows uniformly.
    region_image = torch.tensor([0, 1, 1, 1, 3, 3])
    n = 30000
    partner, weight = draw_mixup(region_image, 4, 8.0, gen)
    assert partner.shape == weight.shape == (6,) and set(partner.tolist()) <= set(range(6))
    big = torch.cat([region_image, torch.full((n - 6,), 3)])   # many rows of image 3
    partner, weight = draw_mixup(big, 4, 8.0, gen)
    counts = torch.bincount(partner, minlength=big.shape[0]).double() / n
    per_row_mass = {0: 1 / 3, 1: 1 / 9, 2: 1 / 9, 3: 1 / 9}
    for row, mass in per_row_mass.items():
        assert abs(float(counts[row]) - mass) < 5 * math.sqrt(mass * (1 - mass) / n), (row,
                                                                                       float(counts[row]))
    assert abs(float(counts[4:].sum()) - 1 / 3) < 5 * math.sqrt(2 / 9 / n)
    # Beta(8, 8): mean 1/2, variance 1/68
    assert abs(float(weight.double().mean()) - 0.5) < 5 * math.sqrt(1 / 68 / n)
    assert abs(float(weight.double().var()) - 1 / 68) < 0.002


def test_model_contrast_loss_against_loop(gen):
    L = 6
    model = RCAModel(L, backbone="tiny", bank_slots=5, prototypes=2).double()
    images = torch.randn(3, 3, 40, 35, generator=gen, dtype=torch.float64)
    labels = random_labels(3, L, gen)
    out = model(images, labels, generator=gen)
    with torch.no_grad():
        feats = model.backbone(images)
        rows = oracle_regions(feats, model.projector(feats), model.coarse_head(feats),
                              model.coarse_head(feats).mean(dim=(2, 3)), labels)
    assert len(rows) == out.bank_emb.shape[0] == out.mix_partner.shape[0]
    want = oracle_contrast(rows, model.bank.bank, 3, model.temperature, out.mix_partner, out.mix_weight)
    torch.testing.assert_close(out.contrast_loss.detach(), want)


@pytest.mark.parametrize("empty", ["one-image", "all"])
def test_empty_regions_no_nan(empty, gen):
    L = 4
    model = RCAModel(L, backbone="tiny", bank_slots=3, prototypes=2, score_threshold=-1.0)
    model.refresh_prototypes()
    images = torch.randn(3, 3, 32, 48, generator=gen)
    labels = random_labels(3, L, gen).float()
    which = slice(0, 1) if empty == "one-image" else slice(None)

    def flat_coarse(module, inputs, output):   # uniform softmax (exactly 1/4): no pixel above the mean
        output = output.clone()
        output[which] = 0.0
        return output

    model.coarse_head.register_forward_hook(flat_coarse)
    out = model(images, labels, generator=gen)
    kept = set(out.region_image.tolist())
    assert 0 not in kept and (kept == set() if empty == "all" else kept == {1, 2})
    assert torch.isfinite(out.contrast_loss)
    if empty == "all":
        assert float(out.contrast_loss.detach()) == 0.0
    (out.contrast_loss + out.logits.sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    before = model.bank.bank.clone()
    assert model.update_bank(out) == out.bank_emb.shape[0]
    assert torch.isfinite(model.bank.bank).all()
    if empty == "all":
        assert torch.equal(model.bank.bank, before)


def test_update_bank_applies_rows_above_threshold(gen):
    L, S, D = 3, 4, 64
    model = RCAModel(L, backbone="tiny", bank_slots=S, prototypes=2)
    model.bank.ptr.copy_(torch.tensor([3, 0, 1]))
    N = 9
    emb = torch.randn(N, D, generator=gen)
    target = torch.randint(L, (N,), generator=gen)
    score = torch.rand(N, generator=gen)
    out = RCAOutput(*(torch.zeros(1),) * 4, bank_emb=emb, bank_target=target, bank_score=score)
    bank = model.bank.bank.double().clone()
    ptr = model.bank.ptr.tolist()
    applied = 0
    for i in range(N):  # the sequential rule, rows below the threshold skipped
        if float(score[i]) <= 0.7:
            continue
        c = int(target[i])
        bank[c, ptr[c]] = 0.99 * bank[c, ptr[c]] + 0.01 * emb[i].double()
        ptr[c] = (ptr[c] + 1) % S
        applied += 1
    assert model.update_bank(out) == applied
    torch.testing.assert_close(model.bank.bank.double(), bank, rtol=1e-6, atol=1e-6)
    assert model.bank.ptr.tolist() == ptr
    assert model.update_bank(RCAOutput(*(torch.zeros(1),) * 4)) == 0


# ----------------------------------------------------------------------------- pretrained files

def test_vgg16_torchvision_file_and_layout(tmp_path, gen):
    import torchvision
    tv = torchvision.models.vgg16(weights=None)
    path = tmp_path / "vgg16.pth"
    torch.save(tv.state_dict(), path)
    model = RCAModel(2, backbone="vgg16", pretrained=str(path), bank_slots=2, prototypes=1)
    x = torch.randn(1, 3, 48, 56, generator=gen)
    # the public code's VGG16 written out: pools 1-3 2x2/2, pool4 3x3 stride 1, conv5 dilated 2, no pool5
    convs = [m for m in tv.features if isinstance(m, torch.nn.Conv2d)]
    y, k = x, 0
    for block, n in enumerate((2, 2, 3, 3, 3)):
        for _ in range(n):
            d = 2 if block == 4 else 1
            y = F.relu(F.conv2d(y, convs[k].weight, convs[k].bias, padding=d, dilation=d))
            k += 1
        if block < 3:
            y = F.max_pool2d(y, 2, 2)
        elif block == 3:
            y = F.max_pool2d(y, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), y)
    assert y.shape == (1, 512, 6, 7)


def test_resnet50_torchvision_file(tmp_path, gen):
    import torchvision
    tv = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True]).eval()
    path = tmp_path / "resnet50.pth"
    torch.save(tv.state_dict(), path)
    model = RCAModel(2, backbone="resnet50", pretrained=str(path), bank_slots=2, prototypes=1).eval()
    x = torch.randn(1, 3, 40, 48, generator=gen)
    trunk = torch.nn.Sequential(*list(tv.children())[:-2])
    with torch.no_grad():
        features = trunk(x)
        assert features.shape == (1, 2048, 5, 6)
        torch.testing.assert_close(model.backbone(x), model.backbone.reduce(features))


def test_pretrained_round_trip_and_errors(tmp_path, gen):
    source = RCAModel(3, backbone="tiny", bank_slots=2, prototypes=1)
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": source.backbone.state_dict()}, path)
    loaded = RCAModel(3, backbone="tiny", pretrained=str(path), bank_slots=2, prototypes=1)
    x = torch.randn(2, 3, 27, 19, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone(x), source.backbone(x), rtol=0, atol=0)
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(FileNotFoundError, match=str(missing).replace("\\", "\\\\")):
        RCAModel(3, backbone="tiny", pretrained=str(missing))
    with pytest.raises(ValueError,
                       match="missing keys: .*features.10.weight.*; unexpected keys: .*features.4.weight"):
        load_pretrained(RCAModel(3, backbone="vgg16", bank_slots=2, prototypes=1).backbone, str(path))
    bad = source.backbone.state_dict()
    bad["features.2.weight"] = bad["features.2.weight"][:, :5]
    torch.save(bad, path)
    with pytest.raises(ValueError, match="shape-mismatched keys: features.2.weight"):
        RCAModel(3, backbone="tiny", pretrained=str(path))


# ----------------------------------------------------------------------------- optimiser groups

@pytest.mark.parametrize("backbone,attention_scale", [("tiny", "learned"), ("resnet50", "sqrt")])
def test_param_groups(backbone, attention_scale):
    """The public code's groups: x10 / x20 only for what it names ``extra`` (CAM heads, projector;
    here also resnet50's new conv1x1); Q/K/V, aggre, concat_project and the backbone x1 / x2;
    weight decay on every parameter, biases included."""
    model = RCAModel(3, backbone=backbone, bank_slots=2, prototypes=1, attention_scale=attention_scale)
    groups = model.param_groups(lr=1e-3, weight_decay=5e-4)
    seen = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in seen
            seen[id(p)] = (g["lr"], g["weight_decay"])
    assert len(seen) == len(list(model.parameters()))
    aggregation = 0
    for name, p in model.named_parameters():
        extra = name.split(".")[0] in ("coarse_head", "final_head",
                                       "projector") or name.startswith("backbone.reduce.")
        aggregation += name.startswith("aggregation.")
        bias = name.endswith(".bias")
        lr = 1e-3 * {(False, False): 1, (False, True): 2, (True, False): 10, (True, True): 20}[(extra, bias)]
        assert seen[id(p)] == pytest.approx((lr, 5e-4)), name
    assert aggregation == 10 + (attention_scale == "learned")  # q, k, v, out, fuse (weight + bias) [+ scale]
    torch.optim.SGD(groups, lr=1e-3, momentum=0.9, nesterov=True)


def test_new_layers_public_init(gen):
    """Every conv RCA adds: weights N(0, 0.01) (sample std within 5%), biases PyTorch's default
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (not zero); the backbone keeps its own init."""
    model = RCAModel(3, backbone="vgg16", bank_slots=2, prototypes=1)
    convs = 0
    for top in (model.coarse_head, model.final_head, model.projector, model.aggregation):
        for m in top.modules():
            if isinstance(m, torch.nn.Conv2d):
                convs += 1
                w = m.weight.detach().double()
                assert abs(float(w.std()) - 0.01) < 0.05 * 0.01 + 3 * 0.01 / math.sqrt(2 * w.numel()), m
                assert abs(float(w.mean())) < 4 * 0.01 / math.sqrt(w.numel())
                if m.bias is not None:
                    bound = 1 / math.sqrt(m.weight[0].numel())
                    top = float(m.bias.detach().abs().max())
                    assert top <= bound and top > 0.1 * bound
    assert convs == 4 + 4 + 2 + 3
    first = model.backbone.features[0].weight.detach()
    assert float(first.std()) > 0.05  # torchvision's kaiming fan_out for 3x3x64: std ~0.059


# ----------------------------------------------------------------------------- bad inputs

def test_bad_inputs_raise_named_errors(gen):
    model = RCAModel(4, backbone="tiny", bank_slots=2, prototypes=1)
    good = torch.randn(2, 3, 32, 32, generator=gen)
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, H, W\), got \(2, 4, 32, 32\)"):
        model(torch.randn(2, 4, 32, 32))
    with pytest.raises(ValueError, match="images must have shape"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="images must be a float tensor"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="images must be at least 16x16"):
        model(torch.randn(2, 3, 8, 32))
    with pytest.raises(ValueError, match=r"labels must have shape \(B, L\) = \(2, 4\), got \(2, 5\)"):
        model(good, torch.ones(2, 5))
    with pytest.raises(ValueError, match="labels must be a 0/1"):
        model(good, torch.full((2, 4), 0.5))
    with pytest.raises(ValueError, match="backbone must be one of"):
        RCAModel(4, backbone="vgg19")
    with pytest.raises(ValueError, match="aggregation must be one of"):
        RCAModel(4, backbone="tiny", aggregation="mean")
    with pytest.raises(TypeError, match="out must be an RCAOutput"):
        model.update_bank({"bank_emb": None})
