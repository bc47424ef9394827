"""Safe checkpoints: atomic writes, rotation, RNG states, weights_only refusal, shape checks,
exact resume (mid-epoch included), Ctrl-C and non-finite losses."""
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

import rca_fast.train as train_mod
import rca_fast.train.step as train_step_mod
from rca_fast import infer as infer_mod
from rca_fast.train import Trainer, main
from rca_fast.utils import checkpoint as ckpt
from rca_fast.utils.train_args import parse_args

TINY = ["--input_size", "32", "--crop_size", "32", "--batch_size", "4", "--bank-slots", "16", "--prototypes",
        "2",
        "--no-progress", "--threads", "1", "--num_classes", "3"]
SYN = TINY + ["--num-images", "8", "--val-images", "0"]  # 2 steps per epoch, no evaluation


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _tensors(tree, prefix=""):
    """Every tensor of a nested dict/list, keyed by its path."""
    out = {}
    if isinstance(tree, torch.Tensor):
        out[prefix] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(_tensors(v, f"{prefix}/{i}"))
    return out


# ---------------------------------------------------------------- writing
def test_atomic_write_keeps_the_old_file_when_saving_fails(tmp_path, monkeypatch, gen):
    path = str(tmp_path / "c.pt")
    first = {"model": {"w": torch.randn(5, 7, generator=gen)}}
    ckpt.atomic_torch_save(first, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_torch_save({"model": {"w": torch.zeros(1)}}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["c.pt"], "no temporary file is left behind"
    assert torch.equal(ckpt.load_checkpoint(path)["model"]["w"], first["model"]["w"])


@pytest.mark.parametrize("keep", [0, 2])
def test_temporary_file_is_written_beside_the_target(tmp_path, monkeypatch, gen, keep):
    """``os.replace`` is atomic only within one filesystem: every temporary file a checkpoint
    goes through lives in the target's own folder, holds the whole checkpoint when it is moved,
    and is gone afterwards -- even when the process's temporary folder is somewhere else."""
    elsewhere = tmp_path / "system_tmp"
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))   # where a dir-less mkstemp would go
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    moves = []
    real_replace = os.replace

    def spy(src, dst):
        moves.append((os.path.abspath(src), os.path.abspath(dst), os.path.getsize(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    target = tmp_path / "run" / "checkpoint.pt"
    model = torch.nn.Linear(7, 5)
    with torch.no_grad():
        model.weight.copy_(torch.randn(5, 7, generator=gen))
    written = ckpt.save_checkpoint(str(target), model=model, optimizer=None, epoch=1, step=3, keep=keep)
    monkeypatch.undo()
    assert moves, "the checkpoint was not moved into place with os.replace"
    for src, dst, size in moves:
        assert os.path.dirname(src) == os.path.dirname(dst) == str(tmp_path / "run"), (src, dst)
        assert size == os.path.getsize(dst) > 0
    assert os.path.abspath(written) in {dst for _, dst, _ in moves}
    assert os.listdir(elsewhere) == []
    assert sorted(os.listdir(target.parent)) == sorted({os.path.basename(dst) for _, dst, _ in moves})
    assert torch.equal(ckpt.load_checkpoint(str(target))["model"]["weight"], model.weight.detach())


def test_every_epoch_and_save_every_with_keep(tmp_path):
    main(SYN + ["--epoch", "3", "--save-every", "1", "--keep", "2", "--out", str(tmp_path)])
    numbered = ckpt.numbered_checkpoints(str(tmp_path))
    assert [os.path.basename(p) for p in numbered] == ["checkpoint_step00000005.pt",
                                                       "checkpoint_step00000006.pt"]
    assert os.path.samefile(tmp_path / "checkpoint.pt", numbered[-1])
    assert ckpt.latest_checkpoint(str(tmp_path)) == numbered[-1]
    state = ckpt.load_checkpoint(numbered[0])
    assert (state["epoch"], state["step"], state["epoch_done"], state["batch_in_epoch"]) == (3, 5, False, 1)
    for key in ("bank.bank", "bank.ptr", "bank.prototypes"):
        assert key in state["model"], key
    assert state["optimizer"]["state"], "momentum buffers"
    assert state["scheduler"]["decay_points"] == [12] and state["sampler"]["batch_in_epoch"] == 1
    assert set(state["rng"]) == {"torch", "cuda", "numpy", "python"}
    # no torch.save per step beyond --save-every: a run without it keeps one file per epoch
    main(SYN + ["--epoch", "2", "--keep", "5", "--out", str(tmp_path / "b")])
    assert len(ckpt.numbered_checkpoints(str(tmp_path / "b"))) == 2


def test_a_new_run_in_an_old_folder_keeps_its_checkpoints_and_resume_auto_finds_them(tmp_path):
    """Numbered files of higher steps from an earlier run in the same --out (the defaults put
    every run in one folder) neither push out the new run's checkpoints nor win --resume auto."""
    main(SYN + ["--epoch", "3", "--save-every", "1", "--keep", "2", "--out", str(tmp_path)])
    main(SYN + ["--epoch", "3", "--max-steps", "2", "--seed", "1", "--save-every", "1", "--keep", "2",
                "--out", str(tmp_path)])
    names = [os.path.basename(p) for p in ckpt.numbered_checkpoints(str(tmp_path))]
    assert "checkpoint_step00000001.pt" in names and "checkpoint_step00000002.pt" in names, names
    latest = ckpt.latest_checkpoint(str(tmp_path))
    assert latest.endswith("checkpoint_step00000002.pt")
    assert ckpt.load_checkpoint(latest)["args"]["seed"] == 1
    metrics = main(SYN + ["--epoch", "3", "--max-steps", "3", "--seed", "1", "--keep", "2", "--resume",
                          "auto",
                          "--out", str(tmp_path)])
    assert metrics["steps"] == 3


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = ckpt.capture_rng_state()
    want = (torch.rand(4), np.random.rand(3), [random.random() for _ in range(3)],
            np.random.standard_normal())
    ckpt.atomic_torch_save({"model": {}, "rng": state}, str(tmp_path / "r.pt"))
    ckpt.restore_rng_state(ckpt.load_checkpoint(str(tmp_path / "r.pt"))["rng"])
    got = (torch.rand(4), np.random.rand(3), [random.random() for _ in range(3)], np.random.standard_normal())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1])
    assert want[2] == got[2] and want[3] == got[3]


class _OnGPU(torch.Tensor):
    """Stands in for a tensor that ``map_location="cuda"`` put on a GPU: ``.numpy()`` fails as it
    does there, ``.cpu()`` gives a plain CPU tensor."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor).clone()


def test_rng_state_restores_from_a_checkpoint_loaded_onto_the_gpu(tmp_path):
    """The trainer loads checkpoints with map_location=<its device>: on a GPU the RNG tensors
    arrive there, and resuming must still restore them (it crashed on numpy's state)."""
    np.random.seed(5)
    random.seed(6)
    state = ckpt.capture_rng_state()
    want = (np.random.rand(3), random.random())
    moved = dict(state, torch=state["torch"].as_subclass(_OnGPU),
                 numpy=dict(state["numpy"], keys=state["numpy"]["keys"].as_subclass(_OnGPU)),
                 python=dict(state["python"], internal=state["python"]["internal"].as_subclass(_OnGPU)))
    ckpt.restore_rng_state(moved)
    assert np.array_equal(np.random.rand(3), want[0]) and random.random() == want[1]


# ---------------------------------------------------------------- refusing files
class Payload:
    """Unpickling this would create a file: the marker proves the loader never ran it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused_in_train_and_infer(tmp_path):
    marker = tmp_path / "payload_ran"
    bad = tmp_path / "crafted.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "model_config": {"num_classes": 3}, "epoch": 1, "step": 1,
                "payload": Payload(str(marker))}, str(bad))
    with pytest.raises(ValueError, match=r"refusing to load .*crafted\.pt.*arbitrary pickled"):
        ckpt.load_checkpoint(str(bad))
    with pytest.raises(ValueError, match="arbitrary pickled"):
        main(SYN + ["--resume", str(bad), "--out", str(tmp_path / "t")])
    with pytest.raises(ValueError, match="arbitrary pickled"):
        infer_mod.main(["--checkpoint", str(bad), "--out", str(tmp_path / "i"), "--no-progress", "--device",
                        "cpu"])
    assert not marker.exists()


def test_other_class_count_or_bank_shape_is_refused_naming_both_shapes(tmp_path):
    main(SYN + ["--max-steps", "1", "--out", str(tmp_path)])
    state = ckpt.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    L, S, D = state["model"]["bank.bank"].shape
    with pytest.raises(ValueError, match=rf"\({L}, {S}, {D}\).*\({L + 1}, {S}, {D}\)"):
        main(SYN + ["--num_classes", str(L + 1), "--resume", str(tmp_path / "checkpoint.pt"), "--out",
                    str(tmp_path / "a")])
    with pytest.raises(ValueError, match=rf"\({L}, {S}, {D}\).*\({L}, {2 * S}, {D}\)"):
        main(SYN + ["--bank-slots", str(2 * S), "--resume", str(tmp_path / "checkpoint.pt"), "--out",
                    str(tmp_path / "b")])
    # infer builds the model from the stored config: a file whose tensors disagree with it is refused
    state["model_config"]["num_classes"] = L + 1
    ckpt.atomic_torch_save(state, str(tmp_path / "mismatch.pt"))
    with pytest.raises(ValueError, match=rf"\({L}, {S}, {D}\) \({L} classes\).*\({L + 1}, {S}, {D}\)"):
        infer_mod.main(["--checkpoint", str(tmp_path / "mismatch.pt"), "--out", str(tmp_path / "i"),
                        "--no-progress", "--device", "cpu"])


# ---------------------------------------------------------------- exact resume
def test_mid_epoch_resume_skips_the_seen_batches_in_order(tmp_path):
    # public pipeline (default): the list order every epoch, the partial batch kept
    trainer = Trainer(
        parse_args(TINY + ["--num-images", "13", "--val-images", "0", "--out", str(tmp_path / "p")])
    )
    full = list(trainer.batches(4).batch_sampler)
    assert full == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12]]
    assert list(trainer.batches(4, skip=2).batch_sampler) == full[2:]
    assert list(trainer.batches(5).batch_sampler) == full
    # augmented: a shuffled order per epoch, full batches only
    trainer = Trainer(
        parse_args(
            TINY
            + [
                "--num-images", "13", "--val-images", "0", "--input-pipeline", "augmented", "--out",
                str(tmp_path / "a"),
            ]
        )
    )
    full = list(trainer.batches(4).batch_sampler)
    assert len(full) == 3 and all(len(b) == 4 for b in full) and len({i for b in full for i in b}) == 12
    assert list(trainer.batches(4, skip=2).batch_sampler) == full[2:]
    assert list(trainer.batches(5).batch_sampler) != full  # a new order every epoch


@pytest.mark.parametrize("stop_at", [3, 4], ids=["stop-mid-epoch2", "stop-at-epoch-end"])
def test_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path, stop_at):
    """Same seed, CPU: train 6 steps at once, or stop after ``stop_at`` and ``--resume auto``; the
    final model (weights, bank, pointers, prototypes, BatchNorm statistics) and optimiser state
    are bit-identical."""
    run = SYN + ["--epoch", "3", "--contrast-start-epoch", "2", "--score-threshold", "0.0", "--save-every",
                 "1"]
    main(run + ["--out", str(tmp_path / "once")])
    main(run + ["--max-steps", str(stop_at), "--out", str(tmp_path / "twice")])
    main(run + ["--resume", "auto", "--out", str(tmp_path / "twice")])
    a = ckpt.load_checkpoint(str(tmp_path / "once" / "checkpoint.pt"))
    b = ckpt.load_checkpoint(str(tmp_path / "twice" / "checkpoint.pt"))
    assert a["step"] == b["step"] == 6 and b["epoch_done"]
    assert int(a["model"]["bank.ptr"].sum()) > 0, "rows reached the bank (the test would be weak otherwise)"
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    ta, tb = _tensors(a["optimizer"]), _tensors(b["optimizer"])
    assert ta.keys() == tb.keys() and ta
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


# ---------------------------------------------------------------- Ctrl-C, non-finite loss
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, sig):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "rca_fast.train"] + SYN +
                            ["--epoch", "500", "--save-every", "1", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.numbered_checkpoints(str(tmp_path)) and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted at step" in err and "--resume" in err
    state = ckpt.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert state["step"] >= 1 and f"step {state['step']}" in err
    assert not (tmp_path / "metrics.json").exists()


def test_a_signal_after_the_steps_stop_agreement_waits_for_the_next_step(tmp_path):
    """Under torchrun the ranks agree on stopping in train_step's all-reduce; a signal landing
    on one rank after it must not make that rank alone save (a collective the others never
    join): it is acted on after the next step's agreement."""
    trainer = Trainer(parse_args(SYN + ["--epoch", "3", "--out", str(tmp_path)]))
    trainer.train_epoch(1)
    update_bank = trainer.model.update_bank
    calls = []

    def update_then_signal(out):
        calls.append(trainer.step + 1)
        if len(calls) == 1:
            trainer.request_stop(signal.SIGINT, None)  # arrives mid-step 3, after the agreement
        return update_bank(out)

    trainer.model.update_bank = update_then_signal
    with pytest.raises(train_mod.TrainingInterrupted, match="step 4"):
        trainer.train_epoch(2)
    assert calls == [3, 4]
    assert ckpt.load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 4


def test_sigint_handler_path_in_process(tmp_path):
    trainer = Trainer(parse_args(SYN + ["--epoch", "3", "--out", str(tmp_path)]))
    trainer.train_epoch(1)
    trainer.request_stop(signal.SIGINT, None)
    with pytest.raises(train_mod.TrainingInterrupted, match="step 3"):
        trainer.train_epoch(2)
    state = ckpt.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (3, 2, 1)
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, state["model"][key]), key
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C aborts at once
        trainer.request_stop(signal.SIGINT, None)


def test_non_finite_loss_stops_naming_step_and_terms_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real = train_step_mod.rca_loss
    calls = {"n": 0}

    def nan_at_third_step(out, labels, epoch, **kw):
        loss, parts = real(out, labels, epoch, **kw)
        calls["n"] += 1
        if calls["n"] == 3:
            out.contrast_loss = out.contrast_loss * float("nan")
            loss, parts = real(out, labels, epoch, **kw)
        return loss, parts

    monkeypatch.setattr(train_step_mod, "rca_loss", nan_at_third_step)  # the step's loss
    with pytest.raises(FloatingPointError, match=r"step 3\b.*'contrast': nan") as info:
        main(SYN + ["--epoch", "3", "--save-every", "1", "--contrast-start-epoch", "1", "--out",
                    str(tmp_path)])
    assert "last good checkpoint (step 2)" in str(info.value)
    state = ckpt.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("checkpoint_step00000002.pt")


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path):
    metrics = main(SYN + ["--resume", "auto", "--max-steps", "1", "--out", str(tmp_path)])
    assert metrics["steps"] == 1
    assert ckpt.load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 1
    assert "no checkpoint in" in (tmp_path / "train.log").read_text()
