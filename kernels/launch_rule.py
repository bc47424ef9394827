"""How every Triton kernel of rca_fast chooses its launch configuration: one fixed rule by default.

Determinism rule: a launch's configuration (block sizes, warps, stages) is a pure function of the
shapes and dtypes, written next to each kernel (``pick_*`` functions).  Two processes, two runs and
all DDP ranks therefore run the same binaries and sum in the same order, so ``--resume`` ends with
the same weights and every rank holds the same bank.  Autotuning (Triton timing every candidate in
each process) is used only when ``RCA_FAST_AUTOTUNE=1`` is set: the benchmarks use it to find the
rule; it is not deterministic across processes.

Every candidate a kernel may launch (the fixed rule's choice and the autotune lists) is listed per
precision mode and checked by ``python -m rca_fast.profile compile``: it compiles for sm_90a with
no register spills and within the 232,448 bytes of shared memory one block may use.
"""
import os

AUTOTUNE_ENV = "RCA_FAST_AUTOTUNE"

# ptxas, left to itself, caps some kernels at 128 registers and spills a few bytes to fit two blocks
# per SM (sm_90a, ptxas of Triton 3.8: 12-96 B of spills at exactly 128 registers, in NCE and MAP
# kernels whose need was 150-170).  Every launch passes maxnreg=255 (PTX .maxnreg): ptxas then uses
# the registers the kernel needs, the compile check's zero-spill rule holds, and occupancy is set by
# the config (warps, tiles) rather than by spilling.
MAXNREG = 255


def autotune_requested() -> bool:
    """Whether ``RCA_FAST_AUTOTUNE`` asks for autotuning (1/true/yes/on)."""
    return os.environ.get(AUTOTUNE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def config_label(kwargs: dict, num_warps: int, num_stages: int) -> str:
    """A short name of a config for tables: its block sizes, warps and stages."""
    blocks = "-".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in sorted(kwargs.items()))
    return f"{blocks}-w{num_warps}-s{num_stages}"


def launch_options(cfg) -> dict:
    """num_warps, num_stages and maxnreg of a ``triton.Config`` (maxnreg defaults to MAXNREG)."""
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg or MAXNREG)
