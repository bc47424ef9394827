"""The trainer under torch.distributed on the CPU (gloo): 2 processes train a few steps and end
with identical banks, prototypes and weights; the bank check catches a rank whose bank drifted;
``torchrun -m rca_fast.train`` runs as a program.  (Processes are spawned: fork hangs with gloo.)"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rca_fast.utils.checkpoint import load_checkpoint

SYN = ["--input_size", "32", "--crop_size", "32", "--batch_size", "2", "--bank-slots", "16",
       "--prototypes", "2", "--no-progress", "--threads", "1", "--num_classes", "3", "--num-images", "8",
       "--val-images", "0",
       "--device", "cpu"]  # 8 images / 2 ranks / batch 2: 2 steps per epoch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_worker(rank, world, port, out_dir):
    from rca_fast import distributed
    from rca_fast.train import Trainer
    from rca_fast.utils.train_args import parse_args

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        args = parse_args(SYN + ["--epoch", "2", "--max-steps", "3", "--score-threshold", "0",
                                 "--contrast-start-epoch", "1", "--check-bank-every", "1",
                                 "--save-every", "1", "--out", out_dir])
        trainer = Trainer(args)
        trainer.fit()
        model = trainer.model
        torch.save({k: v.clone() for k, v in model.state_dict().items()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        # a drifted bank on one rank stops every rank with an error naming the step
        if rank == 1:
            model.bank.bank[0, 0, 0] += 1e-3
        try:
            distributed.check_bank_consistent(model.bank.bank, model.bank.ptr, step=99)
            message = ""
        except RuntimeError as exc:
            message = str(exc)
        with open(os.path.join(out_dir, f"check{rank}.txt"), "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("L,S,D,chunk", [(3, 7, 60, 1 << 22), (3, 7, 60, 50), (1, 1, 5, 2)],
                         ids=["L3-S7-D60-onechunk", "L3-S7-D60-chunk50", "L1-S1-D5-chunk2"])
def test_bank_checksum_against_a_float64_loop(gen, L, S, D, chunk):
    from rca_fast.distributed import bank_checksum

    bank = torch.randn(L, S, D, generator=gen)
    ptr = torch.randint(0, S, (L,), generator=gen)
    flat = bank.reshape(-1).tolist()
    want = [sum(flat), sum(v * (((i + 1) % 9973) + 1) for i, v in enumerate(flat)), float(ptr.sum())]
    got = bank_checksum(bank, ptr, chunk=chunk).tolist()
    for g, w in zip(got, want):
        assert abs(g - w) <= 1e-9 * max(1.0, abs(w))
    if S > 1:  # two slots swapped: same plain sum, different weighted sum
        swapped = bank.clone()
        swapped[0, [0, 1]] = swapped[0, [1, 0]]
        assert bank_checksum(swapped, ptr, chunk=chunk)[1] != bank_checksum(bank, ptr, chunk=chunk)[1]


@pytest.mark.slow  # two spawned interpreters importing torch: ~15 s on 2 busy cores
def test_two_gloo_ranks_train_with_identical_banks(tmp_path):
    mp.start_processes(_train_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in r0:
        assert torch.equal(r0[key], r1[key]) or "running_" in key or "num_batches" in key, key
    rows = int(r0["bank.ptr"].sum())
    assert rows >= 2 * 3, "both ranks' rows reached the bank (score threshold 0: every region row)"
    assert r0["bank.prototypes"].abs().sum() > 0
    state = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert state["step"] == 3 and state["sampler"]["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    assert torch.equal(state["model"]["bank.bank"], r0["bank.bank"])
    log = (tmp_path / "train.log").read_text()
    assert log.count("training on") == 1 and "x 2 processes" in log, "only rank 0 writes"
    for rank in (0, 1):
        text = (tmp_path / f"check{rank}.txt").read_text()
        assert "banks differ between ranks at step 99" in text and "ranks [1]" in text, text


@pytest.mark.slow  # torchrun + 2 workers: ~25 s on 2 busy cores
def test_torchrun_cli(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          "2",
                          "-m", "rca_fast.train"] + SYN + ["--max-steps", "3", "--check-bank-every", "1",
                                                          "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3  # epoch 2 adds the contrast term


def _torchrun(extra, out):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          "2",
                          "-m", "rca_fast.train"] + SYN + extra + ["--out", str(out)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.slow  # three torchrun launches: ~40 s on 2 busy cores
def test_two_rank_run_resumed_mid_epoch_equals_an_uninterrupted_one(tmp_path):
    """Every rank's RNG state is stored (rank 0 gathers them), so a 2-process run stopped after
    3 steps (mid-epoch 2) and resumed ends bit-identical to one that ran 4 steps at once."""
    run = ["--epoch", "2", "--score-threshold", "0", "--contrast-start-epoch", "1"]
    _torchrun(run, tmp_path / "once")
    _torchrun(run + ["--max-steps", "3"], tmp_path / "twice")
    _torchrun(run + ["--resume", "auto"], tmp_path / "twice")
    a = load_checkpoint(str(tmp_path / "once" / "checkpoint.pt"))
    b = load_checkpoint(str(tmp_path / "twice" / "checkpoint.pt"))
    assert a["step"] == b["step"] == 4 and int(a["model"]["bank.ptr"].sum()) > 0
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
