"""Metrics, ``python -m rca_fast.infer`` and ``python -m rca_fast.evaluate`` on tiny inputs.

The mIoU and CAM oracles (tests/oracles.py) are plain Python loops over pixels and passes.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from oracles import cam_label_oracle, cam_oracle, iou_oracle
from rca_fast import evaluate as evaluate_mod, infer as infer_mod
from rca_fast.data import DataFileError
from rca_fast.data.synthetic import SyntheticShapes, export_voc
from rca_fast.model.config import build_model
from rca_fast.train import main as train_main
from rca_fast.utils.cams import normalise_cams
from rca_fast.utils.checkpoint import load_checkpoint
from rca_fast.utils.metrics import CamSweepMeter, ConfusionMeter, cam_to_label
from rca_fast.utils.palette import save_label_png

TINY = ["--input_size", "32", "--crop_size", "32", "--batch_size", "4", "--bank-slots", "8", "--prototypes",
        "2",
        "--no-progress", "--threads", "1"]


def random_case(gen, C, H, W, n):
    """n (pred, gt) pairs with blobs, GT 255 borders and some predicted 255."""
    pairs = []
    for _ in range(n):
        gt = torch.randint(0, C, (H, W), generator=gen).numpy()
        gt[0, :] = 255
        pred = gt.copy()
        flip = torch.rand(H, W, generator=gen).numpy() < 0.3
        pred[flip] = torch.randint(0, C, (int(flip.sum()),), generator=gen).numpy()
        pred[torch.rand(H, W, generator=gen).numpy() < 0.05] = 255
        pairs.append((pred, gt))
    return pairs


# ---------------------------------------------------------------- metrics
@pytest.mark.parametrize("C,H,W", [(4, 7, 13), (21, 9, 11)], ids=["C4-HW7x13", "C21-HW9x11"])
def test_confusion_meter_matches_loop(C, H, W, gen):
    pairs = random_case(gen, C, H, W, 3)
    meter = ConfusionMeter(C)
    for p, g in pairs:
        meter.update(p, g)
    want_iou, want_miou = iou_oracle(pairs, C)
    got = meter.iou()
    for c in range(C):
        assert (np.isnan(got[c]) and want_iou[c] != want_iou[c]) or abs(got[c] - want_iou[c]) < 1e-12
    assert abs(meter.miou() - want_miou) < 1e-12


def test_confusion_meter_rejects_bad_input():
    m = ConfusionMeter(3)
    with pytest.raises(ValueError, match="shape"):
        m.update(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="outside"):
        m.update(np.full((2, 2), 7), np.zeros((2, 2)))


@pytest.mark.parametrize("L,H,W", [(3, 7, 13), (5, 6, 9)], ids=["L3-HW7x13", "L5-HW6x9"])
def test_cam_sweep_matches_loop(L, H, W, gen):
    thresholds = np.round(np.arange(0, 11) * 0.05, 2)
    meter = CamSweepMeter(L + 1, thresholds)
    images = []
    for _ in range(3):
        count = int(torch.randint(1, L + 1, (1,), generator=gen))
        keys = torch.randperm(L, generator=gen)[:count].sort().values.numpy()
        cams = torch.rand(len(keys), H, W, generator=gen, dtype=torch.float64).numpy()
        cams[0, 0, 0] = 0.25  # a value equal to a threshold: background at 0.25, class above
        gt = torch.randint(0, L + 1, (H, W), generator=gen).numpy()
        gt[-1, :] = 255
        meter.update(cams, keys, gt)
        images.append((cams, keys, gt))
    res = meter.result()
    for ti, t in enumerate(thresholds):
        pairs = [(cam_label_oracle(c, k, t), g) for c, k, g in images]
        _, want = iou_oracle(pairs, L + 1)
        assert abs(res["miou_per_threshold"][ti] - want) < 1e-12, f"threshold {t}"
        for c, k, g in images:
            assert np.array_equal(cam_to_label(c, k, t), cam_label_oracle(c, k, t))
    best = int(np.argmax(res["miou_per_threshold"]))
    assert res["best_threshold"] == thresholds[best]


# ---------------------------------------------------------------- evaluate CLI
def _hand_made(tmp_path, gen, C=4, n=3, H=9, W=13):
    names = [f"img{i}" for i in range(n)]
    pairs = random_case(gen, C, H, W, n)
    for d in ("gt", "pred"):
        os.makedirs(tmp_path / d, exist_ok=True)
    for name, (pred, gt) in zip(names, pairs):
        save_label_png(str(tmp_path / "gt" / f"{name}.png"), gt)
        save_label_png(str(tmp_path / "pred" / f"{name}.png"), pred)
    (tmp_path / "list.txt").write_text("".join(f"{n} 0\n" for n in names))
    return names, pairs


def test_evaluate_png_cli(tmp_path, gen, capsys):
    names, pairs = _hand_made(tmp_path, gen)
    out = tmp_path / "ev"
    evaluate_mod.main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--list",
                       str(tmp_path / "list.txt"), "--num-classes", "4", "--out", str(out), "--no-progress"])
    metrics = json.loads((out / "metrics.json").read_text())
    want_iou, want_miou = iou_oracle(pairs, 4)
    assert abs(metrics["miou"] - want_miou) < 1e-9
    assert all(abs(a - b) < 1e-9 for a, b in zip(metrics["per_class_iou"], want_iou))
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "class 2" in printed


def test_evaluate_npy_sweep_cli(tmp_path, gen):
    L, H, W = 3, 8, 10
    names = ["a", "b"]
    os.makedirs(tmp_path / "cams")
    os.makedirs(tmp_path / "gt")
    images = []
    for name in names:
        keys = np.array([0, 2])
        cams = torch.rand(2, H, W, generator=gen).numpy().astype(np.float32)
        gt = torch.randint(0, L + 1, (H, W), generator=gen).numpy()
        np.save(tmp_path / "cams" / f"{name}.npy", {"keys": keys, "high_res": cams})
        save_label_png(str(tmp_path / "gt" / f"{name}.png"), gt)
        images.append((cams, keys, gt))
    (tmp_path / "list.txt").write_text("a 0 2\nb 0 2\n")
    out = tmp_path / "ev"
    # the infer output folder (cams/ inside) is accepted as --pred
    evaluate_mod.main(["--pred", str(tmp_path), "--gt", str(tmp_path / "gt"), "--list",
                       str(tmp_path / "list.txt"),
                       "--num-classes", str(L + 1), "--out", str(out), "--no-progress"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["thresholds"]) == 61 and metrics["thresholds"][-1] == 0.6
    curve = []
    for t in metrics["thresholds"]:
        _, m = iou_oracle([(cam_label_oracle(c, k, t), g) for c, k, g in images], L + 1)
        curve.append(m)
    assert max(abs(a - b) for a, b in zip(curve, metrics["miou_per_threshold"])) < 1e-9
    assert abs(metrics["miou"] - max(curve)) < 1e-9
    assert metrics["best_threshold"] == metrics["thresholds"][int(np.argmax(curve))]
    assert (out / "sweep.png").is_file()


def test_evaluate_names_missing_files(tmp_path, gen):
    _hand_made(tmp_path, gen)
    os.remove(tmp_path / "gt" / "img1.png")
    with pytest.raises(DataFileError, match=r"gt[/\\]img1\.png"):
        evaluate_mod.main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--list",
                           str(tmp_path / "list.txt"), "--out", str(tmp_path / "ev"), "--num-classes", "4",
                           "--no-progress"])
    with pytest.raises(DataFileError, match=r"nothere[/\\]img0"):
        evaluate_mod.main(["--pred", str(tmp_path / "nothere"), "--gt", str(tmp_path / "gt"), "--list",
                           str(tmp_path / "list.txt"), "--out", str(tmp_path / "ev"), "--no-progress"])


# ---------------------------------------------------------------- infer CLI
@pytest.fixture(scope="module")
def synthetic_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn_run")
    # softmax aggregation: the public default's linear one (scores x 20/K summed over every
    # prototype, issue 19) carries float32 rounding of ~3e-4 into the CAMs, over the 1e-4 the
    # multi-scale oracle below allows; what these tests check is the inference, not the aggregation
    train_main(TINY + ["--num-images", "8", "--val-images", "3", "--epoch", "1", "--max-steps", "2",
                       "--num_classes", "4", "--aggregation", "softmax", "--out", str(out)])
    return out / "checkpoint.pt"


def test_infer_synthetic_then_evaluate(synthetic_checkpoint, tmp_path):
    out = tmp_path / "inf"
    infer_mod.main(["--checkpoint", str(synthetic_checkpoint), "--out", str(out), "--scales", "1.0,0.5",
                    "--bg-threshold", "0.3", "--overlays", "--no-progress", "--device", "cpu"])
    ds = SyntheticShapes(3, 4, 32, seed=0, split="val")
    lines = (out / "list.txt").read_text().split()
    assert lines[0] == ds.names[0]
    for i, name in enumerate(ds.names):
        data = np.load(out / "cams" / f"{name}.npy", allow_pickle=True).item()
        keys, cams = data["keys"], data["high_res"]
        assert keys.tolist() == np.flatnonzero(ds.labels[i]).tolist()
        assert cams.shape == (len(keys), 32, 32) and cams.dtype == np.float32
        assert cams.min() >= 0 and cams.max() <= 1 + 1e-6
        for c in range(len(keys)):  # each class divided by its maximum: 1 unless all zero
            assert abs(cams[c].max() - 1) < 1e-3 or cams[c].max() == 0
        pseudo = np.asarray(Image.open(out / "pseudo" / f"{name}.png"))
        assert np.array_equal(pseudo, cam_label_oracle(cams, keys, 0.3))
        assert np.array_equal(np.asarray(Image.open(out / "gt" / f"{name}.png")), ds.masks[i])
        assert (out / "overlays" / f"{name}.jpg").is_file()
    ev = tmp_path / "ev"
    metrics = evaluate_mod.main(["--pred", str(out / "cams"), "--gt", str(out / "gt"), "--list",
                                 str(out / "list.txt"), "--num-classes", "5", "--out", str(ev),
                                 "--no-progress"])
    images = []
    for i, name in enumerate(ds.names):
        data = np.load(out / "cams" / f"{name}.npy", allow_pickle=True).item()
        images.append((data["high_res"], data["keys"], ds.masks[i]))
    # the sweep's best point and a few others against the pixel loops (all 61 would take seconds)
    best = metrics["thresholds"].index(metrics["best_threshold"])
    for ti in sorted({best, 0, 17, 42}):
        t = metrics["thresholds"][ti]
        _, want = iou_oracle([(cam_label_oracle(c, k, t), g) for c, k, g in images], 5)
        assert abs(metrics["miou_per_threshold"][ti] - want) < 1e-9, f"threshold {t}"
    assert metrics["miou"] == max(metrics["miou_per_threshold"])
    assert metrics["class_names"] == ["background"] + ds.class_names  # read from infer.json


def pseudo_label_oracle(cams, keys, t, margin):
    """The pseudo label pixel by pixel: ignore (255) within ``margin`` of the threshold on either
    side, else the CAM label."""
    label = cam_label_oracle(cams, keys, t)
    if len(keys):
        for y in range(cams.shape[1]):
            for x in range(cams.shape[2]):
                if abs(float(cams[:, y, x].max()) - t) < margin:
                    label[y, x] = 255
    return label


@torch.no_grad()
def test_infer_cams_match_a_multiscale_flip_loop(synthetic_checkpoint, tmp_path):
    """The saved CAMs equal the loop above divided per class by its maximum; the pseudo labels
    equal the pixel oracle on both sides of the ignore margin."""
    out, t, margin = tmp_path / "inf", 0.3, 0.1
    scales = (1.0, 0.5, 1.5)
    infer_mod.main(["--checkpoint", str(synthetic_checkpoint), "--out", str(out), "--scales", "1.0,0.5,1.5",
                    "--bg-threshold", str(t), "--ignore-margin", str(margin), "--no-progress", "--device",
                    "cpu",
                    "--threads", "1"])
    state = load_checkpoint(str(synthetic_checkpoint))
    model = build_model(state["model_config"])
    model.load_state_dict(state["model"])
    model.eval()
    ds = SyntheticShapes(3, 4, 32, seed=0, split="val")
    near = far = 0  # pixels just inside / just outside the margin: the check must see both kinds
    lit = negative = 0  # classes with a non-zero CAM, negative raw CAM values (else the ReLU is untested)
    for i, name in enumerate(ds.names):
        data = np.load(out / "cams" / f"{name}.npy", allow_pickle=True).item()
        keys, cams = data["keys"], data["high_res"]
        assert keys.tolist() == np.flatnonzero(ds.labels[i]).tolist() and len(keys)
        raw = cam_oracle(model, ds[i]["image"], scales, (32, 32))[keys]
        peak = raw.max(axis=(1, 2), keepdims=True)
        want = np.where(peak > 0, raw / np.where(peak > 0, peak, 1), 0)
        lit += int((peak > 0).sum())
        negative += int((model(ds[i]["image"][None]).cams < 0).sum())
        np.testing.assert_allclose(cams, want, rtol=0, atol=1e-4)
        pseudo = np.asarray(Image.open(out / "pseudo" / f"{name}.png"))
        assert np.array_equal(pseudo, pseudo_label_oracle(cams, keys, t, margin))
        gap = np.abs(cams.max(axis=0) - t)
        near += int(((gap < margin) & (gap > margin / 2)).sum())
        far += int(((gap >= margin) & (gap < 2 * margin)).sum())
    assert near > 0 and far > 0 and lit >= 3 and negative > 0, (near, far, lit, negative)


def test_normalise_cams_clamps_negatives_and_divides_by_the_maximum(gen):
    cams = torch.randn(2, 3, 5, 7, generator=gen, dtype=torch.float64)
    cams[1, 2] = -cams[1, 2].abs()  # a map with no positive value becomes 0, not a negative ratio
    got = normalise_cams(cams, eps=0.0 + 1e-12)
    for b in range(2):
        for l in range(3):
            peak = max(0.0, float(cams[b, l].max()))
            for y in range(5):
                for x in range(7):
                    want = max(0.0, float(cams[b, l, y, x])) / (peak + 1e-12)
                    assert abs(float(got[b, l, y, x]) - want) < 1e-9
    present = torch.tensor([[1, 0, 1], [0, 1, 1]])
    masked = normalise_cams(cams, present)
    assert bool((masked[0, 1] == 0).all()) and bool((masked[1, 0] == 0).all())
    assert bool((masked[0, 0] > 0).any())


def test_infer_voc_folder(tmp_path):
    """A VOC folder with IRN class labels, one image tagged with no class: its CAM file is empty and
    its pseudo label all background; the pseudo labels match the oracle on both sides of the
    margin; evaluate scores the CAMs and the PNGs as the pixel loops do (a class absent
    everywhere is left out of the mean, not counted as 0)."""
    root = tmp_path / "voc"
    export_voc(str(root), train=6, val=3, num_classes=3, image_size=32, seed=4)
    run = tmp_path / "run"
    train_main(TINY + ["--dataset", "voc", "--data-root", str(root), "--backbone", "tiny", "--num_classes",
                       "3",
                       "--num_workers", "0", "--max-steps", "1", "--out", str(run)])
    names = [l.split()[0] for l in (root / "val_cls.txt").read_text().splitlines()]
    tags = {n: np.zeros(3, np.float32) for n in names}
    for line in (root / "val_cls.txt").read_text().splitlines():
        for c in line.split()[1:]:
            tags[line.split()[0]][int(c)] = 1
    tags[names[1]][:] = 0  # no present class
    np.save(tmp_path / "cls_labels.npy", tags)
    (tmp_path / "bare.txt").write_text("".join(n + "\n" for n in names))
    out = tmp_path / "inf"
    infer_mod.main(["--checkpoint", str(run / "checkpoint.pt"), "--dataset", "voc", "--data-root", str(root),
                    "--list", str(tmp_path / "bare.txt"), "--cls-labels", str(tmp_path / "cls_labels.npy"),
                    "--out", str(out), "--scales", "1.0", "--no-flip", "--bg-threshold", "0.2",
                    "--ignore-margin", "0.05", "--no-progress", "--device", "cpu"])
    images, pairs = [], []
    for name in names:
        data = np.load(out / "cams" / f"{name}.npy", allow_pickle=True).item()
        keys, cams = data["keys"], data["high_res"]
        assert keys.tolist() == np.flatnonzero(tags[name]).tolist()
        assert cams.shape == (len(keys), 32, 32)
        pseudo = np.asarray(Image.open(out / "pseudo" / f"{name}.png"))
        assert np.array_equal(pseudo, pseudo_label_oracle(cams, keys, 0.2, 0.05))
        if name == names[1]:
            assert not pseudo.any()
        gt = np.asarray(Image.open(root / "SegmentationClass" / f"{name}.png"))
        images.append((cams, keys, gt))
        pairs.append((pseudo, gt))
    for pred, kind in ((out, "npy"), (out / "pseudo", "png")):
        metrics = evaluate_mod.main(["--pred", str(pred), "--gt", str(root / "SegmentationClass"), "--list",
                                     str(tmp_path / "bare.txt"), "--num-classes", "5", "--out",
                                     str(tmp_path / f"ev_{kind}"), "--no-progress"]
                                    + (["--bg-threshold", "0.2"] if kind == "npy" else []))
        if kind == "npy":
            pairs_at = [(cam_label_oracle(c, k, 0.2), g) for c, k, g in images]
        else:
            pairs_at = pairs
        want_iou, want = iou_oracle(pairs_at, 5)
        assert want_iou[4] != want_iou[4]  # class 4 appears nowhere: NaN, left out of the mean
        assert abs(metrics["miou"] - want) < 1e-9, kind
    with pytest.raises(DataFileError, match=r"JPEGImages[/\\]ghost\.jpg"):
        (tmp_path / "ghost.txt").write_text("ghost 0\n")
        infer_mod.main(["--checkpoint", str(run / "checkpoint.pt"), "--dataset", "voc", "--data-root",
                        str(root),
                        "--list", str(tmp_path / "ghost.txt"), "--out", str(out), "--no-progress"])
    with pytest.raises(FileNotFoundError, match="no_such.pt"):
        infer_mod.main(["--checkpoint", str(tmp_path / "no_such.pt"), "--out", str(out)])
