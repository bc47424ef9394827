"""Masked average pooling: the Triton kernels vs rca_fast.ref eager and torch.compile(ref).

MAP pools, per image and present class, the mean feature under ``cam > mean(cam)``.  Target
(issue 4, H100/H200): forward+backward at B=8, D=512, 46x46, L=20 with 2 present classes per
image (VOC: 1.5 on average) at >= 70% of the measured copy bandwidth.  The bytes that must move
are ``rca_fast.profile.counts.map_fwd`` + ``map_bwd`` (the project's one cost model): the
features read once by the forward and grad_features written once by the backward (the features
themselves are not needed there), the present classes' CAM rows (float32 here, as the trainer's
CAM probabilities) each way, the (B, L, D) embeddings / their gradient and the (B, L) labels
and counts.  Rows, per case, dtype (fp32, bf16) and mode (fwd, fwd_bwd):

  rca_fast      rca_fast.kernels.map.forward.masked_average_pool (Triton, CUDA only)
  ref           rca_fast.ref.map.masked_average_pool, eager
  ref_compiled  torch.compile(ref) (CUDA only)

Run on a GPU: ``pytest benchmarks/bench_map.py --benchmark-only -s``.  Each row prints ms, GB/s,
TFLOP/s, the fraction of the measured copy bandwidth and roofline, and for rca_fast the speed-up
over the other rows of the same (case, dtype, mode); rows are appended to
benchmarks/results/bench_map-<device>.json.  On CPU only the eager reference runs, smaller.
"""
import torch

import harness
from rca_fast.profile import counts
from rca_fast.ref.map import masked_average_pool as ref_map

# (B, L, D, H, W, present classes per image; None = no labels, every class pooled)
GPU_CASES = {"voc": (8, 20, 512, 46, 46, 2), "voc-nolabels": (8, 20, 512, 46, 46, None),
             "coco": (8, 80, 512, 46, 46, 3)}
CPU_CASES = {"voc": (2, 20, 128, 23, 23, 2)}
PROVIDERS = ["ref", "ref_compiled", "rca_fast"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ["fwd", "fwd_bwd"]
TARGET_FRAC_COPY_BW = 0.7   # fwd_bwd, voc case, rca_fast
ROUNDS = 20


def shape_id(case) -> str:
    B, L, D, H, W, present = case
    return f"B{B}-L{L}-D{D}-HW{H}x{W}-" + (f"present{present}" if present else "nolabels")


def profile_shape(case) -> counts.ProfileShape:
    """The case as the cost model's shape (no labels: every class is a present pair)."""
    B, L, D, H, W, present = case
    return counts.ProfileShape(shape_id(case), B=B, L=L, S=1, D=D, H=H, W=W, K=1, present=present or L)


def make_labels(B: int, L: int, present, device) -> "torch.Tensor | None":
    """``present`` random classes in every image (None: no labels)."""
    if present is None:
        return None
    g = torch.Generator().manual_seed(1)
    labels = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        labels[b, torch.randperm(L, generator=g)[:present]] = True
    return labels.to(device)


def make_step(provider, case, dtype, mode, device):
    """A closure running one forward (and backward) of ``provider``'s MAP on fixed random inputs."""
    fn = harness.provider_fn(provider, ref_map, "rca_fast.kernels.map.forward:masked_average_pool")
    B, L, D, H, W, present = case
    g = torch.Generator().manual_seed(0)
    need_grad = mode == "fwd_bwd"
    features = torch.randn(B, D, H, W, generator=g).to(device=device, dtype=dtype).requires_grad_(need_grad)
    cams = torch.randn(B, L, H, W, generator=g).to(device)            # CAMs stay float32
    labels = make_labels(B, L, present, device)
    grad_emb = torch.randn(B, L, D, generator=g).to(device=device, dtype=dtype)
    return harness.forward_backward(lambda: fn(features, cams, labels)[0], need_grad, features, grad_emb)


@harness.grid(GPU_CASES, DTYPES, MODES, PROVIDERS)
def test_map(benchmark, device, case_name, dtype_name, mode, provider):
    case, dtype = harness.pick_case(device, GPU_CASES, CPU_CASES, case_name, provider, DTYPES, dtype_name)
    _, ms = harness.time_step(benchmark, make_step(provider, case, dtype, mode, device),
                              f"map-{shape_id(case)}-{dtype_name}-{mode}-{device.type}", device, ROUNDS)
    shape = profile_shape(case)
    nbytes, flops = harness.work("masked_average_pool", shape, dtype, mode, cam_dtype=torch.float32)
    row = {"op": "masked_average_pool", "provider": provider, "shape": shape_id(case),
           "dtype": dtype_name, "mode": mode, "present_pairs": shape.Np, "ms": ms}
    harness.add_speedups(row, ("map", device.type, case_name, dtype_name, mode), provider, PROVIDERS, ms)
    if provider == "rca_fast" and mode == "fwd_bwd" and case_name == "voc":
        row["target_frac_copy_bw"] = TARGET_FRAC_COPY_BW
    full = harness.record("bench_map", row, device, nbytes=nbytes, flops=flops,
                          dtype=harness.dtype_name(dtype))
    if "target_frac_copy_bw" in row:
        met = full["frac_copy_bw"] >= TARGET_FRAC_COPY_BW
        print(f"\nmasked_average_pool {shape_id(case)} {dtype_name} fwd+bwd: rca_fast {ms * 1e3:.1f} us, "
              f"{full['GBps']:.0f} GB/s = {full['frac_copy_bw']:.0%} of copy bandwidth "
              f"(target {TARGET_FRAC_COPY_BW:.0%}: {'met' if met else 'NOT met'})")
