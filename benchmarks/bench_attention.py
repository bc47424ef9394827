"""Prototype attention: the Triton kernels vs rca_fast.ref eager, torch.compile(ref) and SDPA with the
memory-efficient backend forced.

softmax(scale * q k^T) v with the P prototypes shared by all B*N queries (RCA's regional semantic
aggregation).  Target (issue 4, H100/H200): forward+backward at B=8, N=46x46, P=200, D=Dv=512 faster
than SDPA memory-efficient.  Rows, per dtype (bf16, fp32) and mode (fwd, fwd_bwd):

  rca_fast          rca_fast.kernels.attention.forward.prototype_attention (Triton, CUDA only)
  ref               rca_fast.ref.attention.prototype_attention, eager
  ref_compiled      torch.compile(ref) (CUDA only)
  sdpa_efficient    F.scaled_dot_product_attention under sdpa_kernel(EFFICIENT_ATTENTION), q as
                    (B, 1, N, D) and k/v broadcast over the batch with expand (CUDA only)
  sdpa_efficient_rows  the same with the B*N queries as one sequence (1, 1, B*N, D): no broadcast,
                    so k/v gradients need no sum over the batch (CUDA only)

Run on a GPU: ``pytest benchmarks/bench_attention.py --benchmark-only -s``.  Each row prints ms,
GB/s, TFLOP/s, the fraction of the measured roofline, the extra device memory of one step, and for
rca_fast the speed-up over each other row of the same (shape, dtype, mode); rows are appended to
benchmarks/results/bench_attention-<device>.json.  On CPU only the eager reference runs, at a
smaller shape.
"""
import pytest
import torch
import torch.nn.functional as F

import harness
from rca_fast.profile import counts
from rca_fast.ref.attention import prototype_attention as ref_attention

GPU_CASES = [(8, 2116, 200, 512, 512), (8, 2116, 2048, 512, 512)]   # (B, N, P, D, Dv)
CPU_CASES = [(1, 529, 200, 512, 512)]
PROVIDERS = ["sdpa_efficient", "sdpa_efficient_rows", "ref", "ref_compiled", "rca_fast"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MODES = ["fwd", "fwd_bwd"]
ROUNDS = 20


def shape_id(case) -> str:
    B, N, P, D, Dv = case
    side = int(round(N ** 0.5))
    hw = f"HW{side}x{side}" if side * side == N else f"N{N}"
    return f"B{B}-{hw}-P{P}-D{D}-Dv{Dv}"


def profile_shape(case) -> counts.ProfileShape:
    """The case as the cost model's shape (``counts.attention_fwd`` / ``attention_bwd``: the
    minimum -- q, k, v read and out written; the backward reads q, k, v, dO and writes dq, dk, dv,
    no saved statistics; FLOPs of the math's matmuls, no recomputation): N queries per image as
    an N x 1 map, the P prototypes as P classes of one each.  The model's values are as wide as its
    queries (Dv = D), the only case the cost model counts."""
    B, N, P, D, Dv = case
    if Dv != D:
        raise ValueError(f"the cost model counts Dv == D, got D={D}, Dv={Dv}")
    return counts.ProfileShape(shape_id(case), B=B, L=P, S=1, D=D, H=N, W=1, K=1, present=1)


def make_attention(provider: str, B: int, N: int):
    """fn(q (B, N, D), k (P, D), v (P, Dv), scale) -> (B, N, Dv) for one provider."""
    if provider == "ref":
        return lambda q, k, v, scale: ref_attention(q, k, v, scale=scale)
    if provider == "ref_compiled":
        compiled = torch.compile(ref_attention)
        return lambda q, k, v, scale: compiled(q, k, v, scale=scale)
    if provider == "rca_fast":
        from rca_fast.kernels.attention.forward import prototype_attention
        return lambda q, k, v, scale: prototype_attention(q, k, v, scale=scale)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(q, k, v, scale):
        P, D = k.shape
        Dv = v.shape[1]
        if provider == "sdpa_efficient":
            q4 = q.view(B, 1, N, D)
            k4, v4 = k.view(1, 1, P, D).expand(B, 1, P, D), v.view(1, 1, P, Dv).expand(B, 1, P, Dv)
        else:
            q4, k4, v4 = q.view(1, 1, B * N, D), k.view(1, 1, P, D), v.view(1, 1, P, Dv)
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return F.scaled_dot_product_attention(q4, k4, v4, scale=scale).view(B, N, Dv)
    return sdpa


def make_step(fn, case, dtype, mode, device):
    B, N, P, D, Dv = case
    g = torch.Generator(device="cpu").manual_seed(0)
    need_grad = mode == "fwd_bwd"
    q, k, v = (torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_(need_grad)
               for s in ((B, N, D), (P, D), (P, Dv)))
    grad_out = torch.randn(B, N, Dv, generator=g).to(device=device, dtype=dtype)
    scale = D ** -0.5

    def step():
        out = fn(q, k, v, scale)
        if need_grad:
            torch.autograd.grad(out, (q, k, v), grad_out)
        harness.sync(device)
    return step


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case_index", [0, 1], ids=["P200", "P2048"])
def test_attention(benchmark, device, case_index, dtype_name, mode, provider):
    case, dtype = harness.pick_case(device, dict(enumerate(GPU_CASES)), dict(enumerate(CPU_CASES)),
                                    case_index,
                                    provider, DTYPES, dtype_name)
    fn = make_attention(provider, case[0], case[1])
    step = make_step(fn, case, dtype, mode, device)
    try:
        step()          # compiles (torch.compile, Triton autotuning) outside the timing
    except RuntimeError as exc:   # e.g. an SDPA backend refusing these shapes on this torch
        pytest.skip(f"{provider} cannot run {shape_id(case)} {dtype_name}: {exc}".splitlines()[0])
    benchmark.group = f"attention-{shape_id(case)}-{dtype_name}-{mode}-{device.type}"
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    ms = harness.time_ms(step, device, reps=ROUNDS)
    nbytes, flops = harness.work("prototype_attention", profile_shape(case), dtype, mode)
    row = {"op": "prototype_attention", "provider": provider, "shape": shape_id(case),
           "dtype": dtype_name, "mode": mode, "ms": ms, "extra_MB": harness.extra_memory_mb(step, device)}
    harness.add_speedups(row, ("attention", device.type, shape_id(case), dtype_name, mode), provider,
                         PROVIDERS, ms)
    if provider == "rca_fast":
        ratios = ", ".join(f"{k[len('speedup_vs_'):]} {v:.2f}x" for k,
                           v in row.items() if k.startswith("speedup_vs_"))
        print(f"\nprototype_attention {shape_id(case)} {dtype_name} {mode}: rca_fast {ms:.3f} ms; "
              f"speed-up over {ratios or 'nothing timed in this run'} (target: > 1x sdpa_efficient)")
    harness.record("bench_attention", row, device, nbytes=nbytes, flops=flops,
                   dtype=harness.dtype_name(dtype))
