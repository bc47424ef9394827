"""The trainer's default CPU thread count is torch's (fixed by the machine), not read from the
machine's load: the count changes a CPU run's result, so two runs of one command must get one."""
import os

import torch

from rca_fast.utils.threads import cpu_threads


def test_default_threads_ignore_the_load(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)   # a count no load rule over this machine's cores would land on
        for load in (0.0, float(os.cpu_count() or 1), 50.0):
            monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
            assert cpu_threads(0) == 3, f"load {load}"
        assert cpu_threads(1) == 1 and cpu_threads(5) == 5   # --threads N: N, whatever the load
    finally:
        torch.set_num_threads(before)
