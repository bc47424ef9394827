"""What two DDP ranks (gloo on the CPU, spawned processes) compute, against a single-process
oracle of what each rank saw, on inputs where the ranks differ:

* ``--att_dir`` state: each rank folds in its own images; the "seen" flags shared at the start
  of every epoch (``AttentionMaps.sync_exists``) or merged at every checkpoint
  (``merge_ranks``) and the maps merged at the end give, on EVERY rank, the maps of the public
  rule applied to both ranks' steps in epoch order (``test_att_dir.public_rule``, a numpy loop).
  The steps are built so that the flags matter: an image-class seen (and written) on one rank in
  epoch 2 is gated out on the other rank in the last epoch (it must not be written again there),
  in both directions, and an image-class written on both ranks needs the element-wise maximum;
* the trainer (``Trainer(args).fit()``): the contrast term is in the loss from
  ``--contrast-start-epoch`` on (1-based) and not before, on every rank; every rank draws its own
  random stream (torch, numpy and Python generators in different states once the trainer is
  built).
One spawn runs both parts (41 s wall, 16 s CPU, on 2 cores at load 20).
"""
import os
import pickle
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from test_att_dir import public_rule

N, L, E, FH, FW = 6, 3, 3, 5, 6          # images, classes, epochs, feature grid of a 40 x 48 input
NAMES = [f"im{i}" for i in range(N)]
TRAIN = [
    "--input_size", "32", "--crop_size", "32", "--batch_size", "2", "--bank-slots", "16", "--prototypes",
    "2", "--no-progress", "--threads", "1", "--num_classes", "3", "--num-images", "8", "--val-images", "0",
    "--device", "cpu", "--epoch", "2", "--contrast-start-epoch", "2", "--score-threshold", "0",
]


def att_steps(seed):
    """Both ranks' AttentionMaps inputs, reproducible from ``seed``: {rank: [(epoch, cams, logits,
    labels, indices)]}, one batch per rank and epoch, the images split anew every epoch.

    Forced: image 0 is on rank 0 in epoch 2 and on rank 1 in epoch 3, image 1 the other way round;
    each has a class that passes the 0.1 gate in epoch 2 and not in epoch 3 (so only the shared
    flag keeps the last-epoch rule from writing it again); image 2 passes the gate for a class on
    rank 0 in epoch 2 and on rank 1 in epoch 3 (the merged map is the maximum of two ranks')."""
    g = torch.Generator().manual_seed(seed)
    forced_rank = {(2, 0): 0, (3, 0): 1, (2, 1): 1, (3, 1): 0, (2, 2): 0, (3, 2): 1}
    c_forced = torch.randint(0, L, (3,), generator=g).tolist()
    steps = {0: [], 1: []}
    for epoch in range(1, E + 1):
        perm = torch.randperm(N, generator=g).tolist()
        ranks = {i: (0 if k < N // 2 else 1) for k, i in enumerate(perm)}
        for i in range(3):  # move the forced images to their rank, swapping with a free image
            want = forced_rank.get((epoch, i))
            if want is not None and ranks[i] != want:
                other = next(j for j in range(3, N) if ranks[j] == want)
                ranks[i], ranks[other] = want, 1 - want
        for rank in (0, 1):
            idx = [i for i in range(N) if ranks[i] == rank]
            B = len(idx)
            cams = torch.randn(B, L, FH, FW, generator=g)
            logits = torch.randn(B, L, generator=g) * 2 - 2.2      # around the gate: sigmoid(-2.2) ~ 0.1
            labels = (torch.rand(B, L, generator=g) < 0.6).float()
            for j, i in enumerate(idx):
                if i < 3 and epoch >= 2:
                    labels[j, c_forced[i]] = 1.0
                    passes = epoch == 2 or i == 2
                    logits[j, c_forced[i]] = 3.0 if passes else -5.0
            steps[rank].append((epoch, cams, logits, labels, idx))
    return steps


def _att_scenario(rank, steps, folder, per_epoch):
    """Feed this rank's steps; ``per_epoch`` "sync": sync_exists at every epoch start and one
    merge at the end (the trainer's order without checkpoints), "merge": merge_ranks after every
    epoch (a checkpoint per epoch) and no sync.  Writes the PNGs of the merged state."""
    from rca_fast.utils.att_maps import AttentionMaps
    acc = AttentionMaps(folder, NAMES, L, input_size=8 * FW, epochs=E)
    for epoch, cams, logits, labels, idx in steps[rank]:
        if per_epoch == "sync":
            acc.sync_exists()
        acc.update(cams, logits, labels, idx, epoch, (8 * FH, 8 * FW))
        if per_epoch == "merge":
            acc.merge_ranks()
    acc.merge_ranks()
    acc.write_pngs(progress=False)


def _worker(rank, world, port, out_dir, seed):
    from rca_fast.train import Trainer
    from rca_fast.utils.checkpoint import capture_rng_state
    from rca_fast.utils.train_args import parse_args

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        steps = att_steps(seed)
        for per_epoch in ("sync", "merge"):
            _att_scenario(rank, steps, os.path.join(out_dir, f"att_{per_epoch}_rank{rank}"), per_epoch)
        trainer = Trainer(parse_args(TRAIN + ["--out", os.path.join(out_dir, "run")]))
        rng = capture_rng_state()
        metrics = trainer.fit()
        with open(os.path.join(out_dir, f"train{rank}.pkl"), "wb") as f:
            pickle.dump({"rng": rng, "history": metrics["history"]}, f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _oracle_pngs(steps):
    """{file name: (40, 48) uint8} of the public rule over both ranks' steps in epoch order."""
    flat = sorted(((e, c.numpy(), lg.numpy(), lb.numpy(), ix, [False] * len(ix))
                   for r in (0, 1) for e, c, lg, lb, ix in steps[r]), key=lambda s: s[0])
    out = {}
    for (i, c), m in public_rule(flat, E).items():
        up = F.interpolate(torch.from_numpy(m.astype(np.float32))[None, None], size=(8 * FH, 8 * FW),
                           mode="bilinear", align_corners=False)[0, 0].round().numpy()
        out[f"{NAMES[i]}_{c}.png"] = up.astype(np.uint8)
    return out


@pytest.mark.slow  # one spawn of two interpreters: 41 s on 2 cores at load 20
def test_two_ranks_equal_the_single_process_oracle_of_what_each_saw(tmp_path, gen):
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        _worker, args=(2, port, str(tmp_path), seed), nprocs=2, join=True, start_method="spawn"
    )

    # --att_dir: every rank holds the maps of the public rule over both ranks' steps
    steps = att_steps(seed)
    want = _oracle_pngs(steps)
    # the premise: the ranks saw different images in every epoch
    assert all(set(a[4]).isdisjoint(b[4]) for a, b in zip(steps[0], steps[1]))
    for per_epoch in ("sync", "merge"):
        for rank in (0, 1):
            folder = tmp_path / f"att_{per_epoch}_rank{rank}"
            got = {f: np.array(Image.open(folder / f)) for f in sorted(os.listdir(folder))}
            assert sorted(got) == sorted(want), (per_epoch, rank)
            for name, m in want.items():
                np.testing.assert_array_equal(got[name], m, err_msg=f"{per_epoch}, rank {rank}: {name}")

    # the trainer: contrast from --contrast-start-epoch (2) on, every rank; own random streams
    runs = []
    for rank in (0, 1):
        with open(tmp_path / f"train{rank}.pkl", "rb") as f:
            runs.append(pickle.load(f))
    for rank, run in enumerate(runs):
        by_epoch = {h["epoch"]: h for h in run["history"]}
        assert sorted(by_epoch) == [1, 2]
        assert by_epoch[1]["contrast"] == 0.0, f"rank {rank}: contrast before its start epoch"
        assert by_epoch[2]["contrast"] > 0.0, f"rank {rank}: no contrast in its start epoch 2"
        for h in run["history"]:  # the term is in the loss with its weight
            assert (
                abs(h["loss"] - (h["cls"] + 0.4 * h["coarse_cls"] + 0.01 * h["contrast"])) <= 1e-5 * h["loss"]
            )
    r0, r1 = runs[0]["rng"], runs[1]["rng"]
    assert not torch.equal(r0["torch"], r1["torch"]), "both ranks draw the same torch random stream"
    assert not torch.equal(r0["numpy"]["keys"], r1["numpy"]["keys"]), "both ranks draw the same numpy stream"
    assert not torch.equal(r0["python"]["internal"], r1["python"]["internal"]), "same Python random stream"
