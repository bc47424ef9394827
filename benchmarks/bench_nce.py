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
import pytest
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

_median_ms = {}  # (device, case, dtype, mode, provider) -> ms


def shape_id(case) -> str:
    N, L, S, D = case
    return f"N{N}-L{L}-S{S}-D{D}"


def profile_shape(case) -> counts.ProfileShape:
    """The case as the cost model's shape: N images of one present class = N query rows."""
    N, L, S, D = case
    return counts.ProfileShape(shape_id(case), B=N, L=L, S=S, D=D, H=1, W=1, K=1, present=1)


def make_nce(provider: str):
    if provider == "ref":
        return ref_nce
    if provider == "ref_compiled":
        return torch.compile(ref_nce)
    from rca_fast.kernels.nce.forward import bank_nce_loss
    return bank_nce_loss


def make_step(fn, case, dtype, mode, device, *, sync: bool):
    """A closure running one forward (and backward) of ``fn`` on fixed random inputs."""
    N, L, S, D = case
    g = torch.Generator().manual_seed(0)
    need_grad = mode == "fwd_bwd"
    query = torch.randn(N, D, generator=g).to(device=device, dtype=dtype).requires_grad_(need_grad)
    bank = torch.randn(L, S, D, generator=g).to(device=device, dtype=dtype)
    target = torch.randint(L, (N,), generator=g).to(device)
    mix_target = torch.randint(L, (N,), generator=g).to(device)
    mix_weight = torch.distributions.Beta(8.0, 8.0).sample((N,)).to(device)

    def step():
        loss = fn(query, bank, target, temperature=0.07, mix_target=mix_target, mix_weight=mix_weight)
        if need_grad:
            torch.autograd.grad(loss, query)
        if sync:   # pytest-benchmark times on the host; harness.time_ms synchronises itself
            harness.sync(device)
    return step


def extra_memory_mb(step, device):
    """Peak device memory one step allocates above what is allocated before it, in MB (None on CPU)."""
    if device.type != "cuda":
        return None
    harness.sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    harness.sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case_name", list(GPU_CASES))
def test_nce(benchmark, device, case_name, dtype_name, mode, provider):
    cases = GPU_CASES if device.type == "cuda" else CPU_CASES
    if case_name not in cases:
        pytest.skip("this case is benchmarked on CUDA only")
    if device.type != "cuda" and (provider != "ref" or dtype_name != "fp32"):
        pytest.skip("on CPU only the eager reference in fp32 is benchmarked")
    case = cases[case_name]
    dtype = DTYPES[dtype_name]
    fn = make_nce(provider)
    step = make_step(fn, case, dtype, mode, device, sync=True)
    timed = make_step(fn, case, dtype, mode, device, sync=False)
    step()          # compiles (torch.compile, Triton autotuning) outside the timing
    extra_mb = extra_memory_mb(step, device)
    benchmark.group = f"nce-{shape_id(case)}-{dtype_name}-{mode}-{device.type}"
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    ms = harness.time_ms(timed, device, reps=ROUNDS)
    nbytes, flops = harness.work("bank_nce_loss", profile_shape(case), dtype, mode)
    row = {"op": "bank_nce_loss", "provider": provider, "shape": shape_id(case), "case": case_name,
           "dtype": dtype_name, "mode": mode, "mixup": True, "ms": ms, "extra_MB": extra_mb}
    key = (device.type, case_name, dtype_name, mode)
    _median_ms[key + (provider,)] = ms
    is_target = provider == "rca_fast" and case_name in TARGET_CASES and dtype_name == "bf16" and mode == "fwd"
    if provider == "rca_fast":
        for other in PROVIDERS[:-1]:   # run before rca_fast in PROVIDERS order
            if key + (other,) in _median_ms:
                row[f"speedup_vs_{other}"] = _median_ms[key + (other,)] / ms
    if is_target:
        row["target_max_roofline_factor"] = TARGET_ROOFLINE_FACTOR
        row["target_extra_MB"] = TARGET_EXTRA_MB
    full = harness.record("bench_nce", row, device, nbytes=nbytes, flops=flops, dtype=harness.dtype_name(dtype))
    if is_target:
        roofline = full["roofline_ms"]
        met = ms <= TARGET_ROOFLINE_FACTOR * roofline and extra_mb < TARGET_EXTRA_MB
        print(f"\nbank_nce_loss {shape_id(case)} bf16 fwd: rca_fast {ms:.3f} ms = {ms / roofline:.2f}x roofline "
              f"({roofline:.3f} ms), extra memory {extra_mb:.1f} MB (target <= {TARGET_ROOFLINE_FACTOR}x, "
              f"< {TARGET_EXTRA_MB:.0f} MB: {'met' if met else 'NOT met'})")
