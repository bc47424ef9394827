"""Metrics, ``python -m rca_fast.infer`` and ``python -m rca_fast.evaluate`` on tiny inputs.

The mIoU oracles are plain Python loops over pixels written here.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from rca_fast import evaluate as evaluate_mod
from rca_fast import infer as infer_mod
from rca_fast.data import DataFileError
from rca_fast.data.synthetic import SyntheticShapes, export_voc
from rca_fast.train import main as train_main
from rca_fast.utils.metrics import CamSweepMeter, ConfusionMeter, cam_to_label
from rca_fast.utils.palette import save_label_png

TINY = ["--input_size", "32", "--crop_size", "32", "--batch_size", "4", "--bank-slots", "8", "--prototypes", "2",
        "--no-progress", "--threads", "1"]


# ---------------------------------------------------------------- oracles
def iou_oracle(pairs, num_classes):
    """Per-class IoU by counting pixels one at a time; pred 255 is a miss, gt 255 is skipped."""
    tp = [0] * num_classes
    fp = [0] * num_classes
    fn = [0] * num_classes
    for pred, gt in pairs:
        for p, g in zip(np.asarray(pred).reshape(-1).tolist(), np.asarray(gt).reshape(-1).tolist()):
            if g == 255:
                continue
            if p == g:
                tp[g] += 1
            else:
                fn[g] += 1
                if p != 255:
                    fp[p] += 1
    ious = []
    for c in range(num_classes):
        union = tp[c] + fp[c] + fn[c]
        ious.append(tp[c] / union if union else float("nan"))
    valid = [v for v in ious if v == v]
    return ious, sum(valid) / len(valid)


def cam_label_oracle(cams, keys, t):
    """Label map pixel by pixel: the best class if its value is > t, else background."""
    k, H, W = cams.shape
    out = np.zeros((H, W), np.int64)
    for y in range(H):
        for x in range(W):
            best, value = -1, None
            for i in range(k):
                v = float(cams[i, y, x])
                if value is None or v > value:
                    best, value = i, v
            if value is not None and value > t:
                out[y, x] = int(keys[best]) + 1
    return out


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
    evaluate_mod.main(["--pred", str(tmp_path), "--gt", str(tmp_path / "gt"), "--list", str(tmp_path / "list.txt"),
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
    train_main(TINY + ["--num-images", "8", "--val-images", "3", "--epoch", "1", "--max-steps", "2",
                       "--num_classes", "4", "--out", str(out)])
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
                                 str(out / "list.txt"), "--num-classes", "5", "--out", str(ev), "--no-progress"])
    assert 0 <= metrics["miou"] <= 1 and "best_threshold" in metrics
    assert metrics["class_names"] == ["background"] + ds.class_names  # read from infer.json


def test_infer_voc_folder(tmp_path):
    root = tmp_path / "voc"
    export_voc(str(root), train=6, val=3, num_classes=3, image_size=32, seed=4)
    run = tmp_path / "run"
    train_main(TINY + ["--dataset", "voc", "--data-root", str(root), "--backbone", "tiny", "--num_classes", "3",
                       "--num_workers", "0", "--max-steps", "1", "--out", str(run)])
    out = tmp_path / "inf"
    infer_mod.main(["--checkpoint", str(run / "checkpoint.pt"), "--dataset", "voc", "--data-root", str(root),
                    "--list", str(root / "val_cls.txt"), "--out", str(out), "--scales", "1.0", "--no-flip",
                    "--ignore-margin", "0.05", "--no-progress", "--device", "cpu"])
    names = [l.split()[0] for l in (root / "val_cls.txt").read_text().splitlines()]
    for name in names:
        data = np.load(out / "cams" / f"{name}.npy", allow_pickle=True).item()
        assert data["high_res"].shape[1:] == (32, 32)
        pseudo = np.asarray(Image.open(out / "pseudo" / f"{name}.png"))
        top = data["high_res"].max(axis=0)
        t = json.loads((out / "infer.json").read_text())["bg_threshold"]
        assert np.all(pseudo[np.abs(top - t) < 0.05] == 255)
    with pytest.raises(DataFileError, match=r"JPEGImages[/\\]ghost\.jpg"):
        (tmp_path / "ghost.txt").write_text("ghost 0\n")
        infer_mod.main(["--checkpoint", str(run / "checkpoint.pt"), "--dataset", "voc", "--data-root", str(root),
                        "--list", str(tmp_path / "ghost.txt"), "--out", str(out), "--no-progress"])
    with pytest.raises(FileNotFoundError, match="no_such.pt"):
        infer_mod.main(["--checkpoint", str(tmp_path / "no_such.pt"), "--out", str(out)])
