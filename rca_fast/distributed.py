"""torch.distributed helpers of the trainer: process-group set-up from torchrun's environment,
rank queries, agreeing on stop flags, and the bank consistency check.

``torchrun --nproc_per_node N -m rca_fast.train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; the
trainer then joins a process group (NCCL on GPUs, gloo on CPU).  A group the caller already
initialised (tests, notebooks) is used as it is.
"""
from __future__ import annotations

import datetime
import os
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (or no process group): the one process that writes files."""
    return rank() == 0


def setup(device: str) -> Tuple[torch.device, bool]:
    """Join torchrun's process group when WORLD_SIZE > 1; returns (device of this rank, whether
    this call created the group -- then :func:`cleanup` should destroy it).

    ``device`` "cuda" becomes ``cuda:LOCAL_RANK`` under torchrun; the backend is NCCL for CUDA
    devices and gloo for the CPU.
    """
    dev = torch.device(device)
    created = False
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if not (dist.is_available() and dist.is_initialized()) and env_world > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        created = True
    if dev.type == "cuda" and dev.index is None and world_size() > 1:
        dev = torch.device("cuda",
                           int(os.environ.get("LOCAL_RANK", rank() % max(torch.cuda.device_count(), 1))))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev, created


def start(device: str, out: str, log_name: str):
    """A program's start under torchrun or alone: :func:`setup`, the output folder (rank 0) and the
    logger (rank 0: stdout and ``out/log_name``; other ranks: warnings only).

    Returns (device, created, rank, world size, logger)."""
    import logging

    from .utils.logs import get_logger

    dev, created = setup(device)
    main = rank() == 0
    if main:
        os.makedirs(out, exist_ok=True)
    log = get_logger(os.path.join(out, log_name) if main else None)
    if not main:
        log.setLevel(logging.WARNING)
    return dev, created, rank(), world_size(), log


def rank_batches(dataset_len: int, batch_size: int, seed: int, epoch: int, skip: int = 0,
                 shuffle: bool = True) -> List[List[int]]:
    """This rank's batches of an epoch, the first ``skip`` left out; the same on every call, so a
    resumed run skips to where it was.

    ``shuffle``: DistributedSampler's shuffled order for (seed, epoch) (drop_last), cut into full
    batches (one short batch when the share is below ``batch_size``).  Not ``shuffle``: the list
    order (the sampler pads the list with its first indices to an equal share per rank), every
    index, the last partial batch kept."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(dataset_len), num_replicas=world_size(), rank=rank(), shuffle=shuffle,
                                 seed=seed, drop_last=shuffle)
    sampler.set_epoch(epoch)
    order = list(sampler)
    full = not shuffle or len(order) < batch_size
    usable = len(order) if full else (len(order) // batch_size) * batch_size
    return [order[i:i + batch_size] for i in range(0, usable, batch_size)][skip:]


def cleanup(created: bool) -> None:
    if created and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def collective_device() -> torch.device:
    """Device for small collective tensors: CUDA for NCCL, CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flags: Sequence[bool]) -> List[bool]:
    """For each flag: True on every rank when it is True on any (one small all-reduce for all).

    Why: a rank that stops alone (Ctrl-C, a non-finite loss) would leave the others waiting in
    the next collective forever.  Without a process group the flags come back as they are.
    """
    if not is_distributed():
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def bank_checksum(bank: torch.Tensor, ptr: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """(3,) float64 [sum, position-weighted sum, pointer sum] of the bank: equal banks give
    bit-equal checksums (same computation on the same kind of device), and a swapped or shifted
    slot changes the weighted sum.  Done in chunks of ``chunk`` elements so a large bank
    (1000 x 1000 x 512) needs no float64 copy of itself (that would be 4 GB)."""
    flat = bank.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    weighted = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), chunk):
        part = flat[start:start + chunk].double()
        weights = torch.arange(start + 1, start + 1 + part.numel(), device=flat.device,
                               dtype=torch.float64).remainder_(9973).add_(1)
        total += part.sum()
        weighted += (part * weights).sum()
    return torch.stack([total, weighted, ptr.detach().double().sum()])


def check_bank_consistent(bank: torch.Tensor, ptr: torch.Tensor, step: int) -> None:
    """All-gather every rank's :func:`bank_checksum`; RuntimeError on every rank if they differ."""
    if not is_distributed():
        return
    local = bank_checksum(bank, ptr).to(collective_device())
    gathered = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(gathered, local)
    ref = gathered[0]
    bad = [r for r, g in enumerate(gathered) if not torch.equal(g, ref)]
    if bad:
        rows = ", ".join(f"rank {r}: {[float(v) for v in g]}" for r, g in enumerate(gathered))
        raise RuntimeError(f"memory banks differ between ranks at step {step} (ranks {bad} differ from rank "
                           "0); "
                           f"checksums [sum, weighted sum, pointer sum]: {rows}. The bank updates must be "
                           f"gathered in rank order on every rank (MemoryBank.update).")
