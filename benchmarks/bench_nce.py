"""Bank NCE with region mixup: the Triton kernels vs rca_fast.ref eager and torch.compile(ref).

Each query row against the whole (L, S, D) memory bank, cosine similarity / 0.07, mixup on (as RCA
trains).  Targets (issue 4, H100/H200), forward, bank 1000x1000x512 bf16 (query bf16 too):
  * N=512 and N=64: within 2x of the roofline time, the larger of (bytes that must move / measured
    copy bandwidth) and (matmul FLOPs / measured bf16 matmul rate) -- N=64 is bank-read bound,
    N=512 matmul bound; bytes and FLOPs from ``rca_fast.profile.counts.nce_fwd`` / ``nce_bwd``
    (the project's one cost model: N query rows of one present class each);
  * extra device memory of one step < 64 MB (torch.cuda.max_memory_allocated above what the
    inputs hold; the eager reference materialises N x L x S logits: 2 GB at N=512).
Rows, per case, dtype (bf16: bf16 query and bank; fp32) and mode (fwd, fwd_bwd):

  rca_fast      rca_fast.kernels.nce.forward.bank_nce_loss (Triton, CUDA only)
  ref           rca_fast.ref.nce.bank_nce_loss, eager
  ref_compiled  torch.compile(ref) (CUDA only)

Run on a GPU: ``pytest benchmarks/bench_nce.py --benchmark-only -s``.  Each row prints ms, GB/s,
TFLOP/s, the fraction of the roofline, the extra device memory, and for rca_fast the speed-up over
the other rows of the same (case, dtype, mode); rows are appended to
benchmarks/results/bench_nce-<device>.json.  On CPU only the eager reference runs, on a small case.
"""
import torch

import harness
from rca_fast.profile import counts
from rca_fast.ref.nce import bank_nce_loss as ref_nce

# (N, L, S, D)
GPU_CASES = {"bank1000-N512": (512, 1000, 1000, 512), "bank1000-N64": (64, 1000, 1000, 512),
             "voc": (16, 20, 500, 512)}
CPU_CASES = {"voc": (16, 20, 500, 512)}
PROVIDERS = ["ref", "ref_compiled", "rca_fast"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MODES = ["fwd", "fwd_bwd"]
TARGET_CASES = ("bank1000-N512", "bank1000-N64")   # bf16, fwd, rca_fast
TARGET_ROOFLINE_FACTOR = 2.0
TARGET_EXTRA_MB = 64.0
ROUNDS = 20


def shape_id(case) -> str:
    N, L, S, D = case
    return f"N{N}-L{L}-S{S}-D{D}"


def profile_shape(case) -> counts.ProfileShape:
    """The case as the cost model's shape: N images of one present class = N query rows."""
    N, L, S, D = case
    return counts.ProfileShape(shape_id(case), B=N, L=L, S=S, D=D, H=1, W=1, K=1, present=1)


def make_step(provider, case, dtype, mode, device):
    """A closure running one forward (and backward) of ``provider``'s NCE on fixed random inputs."""
    fn = harness.provider_fn(provider, ref_nce, "rca_fast.kernels.nce.forward:bank_nce_loss")
    N, L, S, D = case
    g = torch.Generator().manual_seed(0)
    need_grad = mode == "fwd_bwd"
    query = torch.randn(N, D, generator=g).to(device=device, dtype=dtype).requires_grad_(need_grad)
    bank = torch.randn(L, S, D, generator=g).to(device=device, dtype=dtype)
    target = torch.randint(L, (N,), generator=g).to(device)
    mix_target = torch.randint(L, (N,), generator=g).to(device)
    mix_weight = torch.distributions.Beta(8.0, 8.0).sample((N,)).to(device)
    return harness.forward_backward(
        lambda: fn(query, bank, target, temperature=0.07, mix_target=mix_target, mix_weight=mix_weight),
        need_grad, query)


@harness.grid(GPU_CASES, DTYPES, MODES, PROVIDERS)
def test_nce(benchmark, device, case_name, dtype_name, mode, provider):
    case, dtype = harness.pick_case(device, GPU_CASES, CPU_CASES, case_name, provider, DTYPES, dtype_name)
    step, ms = harness.time_step(benchmark, make_step(provider, case, dtype, mode, device),
                                 f"nce-{shape_id(case)}-{dtype_name}-{mode}-{device.type}", device, ROUNDS)
    extra_mb = harness.extra_memory_mb(step, device)
    nbytes, flops = harness.work("bank_nce_loss", profile_shape(case), dtype, mode)
    row = {"op": "bank_nce_loss", "provider": provider, "shape": shape_id(case), "case": case_name,
           "dtype": dtype_name, "mode": mode, "mixup": True, "ms": ms, "extra_MB": extra_mb}
    harness.add_speedups(row, ("nce", device.type, case_name, dtype_name, mode), provider, PROVIDERS, ms)
    is_target = (provider == "rca_fast" and case_name in TARGET_CASES and dtype_name == "bf16"
                 and mode == "fwd")
    if is_target:
        row["target_max_roofline_factor"] = TARGET_ROOFLINE_FACTOR
        row["target_extra_MB"] = TARGET_EXTRA_MB
    full = harness.record("bench_nce", row, device, nbytes=nbytes, flops=flops,
                          dtype=harness.dtype_name(dtype))
    if is_target:
        roofline = full["roofline_ms"]
        met = ms <= TARGET_ROOFLINE_FACTOR * roofline and extra_mb < TARGET_EXTRA_MB
        print(f"\nbank_nce_loss {shape_id(case)} bf16 fwd: rca_fast {ms:.3f} ms = {ms / roofline:.2f}x "
              "roofline "
              f"({roofline:.3f} ms), extra memory {extra_mb:.1f} MB (target <= {TARGET_ROOFLINE_FACTOR}x, "
              f"< {TARGET_EXTRA_MB:.0f} MB: {'met' if met else 'NOT met'})")
