"""``python -m rca_fast.train`` smoke runs on tiny inputs, resume, schedule, bank, bad paths."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from oracles import cam_label_oracle, cam_oracle, iou_oracle
from rca_fast.data.synthetic import SyntheticShapes, export_voc
from rca_fast.model.config import build_model
from rca_fast.train import Trainer, main
from rca_fast.utils.checkpoint import load_checkpoint
from rca_fast.utils.train_args import parse_args

TINY = ["--input_size", "32", "--crop_size", "32", "--batch_size", "4", "--bank-slots", "16", "--prototypes",
        "2",
        "--no-progress", "--threads", "1", "--num_classes", "3"]
SYN = TINY + ["--num-images", "8", "--val-images", "3"]  # 2 steps per epoch


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """Trainers built directly set torch's CPU threads: restore them for the other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_synthetic_smoke_writes_checkpoint_and_metrics(tmp_path):
    att = tmp_path / "att"
    metrics = main(SYN + ["--epoch", "2", "--out", str(tmp_path), "--att_dir", str(att)])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["steps"] == 4 and saved["epochs"] == 2 and saved["seconds"] > 0
    assert saved["cpu_threads"] == 1, "the thread count a CPU run trained with is recorded (--threads 1)"
    assert saved["cam_miou"] == metrics["cam_miou"] == max(saved["cam_miou_per_threshold"])
    assert len(saved["cam_miou_per_threshold"]) == 61
    state = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    check_cam_miou(state, saved)
    assert state["epoch"] == 2 and state["step"] == 4 and state["epoch_done"]
    for key in ("bank.bank", "bank.ptr", "bank.prototypes"):
        assert key in state["model"], key
    assert state["optimizer"]["state"], "optimiser momentum buffers are saved"
    assert state["model_config"]["num_classes"] == 3
    assert any(name.endswith(".png") for name in os.listdir(att))
    assert (tmp_path / "train.log").read_text().count("epoch ") >= 2


@torch.no_grad()
def check_cam_miou(state, saved):
    """The trainer's CAM mIoU against the test's own pipeline: the saved model's final-head CAMs
    of the 3 validation images (scale 1 + flip loop, ReLU, per-class maximum), the label map
    pixel by pixel at the reported best threshold (and one other), IoU by counting pixels.  Up to
    a pixel or two at a threshold (float32 vs float64 CAMs): 5e-3."""
    model = build_model(state["model_config"])
    model.load_state_dict(state["model"])
    model.eval()
    ds = SyntheticShapes(3, 3, 32, seed=0, split="val")
    images = []
    for i in range(len(ds)):
        keys = np.flatnonzero(ds.labels[i])
        raw = cam_oracle(model, ds[i]["image"], (1.0,), (32, 32))[keys]
        peak = raw.max(axis=(1, 2), keepdims=True)
        images.append((np.where(peak > 0, raw / np.where(peak > 0, peak, 1), 0), keys, ds.masks[i]))
    thresholds = np.round(np.arange(61) * 0.01, 2)
    for t in (saved["cam_best_threshold"], 0.05):
        _, want = iou_oracle([(cam_label_oracle(c, k, t), g) for c, k, g in images], 4)
        got = saved["cam_miou_per_threshold"][int(np.argmin(np.abs(thresholds - t)))]
        assert abs(got - want) < 5e-3, (t, got, want)


def test_bank_rows_reach_the_bank_and_never_require_grad(tmp_path):
    """Score threshold -1 lets every region row through: the ring pointers advance by exactly the
    rows the trainer reports, and the bank stays a buffer."""
    args = parse_args(SYN + ["--epoch", "2", "--score-threshold", "-1", "--bank-slots", "32", "--out",
                             str(tmp_path)])
    trainer = Trainer(args)
    before = trainer.model.bank.bank.clone()
    rows = 0
    for epoch in (1, 2):
        rows += trainer.train_epoch(epoch)["bank_rows"]
    bank = trainer.model.bank
    assert rows > 0 and int(bank.ptr.sum()) == rows  # 32 slots per class: at most 16 rows of a class, no wrap
    assert not bank.bank.requires_grad and not torch.equal(bank.bank, before)
    # prototypes are refreshed from the bank at every epoch start
    assert bank.prototypes.abs().sum() > 0


def test_contrast_starts_at_epoch_three_and_ablations(tmp_path):
    """Epochs 1-2: loss = cls + 0.4 coarse; from epoch 3 (the public code's 0-based epoch 2):
    + 0.01 contrast (means of per-step terms)."""
    args = parse_args(SYN + ["--epoch", "3", "--out", str(tmp_path)])
    trainer = Trainer(args)
    for epoch in (1, 2):
        first = trainer.train_epoch(epoch)
        assert first["contrast"] > 0  # computed and reported, not yet added
        assert abs(first["loss"] - (first["cls"] + 0.4 * first["coarse_cls"])) < 1e-5
    third = trainer.train_epoch(3)
    assert abs(third["loss"] - (third["cls"] + 0.4 * third["coarse_cls"] + 0.01 * third["contrast"])) < 1e-4
    off = Trainer(parse_args(SYN + ["--no-contrast", "--no-aggregation", "--out", str(tmp_path / "b")]))
    assert off.train_epoch(1)["contrast"] == 0.0 and not off.uses_bank
    assert off.model.aggregation.mode == "none"


def test_step_reads_no_labels_back_from_the_device(tmp_path, monkeypatch):
    """The trainer checks the batch's 0/1 tags on the loader's host tensor and hands the model bool
    labels, so RCAModel's own value check (a read-back from the device: a host sync per step) does
    not run; the baseline (no contrast, no aggregation) uses no bank row and gets no labels."""
    from rca_fast.model import RCAModel
    reads, given = [], []
    check, to_bool = RCAModel._check_inputs, torch.Tensor.__bool__

    def spy(self, images, labels):
        given.append(None if labels is None else labels.dtype)
        monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(1) or to_bool(t))
        try:
            return check(self, images, labels)
        finally:
            monkeypatch.setattr(torch.Tensor, "__bool__", to_bool)

    monkeypatch.setattr(RCAModel, "_check_inputs", spy)
    trainer = Trainer(parse_args(SYN + ["--out", str(tmp_path / "a")]))
    batch = next(iter(trainer.batches(1)))
    trainer.train_step(batch, 1)
    assert given == [torch.bool] and not reads
    base = Trainer(parse_args(SYN + ["--no-contrast", "--no-aggregation", "--out", str(tmp_path / "b")]))
    base.train_step(batch, 1)
    assert given[-1] is None
    bad = dict(batch, label=batch["label"] * 0.5)
    with pytest.raises(ValueError, match="0/1"):
        trainer.train_step(bad, 1)


def test_lr_schedule_follows_decay_points(tmp_path):
    args = parse_args(SYN + ["--epoch", "4", "--lr", "0.003", "--decay_points", "1,3", "--out",
                             str(tmp_path)])
    trainer = Trainer(args)
    for epoch in range(1, 5):
        factor = 1.0
        for point in (1, 3):
            if epoch > point:
                factor *= 0.1
        trainer.set_lr(epoch)
        for group in trainer.optimizer.param_groups:
            assert abs(group["lr"] - 0.003 * group["lr_mult"] * factor) < 1e-15
    mults = sorted(g["lr_mult"] for g in trainer.optimizer.param_groups)
    assert mults == [1, 2, 10, 20]
    for group in trainer.optimizer.param_groups:
        assert group["momentum"] == 0.9 and group["nesterov"]


def test_resume_continues_a_partial_epoch(tmp_path):
    main(SYN + ["--epoch", "2", "--max-steps", "3", "--val-images", "0", "--out", str(tmp_path)])
    state = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert (state["epoch"], state["step"], state["epoch_done"], state["batch_in_epoch"]) == (2, 3, False, 1)
    # resuming with the same budget trains nothing: the weights are exactly the checkpoint's
    args = parse_args(SYN + ["--epoch", "2", "--max-steps", "3", "--resume", str(tmp_path / "checkpoint.pt"),
                             "--out", str(tmp_path / "again")])
    trainer = Trainer(args)
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, state["model"][key]), key
    assert trainer.optimizer.state_dict()["state"].keys() == state["optimizer"]["state"].keys()
    # resuming with the full budget finishes epoch 2 (its second batch) and stops
    main(SYN + ["--epoch", "2", "--resume", str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path / "more")])
    final = load_checkpoint(str(tmp_path / "more" / "checkpoint.pt"))
    assert (final["epoch"], final["step"], final["epoch_done"]) == (2, 4, True)
    key = "coarse_head.classifier.weight"
    assert not torch.equal(final["model"][key], state["model"][key])


def test_resume_rejects_a_different_model(tmp_path):
    main(SYN + ["--max-steps", "1", "--val-images", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="bank_slots"):
        main(SYN + ["--bank-slots", "8", "--resume", str(tmp_path / "checkpoint.pt"), "--out",
                    str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        main(SYN + ["--resume", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "y")])


def test_voc_folder_smoke_with_list_and_irn_labels(tmp_path):
    root = tmp_path / "voc"
    export_voc(str(root), train=6, val=3, num_classes=3, image_size=32, seed=1)
    common = TINY + ["--dataset", "voc", "--data-root", str(root), "--backbone", "tiny", "--num_workers", "0",
                     "--max-steps", "2"]
    metrics = main(common + ["--out", str(tmp_path / "a")])
    assert metrics["steps"] == 2 and metrics["cam_images"] == 3
    assert metrics["cam_miou"] == max(metrics["cam_miou_per_threshold"])
    # bare names + IRN's cls_labels.npy (integer-free names: string keys)
    lines = (root / "train_cls.txt").read_text().splitlines()
    labels = {}
    for line in lines:
        name, *cls = line.split()
        vec = np.zeros(3, np.float32)
        vec[[int(c) for c in cls]] = 1
        labels[name] = vec
    np.save(root / "cls_labels.npy", labels)
    (root / "names.txt").write_text("\n".join(l.split()[0] for l in lines) + "\n")
    metrics = main(common + ["--train_list", str(root / "names.txt"), "--out", str(tmp_path / "b")])
    assert metrics["steps"] == 2


def test_public_command_line_without_dataset_trains_on_the_given_data(tmp_path):
    """The public train.py has no --dataset choice (its --dataset is 'pascal_voc'): its command
    line (--img_dir / --train_list / --test_list) must train on those files, not on synthetic data."""
    root = tmp_path / "voc"
    export_voc(str(root), train=6, val=3, num_classes=3, image_size=32, seed=1)
    public = ["--img_dir", str(root / "JPEGImages"), "--train_list", str(root / "train_cls.txt")]
    args = parse_args(TINY + public)
    assert args.dataset == "voc" and args.train_list == str(root / "train_cls.txt")
    assert parse_args(TINY + public + ["--dataset", "pascal_voc"]).dataset == "voc"
    assert parse_args(TINY).dataset == "synthetic"
    assert parse_args(["--num_classes", "80", "--train_list", str(root / "train_cls.txt")]).dataset == "coco"
    metrics = main(TINY + public + ["--backbone", "tiny", "--num_workers", "0", "--max-steps", "1",
                                    "--out", str(tmp_path / "a")])
    assert metrics["dataset"] == "voc" and metrics["steps"] == 1


def test_bad_paths_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere[/\\]train_cls\.txt"):
        main(TINY + ["--dataset", "voc", "--data-root", str(tmp_path / "nowhere"), "--out",
                     str(tmp_path / "o")])
    root = tmp_path / "voc"
    export_voc(str(root), train=4, val=0, num_classes=3, image_size=32, seed=0)
    (root / "ghost.txt").write_text("syn_train_00000 1\nghost 0\n")
    with pytest.raises(FileNotFoundError, match=r"JPEGImages[/\\]ghost\.jpg"):
        main(TINY + ["--dataset", "voc", "--data-root", str(root), "--train_list", str(root / "ghost.txt"),
                     "--backbone", "tiny", "--out", str(tmp_path / "o")])


def test_cli_entry_point(tmp_path):
    """``python -m rca_fast.train`` runs as a program and reports the CAM mIoU; bad flags exit 2."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "rca_fast.train"] + SYN + ["--max-steps", "1", "--out",
                                                                           str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert "CAM mIoU" in res.stdout
    bad = subprocess.run([sys.executable, "-m", "rca_fast.train", "--dataset", "voc", "--data-root",
                          str(tmp_path / "none"), "--out", str(tmp_path / "x")], capture_output=True,
                          text=True,
                         timeout=300, env=env)
    assert bad.returncode == 2 and "train_cls.txt" in bad.stderr
