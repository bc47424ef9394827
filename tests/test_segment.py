"""Step 3 of the workflow, ``python -m rca_fast.segment``: the loss, the schedule, resume, data errors,
the evaluation and the program end to end (tiny network, 32-40 px synthetic images, a few steps)."""
import ast
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from rca_fast.data.seg_pairs import SegmentationPairs
from rca_fast.data.synthetic import export_voc
from rca_fast.model.segmentation import build_segmentation_model, seg_param_groups, segmentation_loss
from rca_fast.segment.args import parse_args
from rca_fast.segment.predict import predict_probs
from rca_fast.segment.trainer import SegTrainer
from rca_fast.utils.palette import save_label_png

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """12 training + 5 validation synthetic images of 40 px in VOC layout (labels = ground truth)."""
    root = str(tmp_path_factory.mktemp("segdata") / "d")
    export_voc(root, train=12, val=5, image_size=40, seed=3)
    return root


def seg_argv(root, out, *extra):
    return [
        "--dataset",
        "synthetic",
        "--images",
        f"{root}/JPEGImages",
        "--labels",
        f"{root}/SegmentationClass",
        "--train_list",
        f"{root}/train_cls.txt",
        "--out",
        str(out),
        "--crop-size", "32", "--batch-size", "4", "--no-progress", "--threads", "1",
        *extra,
    ]


# ------------------------------------------------------------------------------------ loss
def loop_loss(logits, target):
    """float64 pixel loop: mean over non-255 pixels of -log softmax(logits)[target]."""
    lg = logits.double().numpy()
    t = target.numpy()
    total, count = 0.0, 0
    for b in range(lg.shape[0]):
        for y in range(lg.shape[2]):
            for x in range(lg.shape[3]):
                if t[b, y, x] == 255:
                    continue
                v = lg[b, :, y, x]
                m = v.max()
                total += -(v[t[b, y, x]] - m - np.log(np.exp(v - m).sum()))
                count += 1
    return total / count if count else 0.0


def test_segmentation_loss_ignores_255_against_pixel_loop():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 5, 7, 9, generator=g) * 3
    target = torch.randint(0, 5, (2, 7, 9), generator=g)
    target[torch.rand(2, 7, 9, generator=g) < 0.4] = 255
    got = segmentation_loss(logits, target)
    assert abs(float(got) - loop_loss(logits, target)) < 1e-5
    # every pixel ignored: 0 with a graph (torch's mean would be NaN), zero gradient
    lg = logits.clone().requires_grad_(True)
    none = segmentation_loss(lg, torch.full_like(target, 255))
    none.backward()
    assert float(none.detach()) == 0.0 and torch.count_nonzero(lg.grad) == 0


# ------------------------------------------------------------------------------------ schedule
def test_poly_schedule_and_lr_multipliers_match_the_formula(tiny_set, tmp_path):
    steps = 5
    args = parse_args(
        seg_argv(tiny_set, tmp_path / "o", "--steps", str(steps), "--lr", "0.03", "--save-every", "0")
    )
    trainer = SegTrainer(args)
    # the tiny net has no pretrained part; make its classifier a "new" layer to see the 10x group
    trainer.model.new_modules = lambda: [trainer.model.classifier]
    trainer.optimizer = torch.optim.SGD(seg_param_groups(trainer.model, 0.03, 5e-4), lr=0.03, momentum=0.9)
    seen = []
    inner = trainer.optimizer.step

    def spy(*a, **k):
        seen.append([g["lr"] for g in trainer.optimizer.param_groups])
        return inner(*a, **k)

    trainer.optimizer.step = spy
    trainer.fit()
    assert len(seen) == steps
    for t in range(steps):
        want = 0.03 * (1.0 - t / steps) ** 0.9   # literal formula, lr set before update t (0-based)
        assert seen[t] == pytest.approx([want, 10 * want], rel=1e-12)
    # DeepLab-v2: the ASPP (new layers) at 10x, the backbone at 1x
    model = build_segmentation_model("deeplabv2-resnet101", 3)
    groups = seg_param_groups(model, 1e-3, 5e-4)
    aspp = {id(p) for p in model.aspp.parameters()}
    assert [g["lr_mult"] for g in groups] == [1.0, 10.0]
    assert {id(p) for p in groups[1]["params"]} == aspp
    assert not aspp & {id(p) for p in groups[0]["params"]}


# ------------------------------------------------------------------------------------ resume
def test_resume_mid_epoch_gives_the_weights_of_an_uninterrupted_run(tiny_set, tmp_path):
    from rca_fast.segment.__main__ import main
    steps = ["--steps", "7", "--save-every", "0"]   # 12 images / batch 4 = 3 steps per epoch
    main(seg_argv(tiny_set, tmp_path / "a", *steps))
    main(seg_argv(tiny_set, tmp_path / "b", *steps, "--max-steps", "4"))
    stopped = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert stopped["step"] == 4
    main(seg_argv(tiny_set, tmp_path / "b", *steps, "--resume", "auto"))
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 7
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a["optimizer"]["state"].items():   # momentum buffers too
        assert torch.equal(value["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    assert not torch.equal(a["model"]["classifier.weight"], stopped["model"]["classifier.weight"])


# ------------------------------------------------------------------------------------ data errors
def test_missing_or_mismatched_label_file_is_an_error_naming_it(tiny_set, tmp_path):
    names = [line.split()[0] for line in open(f"{tiny_set}/train_cls.txt")]
    labels = tmp_path / "labels"
    labels.mkdir()
    for n in names[1:]:
        os.link(f"{tiny_set}/SegmentationClass/{n}.png", labels / f"{n}.png")
    with pytest.raises(FileNotFoundError, match=str(labels / f"{names[0]}.png")):
        SegmentationPairs(f"{tiny_set}/train_cls.txt", f"{tiny_set}/JPEGImages", str(labels), 7, train=True,
                          crop_size=32)
    save_label_png(str(labels / f"{names[0]}.png"), np.zeros((40, 39), np.uint8))   # one column short
    with pytest.raises(ValueError, match=str(labels / f"{names[0]}.png")):
        SegmentationPairs(f"{tiny_set}/train_cls.txt", f"{tiny_set}/JPEGImages", str(labels), 7, train=True,
                          crop_size=32)
    save_label_png(str(labels / f"{names[0]}.png"), np.full((40, 40), 7, np.uint8))   # class 7 of 0..6
    ds = SegmentationPairs(f"{tiny_set}/train_cls.txt", f"{tiny_set}/JPEGImages", str(labels), 7, train=True,
                           crop_size=32)
    with pytest.raises(ValueError, match=str(labels / f"{names[0]}.png")):
        ds[(0, 0)]


def test_augmented_items_keep_image_and_label_aligned(tmp_path):
    """Scale, flip, pad and crop move the label with the image: images of 4x4-pixel blocks whose red
    value encodes the block's class; away from block edges the augmented red must still give the
    augmented label (bilinear and nearest resampling differ only near the edges)."""
    rng = np.random.default_rng(5)
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    names = []
    for k in range(3):
        label = np.kron(rng.integers(0, 7, (6, 5)), np.ones((4, 4), np.int64)).astype(np.uint8)  # 24 x 20
        image = np.stack([30 * label + 20, rng.integers(0, 255) + 0 * label, 100 + 0 * label], -1).astype(
            np.uint8
        )
        Image.fromarray(image).save(tmp_path / "img" / f"im{k}.png")
        save_label_png(str(tmp_path / "lab" / f"im{k}.png"), label)
        names.append(f"im{k}")
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    ds = SegmentationPairs(
        str(tmp_path / "list.txt"),
        str(tmp_path / "img"),
        str(tmp_path / "lab"),
        7,
        train=True,
        crop_size=22,
        scale_range=(0.8, 1.6),
    )
    std, mean = torch.tensor([0.229, 0.224, 0.225]), torch.tensor([0.485, 0.456, 0.406])
    checked = 0
    for index in range(3):
        for epoch in range(6):
            item = ds[(index, epoch)]
            again = ds[(index, epoch)]
            assert torch.equal(item["image"], again["image"]) and torch.equal(item["label"], again["label"])
            assert item["image"].shape == (3, 22, 22) and item["label"].shape == (22, 22)
            lab = item["label"]
            pad = lab == 255
            assert torch.all(item["image"][:, pad] == 0)   # padding: mean colour / ignore together
            red = (item["image"][0] * std[0] + mean[0]) * 255
            same = torch.ones_like(lab, dtype=torch.bool)   # 5x5 neighbourhood of one class
            padded = torch.nn.functional.pad(lab[None, None].float(), (2, 2, 2, 2), value=-1)[0, 0]
            for dy in range(5):
                for dx in range(5):
                    same &= padded[dy:dy + 22, dx:dx + 22] == lab.float()
            inner = same & ~pad
            decoded = torch.round((red - 20) / 30)
            assert torch.equal(decoded[inner], lab[inner].float()), (index, epoch)
            checked += int(inner.sum())
    assert checked > 500
    assert not torch.equal(ds[(0, 0)]["image"], ds[(0, 1)]["image"])   # a new draw every epoch


# ------------------------------------------------------------------------------------ evaluation
def test_multiscale_flip_probabilities_are_the_mean_over_scales_and_flips():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AvgPool2d(2)).eval()
    image = torch.randn(1, 3, 13, 17)
    single, multi = predict_probs(model, image, scales=(0.5, 1.0, 1.5), flip=True)
    want = torch.zeros(4, 13, 17)
    for s in (0.5, 1.0, 1.5):
        size = (max(1, round(13 * s)), max(1, round(17 * s)))
        x = torch.nn.functional.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True):
            inp = x.flip(-1) if flipped else x
            p = torch.softmax(torch.nn.functional.interpolate(model(inp), size=(13, 17), mode="bilinear",
                                                              align_corners=False), 1)[0]
            want += p.flip(-1) if flipped else p
    torch.testing.assert_close(multi, want / 6)
    torch.testing.assert_close(single, torch.softmax(torch.nn.functional.interpolate(
        model(image), size=(13, 17), mode="bilinear", align_corners=False), 1)[0])


def test_cli_end_to_end_metrics_match_the_written_predictions(tiny_set, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rca_fast.segment", *seg_argv(tiny_set, out, "--steps", "4", "--val_list",
           f"{tiny_set}/val_cls.txt", "--gt", f"{tiny_set}/SegmentationClass", "--overlays", "2")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["steps"] == 4 and metrics["eval"]["images"] == 5
    # independent score of the PNGs written: per-class IoU by counting, 255 left out
    inter, union = np.zeros(7), np.zeros(7)
    preds = sorted(glob.glob(str(out / "pred" / "*.png")))
    assert len(preds) == 5 and len(os.listdir(out / "overlays")) == 2
    for path in preds:
        with Image.open(path) as img:
            assert img.mode == "P"
            pred = np.array(img)
        gt = np.array(Image.open(f"{tiny_set}/SegmentationClass/{os.path.basename(path)}"))
        valid = gt != 255
        for c in range(7):
            inter[c] += np.sum((pred == c) & (gt == c) & valid)
            union[c] += np.sum(((pred == c) | (gt == c)) & valid)
    miou = np.mean([inter[c] / union[c] for c in range(7) if union[c] > 0])
    assert metrics["miou"] == pytest.approx(miou, abs=1e-12)
    assert metrics["eval"]["variant"] == "multi_scale_flip"
    # a missing label file stops the program with its name (exit 2, no traceback)
    os.rename(f"{tiny_set}/SegmentationClass/syn_train_00003.png", tmp_path / "moved.png")
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    finally:
        os.rename(tmp_path / "moved.png", f"{tiny_set}/SegmentationClass/syn_train_00003.png")
    assert res.returncode == 2 and "syn_train_00003.png" in res.stderr and "Traceback" not in res.stderr


# ------------------------------------------------------------------------------------ models
def test_deeplabv2_is_a_stride_8_resnet101_with_torchvision_names(tmp_path):
    import torchvision
    ref = torchvision.models.resnet101(weights=None)
    path = tmp_path / "r101.pth"
    torch.save(ref.state_dict(), path)
    model = build_segmentation_model("deeplabv2-resnet101", 21, pretrained=str(path))
    own = model.backbone.state_dict()
    assert set(own) == {k for k in ref.state_dict() if not k.startswith("fc.")}
    for k, v in own.items():
        assert torch.equal(v, ref.state_dict()[k]), k
    model.train()
    assert not model.backbone.bn1.training and not model.backbone.bn1.weight.requires_grad   # frozen BN
    with torch.no_grad():
        assert model(torch.randn(1, 3, 33, 47)).shape == (1, 21, 5, 6)   # ceil(33/8), ceil(47/8)
    bad = {k: v for k, v in ref.state_dict().items() if k != "layer3.22.conv2.weight"}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="layer3.22.conv2.weight"):
        build_segmentation_model("deeplabv2-resnet101", 21, pretrained=str(tmp_path / "bad.pth"))
    v3 = build_segmentation_model("deeplabv3-resnet50", 4).eval()
    with torch.no_grad():
        assert v3(torch.randn(1, 3, 33, 47)).shape == (1, 4, 5, 6)


def test_segment_imports_no_other_program():
    """DESIGN §4: no program imports another program (train, infer, evaluate, pseudo, pretrain, profile)."""
    programs = (
        "rca_fast.train", "rca_fast.infer", "rca_fast.evaluate", "rca_fast.pseudo", "rca_fast.pretrain",
        "rca_fast.profile",
    )
    for path in glob.glob(os.path.join(ROOT, "rca_fast", "segment", "*.py")):
        imported = []
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                imported += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ["rca_fast", "segment"][:3 - node.level] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                imported += [mod] + [f"{mod}.{a.name}" for a in node.names]
        assert "rca_fast.data.seg_pairs.SegmentationPairs" in imported or path.endswith("args.py") \
            or path.endswith("__init__.py")   # the reader resolves relative imports
        bad = [n for n in imported if n in programs or n.startswith(tuple(p + "." for p in programs))]
        assert not bad, f"{path} imports the program(s) {bad}"
