"""``python -m rca_fast.profile ops|step ...``: where the time goes, against the device's limits.

``ops``: every op forward and backward on every backend, against ceilings measured in the same
run; prints a table, writes DIR/profile.json and DIR/roofline.png.
``step``: N training steps under torch.profiler; prints the split of a step, writes
DIR/trace.json (Chrome trace), DIR/step.json and DIR/step.png.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import torch

from .jsonout import write_json

OPS_COLUMNS = """\
columns of the ops table (and keys of each row in profile.json):
  shape    the profile shape (voc, coco, large or B,L,S,D,HW...); profile.json "shapes" holds its sizes
  op       map = masked_average_pool, nce = bank_nce_loss (with region mixup), attention =
           prototype_attention, ema = ema_update_ (bank update), kmeans (prototype refresh)
  dir      fwd = forward, bwd = backward (gradients of the differentiable inputs, graph kept)
  backend  torch = plain-torch reference, triton = Triton kernels, cuda = compiled extension (its
           CPU twin on the CPU), compile = torch.compile of the torch path
  ms       median milliseconds per call over many timed calls, after warm-up, with device
           synchronisation (CUDA events and an L2 flush before each call on a GPU)  [key: ms]
  p20-p80  20th-80th percentile of the timed calls: the spread; differences inside it are noise
  MB       minimum bytes moved, 1e6: every input read once, every output written once, from the
           shapes (formulas in rca_fast/profile/counts.py and profile.json "work_formulas")  [bytes]
  GFLOP    minimum floating-point operations of one call, 1e9 (a multiply-add counts 2; a backward
           that recomputes the forward's scores does more)  [flops]
  GB/s     achieved bandwidth: minimum bytes / time  [GBps]
  TFLOP/s  achieved arithmetic rate: FLOPs / time  [TFLOPs]
  FLOP/B   arithmetic intensity: FLOPs / minimum bytes; under the ridge point (matmul rate /
           copy bandwidth) an op can only be memory-bound  [intensity]
  roof ms  roofline time: the larger of bytes / copy bandwidth and FLOPs / matmul rate, with the
           ceilings measured at the start of this run: each the best of its probes (large and
           the ops' own copy sizes and matrix products; on the CPU with torch's threads and 1),
           named in the header line and in profile.json "ceiling_probes"  [roofline_ms]
  %roof    roof ms / ms: 100% runs at the device's limit; 5% means 20x slower than it could be
           [roofline_frac]; "above!" when ms < roof ms: a ceiling or the work count does not hold
           for the row, and its %roof is no result  [above_ceiling]
  bound    which ceiling sets roof ms: memory (bytes / bandwidth) or compute (FLOPs / rate); the
           rate is bf16 for bf16 runs, tf32 for fp32 runs on a GPU, fp32 on the CPU  [bound, rate]
  xtorch   speed-up over the torch backend on the same row: torch ms / ms  [speedup_vs_torch]
  err      largest |output - torch output| / largest |torch output| over the forward outputs (fwd)
           or the gradients (bwd); not computed for kmeans  [rel_err_vs_torch]
also in each row: first_ms (the first call: compilation, autotuning), reps (timed calls), dtype."""

STEP_COLUMNS = """\
columns of the step table (and keys of step.json "split"):
  part     a part of one training step: data loading (next batch + copy to the device), backbone,
           CAM heads (coarse and final), RCA head (projector, MAP, NCE, attention, the aggregation
           layers around it, the model's glue: regions, mixup, GAP), loss and other (the loss,
           gradient accumulation, anything unlabelled), each forward (fwd) and backward (bwd,
           charged to the part whose forward made the autograd node); bank update; optimiser
           (step and zero_grad);
           idle / untracked (the rest of the step's wall time); k-means refresh (run once per
           epoch: its wall time / steps per epoch)
  ms       milliseconds per step, averaged over the profiled steps: on a GPU the device time of the
           part's kernels (data loading and k-means: wall time), on the CPU the host time of its ops
  share    ms / step ms (the step includes the amortised k-means refresh)
step.json also holds, per part, "top_ops": its heaviest ops (ms per step).
The compare rows (hatched in step.png) time the region contrast + bank update of rca_fast and of
the public code's per-region loops on the same inputs (one forward pass of this model), apart
from the steps, and the step time the loops would give: step - rca_fast's + the loops'."""


def _csv(text: Optional[str]) -> Optional[List[str]]:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(text)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {text}: CUDA is not available on this machine")
    return dev


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m rca_fast.profile", description=__doc__,
                                     formatter_class=fmt, epilog=OPS_COLUMNS + "\n\n" + STEP_COLUMNS)
    sub = parser.add_subparsers(dest="mode", required=True)
    ops = sub.add_parser("ops", help="profile every op on every backend (table, profile.json, roofline.png)",
                         formatter_class=fmt, epilog=OPS_COLUMNS,
                         description="Profile every op, forward and backward, on every available backend.")
    ops.add_argument("--shapes", nargs="+", default=["voc"], metavar="SHAPE",
                     help="one or more of voc, coco, large, or B,L,S,D,HW[,K[,present]] with HW as H "
                          "or HxW (e.g. 2,3,7,60,7x13); default voc")
    ops.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the float inputs")
    ops.add_argument("--backends", default=None,
                     help="comma list of torch,triton,cuda,compile (default: every backend available "
                          "on the device, plus compile; triton on the CPU only when named here, "
                          "through the interpreter)")
    ops.add_argument("--ops", default=None,
                     help="comma list of masked_average_pool,bank_nce_loss,prototype_attention,"
                          "ema_update_,kmeans or map,nce,attention,ema,kmeans (default all)")
    ops.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default)")
    ops.add_argument("--out", default="rca_profile", help="output folder (default ./rca_profile)")
    ops.add_argument("--kmeans-iters", type=int, default=10, help="Lloyd iterations of kmeans (tol 0)")
    ops.add_argument("--warmup", type=int, default=3, help="untimed calls after the first (default 3)")
    ops.add_argument("--min-reps", type=int, default=10, help="fewest timed calls (default 10)")
    ops.add_argument("--max-reps", type=int, default=500, help="most timed calls (default 500)")
    ops.add_argument("--budget-ms", type=float, default=300.0,
                     help="aim of the timed calls' total time per row (default 300 ms)")
    ops.add_argument("--no-l2-flush", action="store_true", help="do not flush the GPU L2 between calls")
    ops.add_argument("--ceiling-copy-mb", type=float, default=None,
                     help="copy-bandwidth buffer in MiB (default 1024 on GPU, 64 on CPU)")
    ops.add_argument("--ceiling-matmul-n", type=int, default=None,
                     help="side of the square ceiling matmuls (default 8192 on GPU, 1024 on CPU); "
                          "the ops' own products are probed as well")
    ops.add_argument("--no-check", action="store_true", help="skip the comparison with the torch backend")
    ops.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    ops.add_argument("--no-plot", action="store_true", help="do not draw roofline.png")
    ops.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                     help="progress bar on stderr (auto: when it is a terminal)")

    step = sub.add_parser("step", help="profile training steps (split, trace.json, step.json, step.png)",
                          formatter_class=fmt, epilog=STEP_COLUMNS, allow_abbrev=False,
                          description="Run N training steps under torch.profiler and split a step into "
                                      "its parts. Flags not listed here go to the trainer "
                                      "(python -m rca_fast.train --help).")
    step.add_argument("--steps", type=int, default=10, help="profiled training steps (default 10)")
    step.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (default 3)")
    step.add_argument("--profile-out", "--out", dest="profile_out", default="rca_profile",
                      help="output folder of the profile (default ./rca_profile)")
    step.add_argument("--no-public", action="store_true",
                      help="skip the public code's per-region RCA head comparison")
    step.add_argument("--no-plot", action="store_true", help="do not draw step.png")
    step.add_argument("--no-trace", action="store_true", help="do not write trace.json")
    step.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                      help="progress bar on stderr (auto: when it is a terminal)")
    from . import compile_mode
    compile_mode.add_parser(sub, fmt)   # ``compile``: the offline sm_90a compile check
    return parser


def _progress(choice: str) -> Optional[bool]:
    return {"auto": None, "on": True, "off": False}[choice]


def main_ops(args) -> dict:
    from . import counts, ops_mode, plots
    from .timing import Timer
    shapes = [counts.parse_shape(s) for s in args.shapes]
    device = _device(args.device)
    backends = _csv(args.backends)
    if backends is not None:
        bad = [b for b in backends if b not in ops_mode.ALL_BACKENDS]
        if bad:
            raise SystemExit(f"--backends: unknown {bad}; choose from {ops_mode.ALL_BACKENDS}")
        if "triton" in backends and device.type != "cuda":
            # asked for explicitly: the interpreter must be on before any kernel module is imported
            os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.kmeans_iters < 1:
        raise SystemExit(f"--kmeans-iters must be >= 1, got {args.kmeans_iters}")
    ceiling_kwargs = {}
    if args.ceiling_copy_mb is not None:
        ceiling_kwargs["copy_bytes"] = int(args.ceiling_copy_mb * (1 << 20))
    if args.ceiling_matmul_n is not None:
        ceiling_kwargs["matmul_n"] = args.ceiling_matmul_n
    timer = Timer(device, warmup=args.warmup, min_reps=args.min_reps, max_reps=args.max_reps,
                  budget_ms=args.budget_ms, flush_l2=not args.no_l2_flush)
    doc = ops_mode.run(shapes, dtype_name=args.dtype, device=device, backends=backends,
                       ops=_csv(args.ops), timer=timer, ceiling_kwargs=ceiling_kwargs,
                       kmeans_iters=args.kmeans_iters, check=not args.no_check, seed=args.seed,
                       progress=_progress(args.progress))
    os.makedirs(args.out, exist_ok=True)
    doc["files"] = {"json": os.path.join(args.out, "profile.json")}
    if not args.no_plot and doc["rows"]:
        plots.ensure_rows(doc["rows"])
        if plots.available():
            doc["files"]["roofline"] = plots.roofline(doc, os.path.join(args.out, "roofline.png"))
        else:
            print("matplotlib is not installed: no roofline.png (pip install matplotlib)", file=sys.stderr)
    write_json(doc["files"]["json"], doc)
    print(ops_mode.table(doc))
    print(f"wrote {', '.join(doc['files'].values())}")
    return doc


def main(argv: Optional[List[str]] = None):
    """Entry point; returns the profile document (a dict) so callers and tests can use it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from .torch_logs import quiet_cuda_home_notice
    quiet_cuda_home_notice()   # a CPU machine with a CUDA toolkit: a notice that says nothing here
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.mode == "compile":
        if rest:
            parser.error(f"unrecognized arguments for compile: {' '.join(rest)}")
        from . import compile_mode
        raise SystemExit(compile_mode.run(args))
    if args.mode == "ops":
        if rest:
            parser.error(f"unrecognized arguments for ops: {' '.join(rest)}")
        return main_ops(args)
    from . import step_mode
    return step_mode.main(args, rest)


