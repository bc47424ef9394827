"""In-place EMA bank update: the extension rca_fast._C vs a Python loop of index updates and rca_fast.ref.

64 rows (random classes, so some repeat) into an L x 1000 x 512 float32 bank (L=1000 on a GPU;
L=100 on CPU to spare a shared machine's memory -- the cost does not depend on L, only the 64
touched rows are read and written).  Rows:

  rca_fast     rca_fast._ext.ema_update_: one launch for all rows, pointers advanced in it
  python_loop  the public code's loop: per row, bank[c, p] = g * bank[c, p] + (1 - g) * emb[i]
               with Python-int indices, p = (p + 1) % S kept in a Python list
  ref          rca_fast.ref.ema.ema_update_ (vectorised plain torch: one indexed write per round)

Target (issue 5): GPU >= 10x the Python loop.  Bytes and FLOPs: ``rca_fast.profile.counts.ema_fwd``
(the project's one cost model: each row reads and writes one bank row and reads one embedding row
and its class; the ring pointers are read and written).  Run: ``pytest benchmarks/bench_ema.py
--benchmark-only -s``; rows go to
benchmarks/results/bench_ema-<device>.json.
"""
import importlib

import pytest
import torch

import harness
from rca_fast.profile import counts

ref_ema = importlib.import_module("rca_fast.ref.ema").ema_update_

N, S, D = 64, 1000, 512
GAMMA = 0.99
PROVIDERS = ["python_loop", "ref", "rca_fast"]


def python_loop(bank, ptr_list, emb, target_list, gamma=GAMMA):
    """The public implementation's update: one indexed read-modify-write per row."""
    for i, c in enumerate(target_list):
        p = ptr_list[c]
        bank[c, p] = gamma * bank[c, p] + (1 - gamma) * emb[i]
        ptr_list[c] = (p + 1) % bank.shape[1]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_ema(benchmark, device, provider):
    L = 1000 if device.type == "cuda" else 100
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(L, S, D, generator=g).to(device)
    ptr = torch.randint(S, (L,), generator=g).to(device)
    emb = torch.randn(N, D, generator=g).to(device)
    target = torch.randint(L, (N,), generator=g).to(device)
    if provider == "rca_fast":
        pytest.importorskip("rca_fast._C", reason="the extension rca_fast._C is not built")
        from rca_fast import _ext
        step_fn = lambda: _ext.ema_update_(bank, ptr, emb, target, gamma=GAMMA)  # noqa: E731
    elif provider == "ref":
        step_fn = lambda: ref_ema(bank, ptr, emb, target, gamma=GAMMA)  # noqa: E731
    else:
        ptr_list, target_list = ptr.tolist(), target.tolist()
        step_fn = lambda: python_loop(bank, ptr_list, emb, target_list)  # noqa: E731

    def step():
        step_fn()
        harness.sync(device)

    benchmark.group = f"ema-L{L}-S{S}-D{D}-N{N}-{device.type}"
    benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=1)
    ms = harness.time_ms(step, device, reps=50)
    shape = counts.ProfileShape(f"L{L}-S{S}-D{D}-N{N}", B=N, L=L, S=S, D=D, H=1, W=1, K=1, present=1)
    nbytes, flops = harness.work("ema_update_", shape, torch.float32, "fwd")
    row = {"op": "ema_update_", "provider": provider, "shape": f"L{L}-S{S}-D{D}-N{N}", "ms": ms}
    harness.add_speedups(row, ("ema", device.type), provider, PROVIDERS, ms)
    if provider == "rca_fast":
        if "speedup_vs_python_loop" in row:
            print(f"\nema_update_ {device.type}: rca_fast {ms * 1e3:.1f} us, "
                  f"{row['speedup_vs_python_loop']:.1f}x the Python loop")
    harness.record("bench_ema", row, device, nbytes=nbytes, flops=flops)
