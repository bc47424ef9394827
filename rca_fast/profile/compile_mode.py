"""Compile mode: every Triton kernel x launchable config x precision mode, compiled for sm_90a
without a GPU, and the extension's CUDA sources through nvcc; a table and DIR/compile.json.

``python -m rca_fast.profile compile --out DIR`` (CI runs it):
  * the jobs are ``rca_fast.kernels.compile_specs.jobs(shape, mode)``: the launch plans the real
    launchers build on fake CUDA tensors (at 132, 114 and 16 SMs), for the voc, coco and large
    profile shapes, the tiny backbone's (D = 64) and the size-1 shape, in the modes fp32, bf16,
    fp16, mix and amp, every config each plan may launch;
  * identical compiles (same source, signature, specialisation, constexprs and options: shapes only
    matter through those) are compiled once, in parallel worker processes, each with a fresh Triton
    cache shared by the run (the ptxas log, read for registers and spills, is only written when
    ptxas runs);
  * rows with the same kernel, config and dtype (a config label includes its shape-derived blocks)
    are merged, keeping the worst registers / spills / shared memory;
  * each ``csrc/cuda/*.cu`` is compiled with ``nvcc -arch=sm_90 -Xptxas -v`` (kernel = file:function,
    config = "nvcc", dtype = the template's type when the name shows one) when nvcc and torch's
    headers are found, else said and skipped (``--no-cuda`` skips them).
Exit status 1 on a compile failure, a launchable row that spills or needs more than the 232,448
bytes of shared memory one sm_90 block may use, or a fixed-rule row (column ``fixed``) over 240
registers (``launch_rule.FIXED_RULE_MAX_REGISTERS``: headroom for another ptxas); 0 otherwise.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional

ROW_KEYS = ("kernel", "config", "dtype", "shared_bytes", "registers", "spill_bytes", "launchable", "fixed")
SHAPE_NAMES = ("voc", "coco", "large", "tiny", "one")
ONE = dict(B=1, L=1, S=1, D=1, H=1, W=1, K=1, Np=1)
# the tiny backbone (D = 64) of the tests and demos, 224-pixel images (28 x 28 at stride 8)
TINY = dict(B=8, L=20, S=500, D=64, H=28, W=28, K=10, Np=16)


def _shape(name: str) -> Dict[str, int]:
    if name == "one":
        return dict(ONE)
    if name == "tiny":
        return dict(TINY)
    from .counts import PRESETS
    p = PRESETS[name]
    return dict(B=p.B, L=p.L, S=p.S, D=p.D, H=p.H, W=p.W, K=p.K, Np=p.Np)


def _prepare_env(cache_dir: str) -> None:
    """Compiled, not interpreted, kernels, with a Triton cache of this run (before any import of
    rca_fast.kernels: they read TRITON_INTERPRET when imported)."""
    if os.environ.pop("TRITON_INTERPRET", None) == "1" and "rca_fast.kernels.nce.forward" in sys.modules:
        raise RuntimeError("compile check: the kernels were imported under TRITON_INTERPRET=1; "
                           "run it in a fresh process")
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def _merge(rows: List[dict]) -> List[dict]:
    """One row per (kernel, config, dtype): the worst of the shapes' compiles."""
    merged: Dict[tuple, dict] = {}
    for r in rows:
        key = (r["kernel"], r["config"], r["dtype"])
        if key not in merged:
            merged[key] = dict(r)
            continue
        m = merged[key]
        for k in ("shared_bytes", "registers", "spill_bytes", "stack_bytes"):
            if r.get(k) is not None:
                m[k] = max(m[k] or 0, r[k])
        m["error"] = m.get("error") or r.get("error")
        m["fixed"] = bool(m.get("fixed") or r.get("fixed"))
    return list(merged.values())


def triton_rows(shapes, modes, kernels: Optional[List[str]], workers: int, plant: bool,
                progress: bool) -> List[dict]:
    from rca_fast.kernels import compile_specs
    from rca_fast.kernels.offline_compile import compile_job, job_key

    every = [j for name in shapes for mode in modes for j in compile_specs.jobs(_shape(name), mode)]
    known = sorted({j.kernel for j in every})
    unknown = sorted(set(kernels or ()) - set(known))
    if unknown:  # a filter that matches nothing would check nothing and pass
        raise ValueError(f"compile check: --kernels {unknown} are not kernels; expected some of {known}")
    jobs = [j for j in every if kernels is None or j.kernel in kernels]
    if plant:
        jobs.append(compile_specs.planted_spill_job())
    unique: Dict[str, object] = {}
    key_of = []
    for j in jobs:
        key = job_key(j)
        key_of.append(key)
        unique.setdefault(key, j)
    print(f"compile check: {len(jobs)} launches, {len(unique)} distinct compiles, {workers} processes",
          file=sys.stderr)
    results: Dict[str, dict] = {}
    keys = list(unique)
    bar = _bar(len(keys), progress)
    if workers <= 1:
        for k in keys:
            results[k] = compile_job(unique[k])
            bar.update(1)
    else:
        import multiprocessing as mp
        ctx = mp.get_context("fork") if sys.platform.startswith("linux") else None
        with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            for k, row in zip(keys, ex.map(compile_job, [unique[k] for k in keys])):
                results[k] = row
                bar.update(1)
    bar.close()
    rows = []
    for j, k in zip(jobs, key_of):
        res = results[k]
        rows.append(dict(res, kernel=j.kernel, config=j.config, dtype=j.dtype, launchable=j.launchable,
                         fixed=j.fixed))
    return _merge(rows)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _bar(total: int, progress: bool):
    if not progress:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="compile", unit="kernel", file=sys.stderr)


# ------------------------------------------------------------------------------- CUDA sources
_FN = re.compile(r"Compiling entry function '([^']+)' for 'sm_90a?'")
_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def _demangle(name: str) -> str:
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True, timeout=10).stdout.strip()
        return out or name
    except (OSError, subprocess.SubprocessError):
        return name


_DTYPES = (("double", "fp64"), ("float", "fp32"), ("BFloat16", "bf16"), ("Half", "fp16"))


def _kernel_name(demangled: str):
    """(function name, dtype of its template arguments or "-") of a demangled kernel signature,
    e.g. 'void rca_fast::(anonymous namespace)::ema_kernel<float>(float*, ...)' -> ('ema_kernel', 'fp32')."""
    s = demangled.replace("(anonymous namespace)::", "")
    s = s[5:] if s.startswith("void ") else s
    m = re.match(r"([\w:]+)(<[^()]*>)?\(", s)
    if not m:
        return s.split("(")[0], "-"
    template = m.group(2) or ""
    found = sorted((template.find(t), d) for t, d in _DTYPES if t in template)   # the first type named
    dtype = found[0][1] if found else "-"
    return m.group(1).split("::")[-1], dtype


def parse_nvcc_log(log: str, source: str) -> List[dict]:
    """Rows of an ``nvcc -Xptxas -v`` log: one per compiled kernel (function)."""
    rows, cur = [], None
    for line in log.splitlines():
        m = _FN.search(line)
        if m:
            name, dtype = _kernel_name(_demangle(m.group(1)))
            cur = dict(
                kernel=f"{source}:{name}",
                config="nvcc",
                dtype=dtype,
                shared_bytes=0,
                registers=None,
                spill_bytes=0,
                launchable=True,
                fixed=False,
                error=None,
            )
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _SPILL.search(line)
        if m:
            cur["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        m = _USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            sm = _SMEM.search(line)
            cur["shared_bytes"] = int(sm.group(1)) if sm else 0
    return rows


def cuda_rows(repo: str, workers: int) -> List[dict]:
    """Rows of the extension's .cu files (nvcc -arch=sm_90 -Xptxas -v), or [] with a note."""
    sources = sorted(glob.glob(os.path.join(repo, "csrc", "cuda", "*.cu")))
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    nvcc = shutil.which("nvcc") or os.path.join(cuda_home, "bin", "nvcc")
    if not sources or not os.path.exists(nvcc):
        print(f"compile check: no CUDA sources or no nvcc ({nvcc}): extension rows skipped", file=sys.stderr)
        return []
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths
        includes = [f"-I{p}" for p in include_paths()] + [f"-I{os.path.join(repo, 'csrc')}"]
    except Exception as exc:  # torch without its headers
        print(f"compile check: torch headers not found ({exc}): extension rows skipped", file=sys.stderr)
        return []
    import sysconfig
    includes.append(f"-I{sysconfig.get_paths()['include']}")

    def one(src: str) -> List[dict]:
        with tempfile.TemporaryDirectory() as tmp:
            # the flags of the extension's build (csrc_build.py, torch.utils.cpp_extension)
            cmd = [nvcc, "-arch=sm_90", "-Xptxas", "-v", "-std=c++20", "-O3", "-DRCA_FAST_WITH_CUDA", "-c",
                   src,
                   "-o", os.path.join(tmp, "x.o"), "-DTORCH_EXTENSION_NAME=_C", "-D_GLIBCXX_USE_CXX11_ABI=1",
                   *COMMON_NVCC_FLAGS, *includes]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        name = os.path.basename(src)
        if proc.returncode != 0:
            return [dict(kernel=name, config="nvcc", dtype="-", shared_bytes=None, registers=None,
                         spill_bytes=None, launchable=True, fixed=False,
                         error=proc.stderr[-1500:])]
        return parse_nvcc_log(proc.stderr, name)

    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max(1, workers)) as ex:
        return [r for rows in ex.map(one, sources) for r in rows]


# ------------------------------------------------------------------------------------ output
def table(rows: List[dict]) -> str:
    head = f"{'kernel':<34} {'config':<44} {'dtype':<9} {'shared B':>9} {'regs':>5} {'spill B':>8} launchable"
    lines = [head, "-" * len(head)]
    for r in rows:
        def num(v):
            return "-" if v is None else str(v)
        flag = ("yes, fixed rule" if r.get("fixed") else "yes") if r["launchable"] else "no"
        if r.get("error"):
            flag += "  COMPILE FAILED"
        lines.append(
            f"{r['kernel'][:34]:<34} {r['config'][:44]:<44} {r['dtype']:<9} {num(r['shared_bytes']):>9} "
            f"{num(r['registers']):>5} {num(r['spill_bytes']):>8} {flag}"
        )
    return "\n".join(lines)


def run(args) -> int:
    """The compile subcommand; returns the exit status."""
    t0 = time.time()
    if args.write_rule_table:
        from rca_fast.kernels import fixed_rule
        n = fixed_rule.write_table({name: _shape(name) for name in SHAPE_NAMES}, args.write_rule_table)
        print(f"wrote {n} rows of the fixed launch rule to {args.write_rule_table}")
        return 0
    os.makedirs(args.out, exist_ok=True)
    cache = tempfile.mkdtemp(prefix="rca_compile_check_")
    _prepare_env(cache)
    from rca_fast.kernels.offline_compile import SM90_SHARED_LIMIT, row_problems
    shapes = args.shapes or list(SHAPE_NAMES)
    from rca_fast.kernels.compile_specs import MODES
    modes = args.dtypes or list(MODES)
    kernels = args.kernels
    workers = args.jobs or (os.cpu_count() or 1)
    progress = {"auto": sys.stderr.isatty(), "on": True, "off": False}[args.progress]
    try:
        rows = triton_rows(shapes, modes, kernels, workers, args.plant_spill, progress)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if not args.no_cuda and kernels is None:
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        rows += _merge(cuda_rows(repo, workers))
    problems = [(r, row_problems(r, SM90_SHARED_LIMIT)) for r in rows]
    problems = [(r, p) for r, p in problems if p]
    print(table(rows))
    doc = dict(target="sm_90a (triton GPUTarget('cuda', 90, 32); nvcc -arch=sm_90)",
               shared_limit_bytes=SM90_SHARED_LIMIT, shapes=shapes, dtypes=modes,
               seconds=round(time.time() - t0, 1),
               rows=[{k: r[k] for k in ROW_KEYS} for r in rows],
               problems=[dict(kernel=r["kernel"], config=r["config"], dtype=r["dtype"], problem=p,
                              error=r.get("error")) for r, p in problems])
    path = os.path.join(args.out, "compile.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    for r, p in problems:
        error = f"\n{r['error']}" if r.get("error") else ""
        print(f"FAIL {r['kernel']} {r['config']} {r['dtype']}: {p}" + error, file=sys.stderr)
    print(f"{len(rows)} rows, {len(problems)} problems, {doc['seconds']} s; wrote {path}")
    return 1 if problems else 0


def add_parser(sub, fmt) -> None:
    """Register the ``compile`` subcommand on the profile CLI's subparsers."""
    p = sub.add_parser("compile", help="compile every Triton kernel and CUDA source for sm_90a offline "
                                       "(table, compile.json; exit 1 on spills/over-limit/failures)",
                       formatter_class=fmt, description=__doc__)
    p.add_argument("--out", default="rca_compile", help="output folder (default ./rca_compile)")
    p.add_argument("--shapes", nargs="+", choices=SHAPE_NAMES, default=None,
                   help="shapes to compile for (default all: voc coco large tiny one)")
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16", "fp16", "mix", "amp"], default=None,
                   help="precision modes (default all)")
    p.add_argument("--kernels", nargs="+", default=None,
                   help="only these Triton kernels (nce_lse nce_row nce_bwd attn_fwd attn_bwd_scores "
                        "attn_bwd_grads attn_sum_splits map_fwd map_bwd); skips the CUDA sources")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU count)")
    p.add_argument("--no-cuda", action="store_true", help="skip the extension's .cu files")
    p.add_argument("--plant-spill", action="store_true",
                   help="also compile a config known to spill, marked launchable (the check's own test)")
    p.add_argument("--write-rule-table", default=None, metavar="PATH",
                   help="write the fixed launch rule's table (kernels/fixed_rule_table.md) and exit")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="progress bar on stderr (auto: when it is a terminal)")

