"""The per-class final CAM heads (issue 18 item 5): forward + backward of each implementation.

The final head is L branches of 3 x (conv3x3 512 + ReLU) + conv1x1 (DESIGN §2): at the public
training size (batch 8, 368 input -> 46x46 features, 512 channels) about 90% of a VOC training
step's FLOPs, and 4x that at COCO's 80 classes.  Rows, per case (voc L=20, coco L=80) and dtype
(fp32; bf16 = autocast, as the trainer's --amp runs, fp32 parameters):

  public_loop             the public code: one nn.Sequential per class, its own first conv too
  grouped                 PerClassCAMHead(impl="grouped"): one conv D -> L*W, grouped convs (today's)
  loop                    impl="loop": the public code's loop of dense convs on the same parameters
  grouped_channels_last   grouped, in channels_last (NHWC)
  loop_channels_last      loop, in channels_last

Every row states ms (median), TFLOP/s, the speed-up over public_loop of the same case and dtype,
the implementation impl="auto" picks on this device, the peak memory (CUDA), and the largest
difference of its maps from the fp32 grouped maps (same weights; cuDNN's fp32 convs use TF32).
Not benchmarked, judged not promising: the grouped conv as batched matmuls (unfold: a 9x copy of
each activation, 3.4 GB per VOC layer in bf16; 9 shifted matmuls: the output re-read and rewritten
9 times) against cuDNN's implicit-GEMM convs that already are that matmul without the copies; and
torch.compile (Inductor calls the same cuDNN convs; it could only fuse the ReLUs, < 2% of the
time, for tens of seconds of compilation).

Run on a GPU without pytest-benchmark (as gpu_check.sh does):
``python benchmarks/bench_final_heads.py --device cuda``; with it:
``pytest benchmarks/bench_final_heads.py --benchmark-only -s``.  On CPU the shapes are reduced
(batch 1, 128 channels, 23x23) and the CLI times the implementations in alternating rounds,
which cancels the load drift of a shared machine.  Rows are appended to
benchmarks/results/bench_final_heads-<device>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

try:  # the GPU machine's check runs this file as a script; pytest is needed only for the entry below
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import harness` as a script
import harness
from rca_fast.model.heads import FINAL_HEAD_IMPLS, PerClassCAMHead, resolve_final_head_impl

# (B, L, D, W, H, Wd): batch, classes, input channels, branch width, feature map
GPU_CASES = {"voc": (8, 20, 512, 512, 46, 46), "coco": (8, 80, 512, 512, 46, 46)}
CPU_CASES = {"voc": (1, 20, 128, 128, 23, 23), "coco": (1, 80, 128, 128, 23, 23)}
IMPLS = ("public_loop",) + FINAL_HEAD_IMPLS
DTYPES = {"fp32": None, "bf16": torch.bfloat16}   # None: no autocast
CPU_ROUNDS = 7

_median_ms = {}  # (device, case, dtype, impl) -> ms, for the speed-up over public_loop


def cases_for(device: torch.device) -> dict:
    return GPU_CASES if device.type == "cuda" else CPU_CASES


def shape_id(case) -> str:
    B, L, D, W, H, Wd = case
    return f"B{B}-L{L}-D{D}-W{W}-HW{H}x{Wd}"


def head_flops(case) -> int:
    """FLOPs of forward + backward (input and weight gradients: 2x the forward's)."""
    B, L, D, W, H, Wd = case
    per_pixel = L * (D * W * 9 + 2 * W * W * 9 + W)          # multiply-adds of the L branches
    return 3 * 2 * B * H * Wd * per_pixel


class PublicFinalHeads(nn.Module):
    """The public code's final head: one nn.Sequential per class, weights copied from ``head``."""

    def __init__(self, head: PerClassCAMHead):
        super().__init__()
        L, W = head.num_classes, head.width
        D = head.body[0].in_channels
        on = {"device": head.body[0].weight.device}    # built where the head is (and quick to init there)
        self.branches = nn.ModuleList()
        for l in range(L):
            branch = nn.Sequential(nn.Conv2d(D, W, 3, padding=1, **on), nn.ReLU(inplace=True),
                                   nn.Conv2d(W, W, 3, padding=1, **on), nn.ReLU(inplace=True),
                                   nn.Conv2d(W, W, 3, padding=1, **on), nn.ReLU(inplace=True),
                                   nn.Conv2d(W, 1, 1, **on))
            with torch.no_grad():
                for i, src in ((0, head.body[0]), (2, head.body[2]), (4, head.body[4]), (6, head.classifier)):
                    rows = slice(l, l + 1) if i == 6 else slice(l * W, (l + 1) * W)
                    branch[i].weight.copy_(src.weight[rows])
                    branch[i].bias.copy_(src.bias[rows])
            self.branches.append(branch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


def make_head(case, device: torch.device, seed: int = 0) -> PerClassCAMHead:
    """The head at ``case`` with the model's init (conv weights N(0, 0.01)), drawn on the device."""
    _, L, D, W, _, _ = case
    head = PerClassCAMHead(D, W, L, impl="grouped").to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0.0, 0.01, generator=g)
    return head


def make_step(head: PerClassCAMHead, impl: str, case, dtype: str, device: torch.device):
    """A closure running one forward + backward of ``impl`` (the input needs a gradient too: the
    final head reads the aggregation's output).  Returns (step, forward-only maps)."""
    B, L, D, _, H, Wd = case
    module = PublicFinalHeads(head) if impl == "public_loop" else head
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(B, D, H, Wd, device=device, generator=g).relu_().requires_grad_(True)
    grad = torch.randn(B, L, H, Wd, device=device, generator=g)
    amp = DTYPES[dtype]

    def forward():
        if impl != "public_loop":
            head.impl = impl
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            return module(x)

    def step():
        for p in module.parameters():
            p.grad = None
        x.grad = None
        y = forward()
        y.backward(grad.to(y.dtype))
        harness.sync(device)
    return step, forward


def max_rel_diff(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def reference_maps(head: PerClassCAMHead, case, device: torch.device) -> torch.Tensor:
    _, forward = make_step(head, "grouped", case, "fp32", device)
    with torch.no_grad():
        return forward().float()


def row_for(case_name: str, case, dtype: str, impl: str, ms: float, device: torch.device, **extra) -> dict:
    row = {"op": "final_heads", "impl": impl, "case": case_name, "shape": shape_id(case), "dtype": dtype,
           "mode": "fwd_bwd", "ms": ms, "auto_impl": resolve_final_head_impl("auto", device),
           "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
           "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32), "threads": torch.get_num_threads()}
    base = _median_ms.get((device.type, case_name, dtype, "public_loop"))
    if base is not None and impl != "public_loop":
        row["speedup_vs_public_loop"] = base / ms
    row.update(extra)
    return row


def run_case(case_name: str, dtype: str, impls, device: torch.device, rounds: int = CPU_ROUNDS) -> list:
    """Time every implementation of one (case, dtype) and record a row each.  On CUDA each is timed
    by do_bench in turn (peak memory recorded); on CPU in alternating rounds."""
    case = cases_for(device)[case_name]
    head = make_head(case, device)
    ref = reference_maps(head, case, device)
    steps, diffs = {}, {}
    for impl in impls:
        step, forward = make_step(head, impl, case, dtype, device)
        with torch.no_grad():
            diffs[impl] = max_rel_diff(forward(), ref)
        steps[impl] = step
    ms, peak = {}, {}
    if device.type == "cuda":
        for impl, step in steps.items():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            ms[impl] = harness.time_ms(step, device)
            peak[impl] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        for step in steps.values():                       # warm-up
            step()
        times = {impl: [] for impl in steps}
        for _ in range(rounds):
            for impl, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[impl].append((time.perf_counter() - t0) * 1e3)
        ms = {impl: statistics.median(t) for impl, t in times.items()}
        spread = {impl: (min(t), max(t)) for impl, t in times.items()}
    rows = []
    for impl in impls:                                     # public_loop first: the others' ratio
        _median_ms[(device.type, case_name, dtype, impl)] = ms[impl]
        extra = {"max_rel_diff_vs_grouped_fp32": diffs[impl]}
        if impl in peak:
            extra["peak_MB"] = peak[impl]
        else:
            extra.update(rounds=rounds, min_ms=spread[impl][0], max_ms=spread[impl][1])
        rows.append(
            harness.record(
                "bench_final_heads",
                row_for(case_name, case, dtype, impl, ms[impl], device, **extra),
                device,
                flops=head_flops(case),
            )
        )
    return rows


# ------------------------------------------------------------------------------- pytest entry

def _test_final_heads(benchmark, device, case_name, dtype, impl):
    if device.type == "cpu" and dtype != "fp32":
        pytest.skip("bf16 autocast is benchmarked on CUDA (the trainer's --amp); CPU rows are fp32")
    case = cases_for(device)[case_name]
    head = make_head(case, device)
    step, forward = make_step(head, impl, case, dtype, device)
    with torch.no_grad():
        diff = max_rel_diff(forward(), reference_maps(head, case, device))
    benchmark.group = f"final_heads-{shape_id(case)}-{dtype}-{device.type}"
    benchmark.pedantic(step, rounds=5 if device.type == "cpu" else 10, warmup_rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if device.type == "cpu" and stats is not None:
        ms = stats.stats.median * 1e3
    else:  # CUDA (device-synchronised do_bench) or pytest-benchmark disabled
        ms = harness.time_ms(step, device)
    _median_ms[(device.type, case_name, dtype, impl)] = ms
    harness.record(
        "bench_final_heads",
        row_for(case_name, case, dtype, impl, ms, device, max_rel_diff_vs_grouped_fp32=diff),
        device,
        flops=head_flops(case),
    )


if pytest is not None:
    test_final_heads = pytest.mark.parametrize("impl", IMPLS)(pytest.mark.parametrize("dtype", list(DTYPES))(
        pytest.mark.parametrize("case_name", ["voc", "coco"])(_test_final_heads)))


# ------------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cases", default="voc,coco", help="comma list of voc, coco")
    ap.add_argument(
        "--dtypes", default=None, help="comma list of fp32, bf16 (default: both on CUDA, fp32 on CPU)"
    )
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--rounds", type=int, default=CPU_ROUNDS, help="alternating rounds on CPU")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtypes = (args.dtypes or ("bf16,fp32" if device.type == "cuda" else "fp32")).split(",")
    impls = [i for i in IMPLS if i in args.impls.split(",")]   # public_loop first
    for name, choices, given in (("--cases", cases_for(device), args.cases.split(",")),
                                 ("--dtypes", DTYPES, dtypes), ("--impls", IMPLS, args.impls.split(","))):
        bad = [v for v in given if v not in choices]
        if bad:
            ap.error(f"{name}: expected values from {list(choices)}, got {bad}")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    for case_name in args.cases.split(","):
        for dtype in dtypes:
            rows = run_case(case_name, dtype, impls, device, args.rounds)
            best = min(rows, key=lambda r: r["ms"])
            auto = next((r for r in rows if r["impl"] == rows[0]["auto_impl"]), None)
            print(f"# {case_name} {dtype} on {harness.device_name(device)}: fastest {best['impl']} "
                  f"{best['ms']:.2f} ms; auto picks {rows[0]['auto_impl']}"
                  + (f" {auto['ms']:.2f} ms ({auto['ms'] / best['ms']:.2f}x the fastest)" if auto else ""),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
