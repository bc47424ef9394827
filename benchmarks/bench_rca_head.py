"""The RCA head at the public defaults: (a) the public code's per-region Python loops vs (b) rca_fast.

One step = masked average pooling of the present regions (queries from the projector features,
bank rows from the backbone features) + region-mixup NCE against the whole bank, forward and
backward + the EMA bank update of the rows scoring above 0.7.
Shapes (public defaults): B=8 images, L=20 classes, S=500 slots, D=512, 46x46 features (crop 368
at stride 8), 1-3 present classes per image.

  (a) public_loops   rca_fast/ref/public_head.py (loops per image, class, region and bank row)
  (b) rca_fast_ops   rca_fast.model.rca.region_contrast (ops.masked_average_pool with labels,
                     ops.bank_nce_loss with mixup) + MemoryBank.update (ops.ema_update_)
  (c) compiled_ref   torch.compile of (b) on the plain-torch reference ops (CUDA only)

On CPU the speed-up is also measured from alternating rounds of (a) and (b), which cancels the
load drift of a shared machine.  Run: ``pytest benchmarks/bench_rca_head.py --benchmark-only -s``.  On a
shared, oversubscribed
CPU put ``OMP_WAIT_POLICY=PASSIVE`` (or ``OMP_NUM_THREADS=1``) in front: with OpenMP's default
spin-waiting, each big vectorised op waits for a descheduled sibling thread, and (b) measured
up to 10x slower than its own single-thread time (the many small ops of (a) suffer less).  Every step's
median is
recorded with ``harness.record`` and the speed-up of (b) and (c) over (a) is printed
(target on a 2-core CPU: (b) >= 8x (a)).
"""
from __future__ import annotations

import random
import statistics
import time

import pytest
import torch

import harness
from rca_fast.model import MemoryBank
from rca_fast.model.rca import region_contrast
from rca_fast.ref.public_head import public_bank_update, public_rca_head

B, L, S, D, H, W = 8, 20, 500, 512, 46, 46
TAU, ALPHA, GAMMA, THRESHOLD = 0.07, 8.0, 0.99, 0.7
SHAPE = f"B{B}-L{L}-S{S}-D{D}-HW{H}x{W}"
IMPLS = ["public_loops", "rca_fast_ops", "compiled_ref"]
ROUNDS = {"public_loops": 7, "rca_fast_ops": 15, "compiled_ref": 15}

_median_ms = {}  # (device, impl) -> ms, for the speed-up lines


def make_inputs(device: torch.device, seed: int = 0) -> dict:
    """Backbone/projector features, coarse CAMs and logits, labels with 1-3 classes per image, bank."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(B, L)
    for b in range(B):
        k = int(torch.randint(1, 4, (1,), generator=g))
        labels[b, torch.randperm(L, generator=g)[:k]] = 1
    # Smooth-ish CAMs (a random field upsampled) so masks look like regions, not salt and pepper.
    cams = torch.nn.functional.interpolate(torch.randn(B, L, 12, 12, generator=g) * 3, size=(H, W),
                                           mode="bilinear", align_corners=False)
    logits = torch.randn(B, L, generator=g) * 1.5 + 1.0     # about half the rows score above 0.7
    inputs = dict(features=torch.randn(B, D, H, W, generator=g).relu(),
                  query_features=torch.randn(B, D, H, W, generator=g),
                  cams=cams, coarse_logits=logits, labels=labels, bank=torch.randn(L, S, D, generator=g))
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["query_features"].requires_grad_(True)
    return inputs


def public_step(inputs: dict, device: torch.device):
    bank = inputs["bank"].clone()
    ptr = [0] * L
    rng = random.Random(0)

    def step():
        inputs["query_features"].grad = None
        loss, rows = public_rca_head(inputs["features"], inputs["query_features"], inputs["cams"],
                                     inputs["coarse_logits"], inputs["labels"], bank,
                                     temperature=TAU, alpha=ALPHA, rng=rng)
        loss.backward()
        public_bank_update(bank, ptr, rows, gamma=GAMMA, threshold=THRESHOLD)
        harness.sync(device)
    return step


def ops_step(inputs: dict, device: torch.device, head=region_contrast):
    memory = MemoryBank(L, S, D, gamma=GAMMA, score_threshold=THRESHOLD).to(device)
    memory.bank.copy_(inputs["bank"])
    present = inputs["labels"].bool()
    gen = torch.Generator().manual_seed(0)

    def step():
        inputs["query_features"].grad = None
        rc = head(inputs["features"], inputs["query_features"], inputs["cams"], inputs["coarse_logits"],
                  present, memory.bank, temperature=TAU, mixup=True, mixup_alpha=ALPHA, generator=gen)
        rc.loss.backward()
        memory.update(rc.emb, rc.target, rc.score)
        harness.sync(device)
    return step


def interleaved_speedup(public, ours, rounds: int = 5) -> dict:
    """Medians of alternating rounds (one public step, then three of ours): on a shared CPU the
    load drifts between two back-to-back benchmarks, and alternating cancels that drift."""
    def wall_ms(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    pub, own = [], []
    for _ in range(rounds):
        pub.append(wall_ms(public))
        own += [wall_ms(ours) for _ in range(3)]
    p_ms, o_ms = statistics.median(pub), statistics.median(own)
    return {"interleaved_public_ms": p_ms, "interleaved_ms": o_ms, "interleaved_speedup": p_ms / o_ms}


def check_same_regions(inputs: dict) -> None:
    """Sanity: both ways pool the same regions to the same bank rows (the mixup draws differ)."""
    _, rows = public_rca_head(inputs["features"], inputs["query_features"], inputs["cams"],
                              inputs["coarse_logits"], inputs["labels"], inputs["bank"], rng=random.Random(0))
    rc = region_contrast(inputs["features"], inputs["query_features"], inputs["cams"],
                         inputs["coarse_logits"], inputs["labels"].bool(), inputs["bank"])
    assert [r[0] for r in rows] == rc.target.tolist()
    torch.testing.assert_close(torch.stack([r[1] for r in rows]), rc.emb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_rca_head(benchmark, device, impl, monkeypatch):
    if impl == "compiled_ref" and device.type != "cuda":
        pytest.skip("torch.compile of the reference path is benchmarked on CUDA only")
    inputs = make_inputs(device)
    if impl == "public_loops":
        check_same_regions(inputs)
        step = public_step(inputs, device)
    elif impl == "rca_fast_ops":
        step = ops_step(inputs, device)
    else:
        monkeypatch.setenv("RCA_FAST_BACKEND", "torch")   # the plain-torch ops under torch.compile
        step = ops_step(inputs, device, head=torch.compile(region_contrast))
    benchmark.group = f"rca_head-{SHAPE}-{device.type}"
    benchmark.pedantic(step, rounds=ROUNDS[impl], warmup_rounds=2, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if device.type == "cpu" and stats is not None:
        ms = stats.stats.median * 1e3
    else:  # CUDA (device-synchronised do_bench) or pytest-benchmark disabled
        ms = harness.time_ms(step, device, reps=ROUNDS[impl])
    _median_ms[(device.type, impl)] = ms
    row = {"op": "rca_head", "impl": impl, "shape": SHAPE, "ms": ms, "threads": torch.get_num_threads()}
    if impl != "public_loops":
        base = _median_ms.get((device.type, "public_loops"))
        if base is None:  # run on its own (-k): time the public loops here for the ratio
            base = harness.time_ms(public_step(make_inputs(device), device), device, warmup=1, reps=5)
        row["speedup_vs_public"] = base / ms
        print(f"\nrca_head {SHAPE} on {harness.device_name(device)} ({torch.get_num_threads()} threads): "
              f"{impl} {ms:.1f} ms, public loops {base:.1f} ms -> {base / ms:.1f}x faster")
        if device.type == "cpu":
            row.update(interleaved_speedup(public_step(make_inputs(device), device), step))
            print(f"interleaved rounds: public {row['interleaved_public_ms']:.1f} ms, {impl} "
                  f"{row['interleaved_ms']:.1f} ms -> {row['interleaved_speedup']:.1f}x faster")
    harness.record("bench_rca_head", row, device)
