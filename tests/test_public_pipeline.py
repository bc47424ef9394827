"""--recipe public trains as the public code (issue 19, point 1): its training input pipeline
(square resize, ColorJitter with hue in random order, no flip/rescale/crop, list order, last
partial batch kept), the linear aggregation, k-means up to 300 Lloyd iterations, the projector's
first conv with a bias.  Oracles: torchvision's own functional ops, literal index lists, the
public defaults written out."""
import inspect
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from rca_fast import ops
from rca_fast.data import PublicTrainTransform, public_color_jitter, transforms
from rca_fast.data.synthetic import export_voc
from rca_fast.data.training import build_datasets
from rca_fast.model import RCAModel
from rca_fast.train import Trainer
from rca_fast.utils.checkpoint import load_model_state
from rca_fast.utils.train_args import parse_args

TF = pytest.importorskip("torchvision.transforms.functional")
SYN = ["--input_size", "32", "--crop_size", "32", "--bank-slots", "16", "--prototypes", "2", "--no-progress",
       "--threads", "1", "--num_classes", "3", "--val-images", "0", "--device", "cpu"]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class ScriptedRng:
    """A random.Random stand-in returning given draws; records the ranges asked for."""

    def __init__(self, uniforms, order):
        self.uniforms, self.order, self.ranges = list(uniforms), list(order), []

    def uniform(self, a, b):
        self.ranges.append((a, b))
        return self.uniforms.pop(0)

    def sample(self, population, k):
        assert list(population) == [0, 1, 2, 3] and k == 4
        return list(self.order)


def test_color_jitter_is_torchvisions_with_hue_in_the_drawn_order(gen):
    """For given factors and order, public_color_jitter equals torchvision's PIL adjustments applied
    in that order (exactly: the same PIL operations); the factor ranges are ColorJitter(0.3, 0.3,
    0.3, 0.1)'s.  Fails with the hue left out or a fixed order."""
    h, w = (int(v) for v in torch.randint(5, 40, (2,), generator=gen))
    image = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for _ in range(3):
        order = torch.randperm(4, generator=gen).tolist()
        factors = [0.7 + 0.6 * float(torch.rand((), generator=gen)) for _ in range(3)]
        factors.append(-0.1 + 0.2 * float(torch.rand((), generator=gen)))
        rng = ScriptedRng(factors, order)
        got = public_color_jitter(image, rng)
        want = Image.fromarray(image)
        for op in order:
            want = fns[op](want, factors[op])
        assert np.array_equal(got, np.array(want)), (order, factors)
        assert rng.ranges == [(0.7, 1.3), (0.7, 1.3), (0.7, 1.3), (-0.1, 0.1)]


def test_color_jitter_order_is_random_and_always_has_hue(monkeypatch):
    """Over 300 images every one of the 24 orders of the four jitters appears (p of missing one
    < 1e-4), each order holding all four (hue included)."""
    orders = []
    real = transforms.jitter_op

    def spy(img, op, factor):
        orders[-1].append(op)
        return real(img, op, factor)
    monkeypatch.setattr(transforms, "jitter_op", spy)
    image = np.full((4, 4, 3), 128, np.uint8)
    rng = random.Random(int(torch.randint(2 ** 31, ())))
    for _ in range(300):
        orders.append([])
        public_color_jitter(image, rng)
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert len({tuple(o) for o in orders}) == 24


def test_public_transform_is_a_square_resize(gen):
    """Without jitter the public transform is Resize((s, s)) (aspect not kept) + ToTensor +
    Normalize, compared with torchvision's; no flip or crop (the same image twice gives the same
    tensor); the view is the whole image stretched to the square."""
    h, w = (int(v) for v in torch.randint(17, 60, (2,), generator=gen))
    s = int(torch.randint(16, 40, (), generator=gen))
    image = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
    tf = PublicTrainTransform(s, jitter=False, seed=0)
    x, view = tf.with_view(image)
    pil = TF.resize(Image.fromarray(image), [s, s], interpolation=TF.InterpolationMode.BILINEAR)
    want = TF.normalize(TF.to_tensor(pil), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert x.shape == (3, s, s)
    torch.testing.assert_close(x, want, rtol=0, atol=1e-5)
    assert torch.equal(tf(image), x)
    assert view.tolist() == [h, w, s, s, 0, 0, 0, 0, 0, s, s]


def test_voc_training_set_uses_the_public_transform(tmp_path):
    """--dataset voc: the default pipeline gives input_size x input_size images (crop_size unused);
    --input-pipeline augmented keeps the earlier rescale/flip/crop transform."""
    root = tmp_path / "voc"
    export_voc(str(root), train=3, val=1, num_classes=3, image_size=24, seed=1)
    base = ["--dataset", "voc", "--data-root", str(root), "--num_classes", "3", "--backbone", "tiny",
            "--input_size", "40", "--crop_size", "16"]
    train, _, _ = build_datasets(parse_args(base))
    assert isinstance(train.transform, PublicTrainTransform) and train[0]["image"].shape == (3, 40, 40)
    train, _, _ = build_datasets(parse_args(base + ["--input-pipeline", "augmented"]))
    assert train[0]["image"].shape == (3, 16, 16)


def test_public_order_keeps_the_list_order_and_the_partial_batch(tmp_path, monkeypatch):
    """Every epoch sees the images 0..n-1 in list order, cut into batches of bs with the last
    partial one kept (ceil(n / bs) steps); synthetic images are jittered, never flipped.
    --input-pipeline augmented: shuffled, full batches only."""
    n, bs = 11, 4
    seen = {}
    for pipeline in ("public", "augmented"):
        args = parse_args(SYN + ["--num-images", str(n), "--batch_size", str(bs), "--epoch", "2",
                                 "--input-pipeline", pipeline, "--out", str(tmp_path / pipeline)])
        trainer = Trainer(args)
        step = trainer.train_step
        got = seen[pipeline] = []

        def spy(batch, epoch, step=step, got=got, public=pipeline == "public"):
            got.append((epoch, list(batch["index"])))
            assert not (public and any(bool(v[4]) for v in batch["view"]))  # the view's flip flag
            return step(batch, epoch)
        monkeypatch.setattr(trainer, "train_step", spy)
        metrics = trainer.fit()
        assert metrics["steps"] == len(got) == 2 * trainer.steps_per_epoch()
        if pipeline == "public":
            assert trainer.train_set.jitter and not trainer.train_set.flip
    want = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
    assert [b for e, b in seen["public"] if e == 1] == want == [b for e, b in seen["public"] if e == 2]
    shuffled = [b for _, b in seen["augmented"]]
    assert all(len(b) == bs for b in shuffled) and len(shuffled) == 2 * (n // bs)
    assert sorted(shuffled[0] + shuffled[1]) != list(range(2 * bs)) or shuffled[0] != list(range(bs))


def test_public_defaults_linear_aggregation_kmeans_300():
    """--recipe public (the default): linear aggregation, public pipeline, k-means max_iter 300
    (scikit-learn's default the public code ran); --recipe improved: the softmax it was measured with."""
    args = parse_args([])
    assert (args.aggregation, args.aggregation_mode, args.input_pipeline, args.kmeans_iters) == \
        ("linear", "linear", "public", 300)
    assert parse_args(["--recipe", "improved"]).aggregation == "softmax"
    assert parse_args(["--recipe", "improved", "--aggregation", "linear"]).aggregation == "linear"
    assert parse_args(["--aggregation", "softmax"]).aggregation_mode == "softmax"
    assert parse_args(["--no-aggregation"]).aggregation_mode == "none"
    assert inspect.signature(ops.kmeans).parameters["iters"].default == 300
    with pytest.raises(ValueError, match="--kmeans-iters"):
        parse_args(["--kmeans-iters", "0"])


def test_trainer_builds_the_linear_aggregation_and_runs_300_iterations(tmp_path, monkeypatch):
    """The trainer's model aggregates linearly, and its epoch-2 k-means asks ops.kmeans for 300
    iterations (n_init 10)."""
    args = parse_args(
        SYN + ["--num-images", "4", "--batch_size", "4", "--epoch", "2", "--out", str(tmp_path)]
    )
    trainer = Trainer(args)
    assert trainer.model.aggregation.mode == "linear"
    calls = []
    real = ops.kmeans

    def spy(points, k, **kw):
        calls.append(kw)
        return real(points, k, **kw)
    monkeypatch.setattr(ops, "kmeans", spy)
    trainer.fit()
    assert len(calls) == 1 and calls[0]["iters"] == 300 and calls[0]["n_init"] == 10


def test_projector_first_conv_has_a_bias_and_old_checkpoints_load(gen):
    """The public projector: conv3x3 WITH bias + BN + ReLU + conv3x3.  A state dict without that
    bias (checkpoints before it) loads with a zero bias: the same function as the bias-free conv."""
    torch.manual_seed(int(torch.randint(2 ** 31, (), generator=gen)))
    model = RCAModel(3, backbone="tiny", bank_slots=4, prototypes=2)
    conv = model.projector.net[0]
    assert isinstance(conv, torch.nn.Conv2d) and conv.bias is not None
    bound = 1 / math.sqrt(conv.weight[0].numel())  # PyTorch's default bias init, as the public code
    assert 0 < float(conv.bias.detach().abs().max()) <= bound
    old = {k: v for k, v in model.state_dict().items() if k != "projector.net.0.bias"}
    other = RCAModel(3, backbone="tiny", bank_slots=4, prototypes=2)
    load_model_state(other, old, "old.pt")
    assert bool((other.projector.net[0].bias == 0).all())
    assert torch.equal(other.projector.net[0].weight, conv.weight)
