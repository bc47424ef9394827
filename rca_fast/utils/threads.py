"""How many CPU threads the programs give torch."""
from __future__ import annotations

import torch


def cpu_threads(requested: int) -> int:
    """Threads for torch on the CPU: ``requested``, or (0) torch's own count -- fixed by the
    machine (its cores, or OMP_NUM_THREADS), never by its load: the thread count changes a CPU
    run's float sums and so its result (the same seed gave 58.3% and 40.3% CAM mIoU with 1 and 2
    threads), so a count read from the load made two runs of one command differ.  On a busy
    machine ``--threads`` with fewer threads runs faster (2 threads on 2 busy cores ran 7x slower
    than 1)."""
    if requested > 0:
        return requested
    return torch.get_num_threads()
