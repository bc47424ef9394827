#!/usr/bin/env bash
# One-shot GPU check for a fresh H100/H200 machine holding this repository (nothing installed by
# hand, no package registry): bash benchmarks/gpu_check.sh OUT [--dry-run]
#
# In priority order: build the extension; the GPU tests; the headline benchmark rows; the final
# CAM heads' implementations (bench_final_heads.py, run as a script: no pytest-benchmark needed); the
# VOC training step (vgg16, batch 8, 368^2: eager, --amp, --compile).  (python -m rca_fast.profile
# ops --shapes voc, whose rows repeat the op benchmarks', left the plan to fit the budget: run it by
# hand.)  Every step's log (and the benchmark rows it records) is written under OUT as soon
# as the step ends, and OUT/summary.md is rewritten after every step, so a run cut off at its limit
# still returns what it did.  The whole run stops starting steps after BUDGET_S (420 s = 7 min)
# and each step has its own timeout (never past the budget).  A step whose optional package is
# missing (pytest-benchmark, scikit-learn, a C++ toolchain) is skipped and says so.  Without a GPU
# the CPU subset runs (tests of the dispatch and the extension's CPU twin, the EMA benchmark, a
# one-kernel offline compile check).  --dry-run prints the steps with their estimated times
# (estimates, not measurements) and runs nothing.
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"

# The build (run as a step): an editable install when setuptools is there (it maps rca_fast.kernels
# onto kernels/), else the extension built in place; without setuptools nothing can be built (no
# registry to install it from) and the ops fall back to the reference (ensure_importable below
# still makes the Triton kernels importable).
if [ "${1:-}" = "--build-only" ]; then
  cd "$REPO"
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
  if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
    export CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  fi
  if ! "$PY" -c "import setuptools" 2>/dev/null; then
    echo "setuptools is not installed (and there is no registry): the extension is not built"; exit 3
  fi
  "$PY" -m pip install --no-build-isolation --no-deps -e . && exit 0
  echo "pip install --no-build-isolation --no-deps -e . failed; trying setup.py build_ext --inplace"
  "$PY" setup.py build_ext --inplace
  exit $?
fi

usage() { echo "usage: bash benchmarks/gpu_check.sh OUT [--dry-run]" >&2; exit 2; }
OUT=""; DRY=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) usage ;;
    -*) echo "unknown option $a" >&2; usage ;;
    *) [ -z "$OUT" ] && OUT="$a" || usage ;;
  esac
done
[ -n "$OUT" ] || usage
BUDGET_S="${GPU_CHECK_BUDGET_S:-420}"
START=$(date +%s)

if [ "$DRY" = 1 ]; then
  HAS_GPU=1   # a dry run lists the GPU plan (the CPU subset is listed below it)
else
  HAS_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
  mkdir -p "$OUT/logs" "$OUT/results"
  OUT="$(cd "$OUT" && pwd)"
  : > "$OUT/steps.tsv"
fi

# ---------------------------------------------------------------------------------------- steps
# name | estimated s | timeout s | optional python module ("-": none) | command (run in REPO)
GPU_STEPS=(
"env|5|30|-|nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); print(torch.__version__, torch.version.cuda, triton.__version__); print(torch.cuda.get_device_name())'"
"build|80|200|-|bash benchmarks/gpu_check.sh --build-only"
# (--continue-on-collection-errors: test modules that import scikit-learn fail to collect where it is
# missing; without the flag pytest then runs no test at all)
"gpu_tests|75|150|pytest|$PY -m pytest tests -m gpu -q -p no:cacheprovider --maxfail=25 --continue-on-collection-errors --junitxml=\"\$OUT/gpu_tests.xml\""
"bench_map|20|60|pytest_benchmark|$PY -m pytest benchmarks/bench_map.py --benchmark-only -s -q -p no:cacheprovider -k 'cuda and voc and not nolabels and not ref_compiled'"
"bench_nce|25|75|pytest_benchmark|$PY -m pytest benchmarks/bench_nce.py --benchmark-only -s -q -p no:cacheprovider -k 'cuda and bf16 and bank1000 and not ref_compiled'"
"bench_attention|25|75|pytest_benchmark|$PY -m pytest benchmarks/bench_attention.py --benchmark-only -s -q -p no:cacheprovider -k 'cuda and P200 and (rca_fast or sdpa_efficient)'"
"bench_ema|10|40|pytest_benchmark|$PY -m pytest benchmarks/bench_ema.py --benchmark-only -s -q -p no:cacheprovider -k cuda"
# (needs pytest-benchmark; without scikit-learn the bench still times rca_fast against ref, and says so)
"bench_kmeans|20|60|pytest_benchmark|if ! $PY -c 'import sklearn, threadpoolctl' 2>/dev/null; then echo 'scikit-learn or threadpoolctl is not installed: no sklearn rows (rca_fast vs ref only)'; fi; $PY -m pytest benchmarks/bench_kmeans.py --benchmark-only -s -q -p no:cacheprovider -k 'cuda and default_shape'"
"bench_rca_head|25|60|pytest_benchmark|$PY -m pytest benchmarks/bench_rca_head.py --benchmark-only -s -q -p no:cacheprovider -k cuda"
# (VOC and COCO, fp32 and bf16 autocast, 5 implementations; the summary says whether impl="auto" picks the fastest)
"final_heads|35|90|-|$PY benchmarks/bench_final_heads.py --device cuda"
"step_eager|20|60|-|$PY -m rca_fast.profile step --backbone vgg16 --pretrained none --batch_size 8 --crop_size 368 --steps 3 --warmup-steps 1 --no-public --no-trace --no-plot --progress off --profile-out \"\$OUT/step_eager\""
"step_amp|20|60|-|$PY -m rca_fast.profile step --backbone vgg16 --pretrained none --batch_size 8 --crop_size 368 --steps 3 --warmup-steps 1 --no-public --no-trace --no-plot --progress off --amp --profile-out \"\$OUT/step_amp\""
"step_compile|60|120|-|$PY -m rca_fast.profile step --backbone vgg16 --pretrained none --batch_size 8 --crop_size 368 --steps 3 --warmup-steps 1 --no-public --no-trace --no-plot --progress off --compile --profile-out \"\$OUT/step_compile\""
)
CPU_STEPS=(
"env|5|30|-|$PY -c 'import sys, torch, triton; print(sys.version); print(torch.__version__, triton.__version__); print(\"no CUDA device: the CPU subset\")'"
"cpu_tests|40|120|pytest|$PY -m pytest tests/test_dispatch.py tests/test_ema_ext.py -q -p no:cacheprovider --junitxml=\"\$OUT/cpu_tests.xml\""
"bench_ema|15|60|pytest_benchmark|$PY -m pytest benchmarks/bench_ema.py --benchmark-only -s -q -p no:cacheprovider -k cpu"
"compile_check|20|120|-|env -u TRITON_INTERPRET $PY -m rca_fast.profile compile --kernels nce_row --shapes one --progress off --out \"\$OUT/compile\""
)

# After the build: if rca_fast.kernels cannot be imported (no editable install), reach the package
# through a shadow tree under OUT: rca_fast/<entry> -> the repository's, rca_fast/kernels -> kernels/.
ensure_importable() {
  (cd "$OUT" && "$PY" -c "import rca_fast.kernels" >/dev/null 2>&1) && return 0
  local shadow="$OUT/pkg/rca_fast" e
  mkdir -p "$shadow"
  for e in "$REPO"/rca_fast/*; do ln -sfn "$e" "$shadow/$(basename "$e")"; done
  ln -sfn "$REPO/kernels" "$shadow/kernels"
  export PYTHONPATH="$OUT/pkg${PYTHONPATH:+:$PYTHONPATH}"
  echo "[gpu_check] rca_fast.kernels reached through $OUT/pkg (no editable install)" >&2
}

fmt_steps() {
  local total=0 line name est tmo need cmd
  for line in "$@"; do
    IFS='|' read -r name est tmo need cmd <<< "$line"
    total=$((total + est))
    printf "  %-16s ~%4ss (timeout %4ss)%s\n      %s\n" "$name" "$est" "$tmo" \
      "$( [ "$need" != "-" ] && echo ", needs python module $need" )" "$cmd"
  done
  echo "  estimated total: ${total}s (budget ${BUDGET_S}s; estimates, not measurements)"
}

if [ "$DRY" = 1 ]; then
  echo "gpu_check plan (GPU machine), OUT=$OUT:"
  fmt_steps "${GPU_STEPS[@]}"
  echo "gpu_check plan (no GPU: the CPU subset):"
  fmt_steps "${CPU_STEPS[@]}"
  exit 0
fi

summary() {
  OUT="$OUT" BUDGET_S="$BUDGET_S" "$PY" - <<'PYEOF' || echo "(summary.md not written: python failed)" >&2
import glob, json, os
out = os.environ["OUT"]
steps = [l.rstrip("\n").split("\t") for l in open(os.path.join(out, "steps.tsv")) if l.strip()]
rows = []
for path in sorted(glob.glob(os.path.join(out, "results", "*.json"))):
    try:
        rows += [dict(r, _file=os.path.basename(path)) for r in json.load(open(path))]
    except (OSError, ValueError):
        pass
def pick(op, provider=None, **kw):
    return [r for r in rows if r.get("op") == op and (provider is None or r.get("provider", r.get("impl")) == provider)
            and all(str(v) in str(r.get(k, "")) for k, v in kw.items())]
def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)
targets = []
for r in pick("masked_average_pool", "rca_fast", mode="fwd_bwd"):
    f = r.get("frac_copy_bw")
    targets.append((f"MAP fwd+bwd {r.get('shape')} {r.get('dtype')}: >= 70% of copy bandwidth",
                    f"{fmt(f and 100 * f, '.0f')}%", f is not None and f >= 0.70))
for r in pick("bank_nce_loss", "rca_fast", mode="fwd"):
    ok = r.get("frac_roofline") is not None and r["frac_roofline"] >= 0.5 and (r.get("extra_MB") or 0) < 64
    targets.append((f"NCE fwd {r.get('case')} {r.get('dtype')}: <= 2x roofline, < 64 MB extra",
                    f"{fmt(r.get('ms'), '.3f')} ms, {fmt(r.get('frac_roofline'))} of roofline, {fmt(r.get('extra_MB'), '.1f')} MB", ok))
for r in pick("prototype_attention", "rca_fast", mode="fwd_bwd"):
    s = r.get("speedup_vs_sdpa_efficient")
    targets.append((f"attention fwd+bwd {r.get('shape')} {r.get('dtype')}: faster than SDPA mem-efficient",
                    f"{fmt(s)}x", s is not None and s > 1))
for r in pick("ema_update_", "rca_fast"):
    s = r.get("speedup_vs_python_loop")
    targets.append(("EMA update: >= 10x the Python loop", f"{fmt(s, '.1f')}x", s is not None and s >= 10))
for r in pick("kmeans", "rca_fast"):
    if "speedup_vs_sklearn" in r:
        targets.append((f"k-means n_init={r.get('n_init')}: >= 200x scikit-learn", f"{fmt(r['speedup_vs_sklearn'], '.0f')}x",
                        r["speedup_vs_sklearn"] >= 200))
    if "speedup_vs_ref" in r:
        targets.append(("k-means scale row: >= 3x ref", f"{fmt(r['speedup_vs_ref'])}x", r["speedup_vs_ref"] >= 3))
for r in pick("rca_head"):
    if r.get("speedup_vs_public") is not None:
        targets.append((f"RCA head {r.get('impl')} vs the public loops", f"{fmt(r['speedup_vs_public'], '.1f')}x", None))
heads = {}
for r in pick("final_heads"):   # the latest row per implementation of each (case, dtype, device)
    heads.setdefault((r.get("case"), r.get("dtype"), r.get("device")), {})[r.get("impl")] = r
for (case, dtype, _), by_impl in heads.items():
    rs = list(by_impl.values())
    best = min(rs, key=lambda r: r["ms"])
    auto = next((r for r in rs if r.get("impl") == r.get("auto_impl")), None)
    pub = next((r for r in rs if r.get("impl") == "public_loop"), None)
    measured = (f"auto {auto['impl'] if auto else '?'} {fmt(auto and auto['ms'], '.1f')} ms, fastest {best['impl']} "
                f"{fmt(best['ms'], '.1f')} ms, public loop {fmt(pub and pub['ms'], '.1f')} ms")
    targets.append((f"final heads fwd+bwd {case} {dtype} ({best.get('shape')}): impl='auto' within 5% of the fastest",
                    measured, auto is not None and auto["ms"] <= 1.05 * best["ms"]))
for name in ("step_eager", "step_amp", "step_compile"):
    p = os.path.join(out, name, "step.json")
    if os.path.exists(p):
        d = json.load(open(p))
        ms = next((r.get("ms") for r in d.get("split", []) if r.get("kind") == "total"), None)
        targets.append((f"VOC training step {name[5:]} (vgg16, batch 8, 368^2)", f"{fmt(ms, '.1f')} ms" if ms else "see step.json", None))
lines = ["# GPU check summary", "", f"Budget {os.environ['BUDGET_S']} s. Steps (in order):", "",
         "| step | status | seconds | estimate |", "|---|---|---|---|"]
lines += [f"| {s[0]} | {s[1]} | {s[2]} | {s[3]} |" for s in steps]
lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
lines += [f"| {t} | {m} | {'-' if ok is None else ('yes' if ok else 'NO')} |" for t, m, ok in targets]
if not targets:
    lines.append("| (no benchmark rows yet) | - | - |")
lines += ["", "Logs: logs/<step>.log; benchmark rows: results/*.json; tests: *_tests.xml."]
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
PYEOF
}

# The benchmarks append their rows to benchmarks/results/<bench>-<device>.json; the rows this run
# added (past the counts noted at its start) are copied to OUT/results/ after every step.
results_rows() {  # MODE=baseline: note the row counts; MODE=copy: copy the rows added since
  MODE="$1" RESULTS="$REPO/benchmarks/results" OUT="$OUT" "$PY" - <<'PYEOF' || true
import glob, json, os
base_path = os.path.join(os.environ["OUT"], ".baseline.json")
counts = {}
for path in glob.glob(os.path.join(os.environ["RESULTS"], "bench_*.json")):
    try:
        counts[os.path.basename(path)] = json.load(open(path))
    except (OSError, ValueError):
        pass
if os.environ["MODE"] == "baseline":
    json.dump({k: len(v) for k, v in counts.items()}, open(base_path, "w"))
else:
    base = json.load(open(base_path))
    for name, rows in counts.items():
        new = rows[base.get(name, 0):]
        if new:
            json.dump(new, open(os.path.join(os.environ["OUT"], "results", name), "w"), indent=1)
PYEOF
}

results_rows baseline
if [ "$HAS_GPU" = 1 ]; then STEPS=("${GPU_STEPS[@]}"); else STEPS=("${CPU_STEPS[@]}"); fi
export OUT
[ "$HAS_GPU" = 1 ] || ensure_importable
FAILED=0
for line in "${STEPS[@]}"; do
  IFS='|' read -r name est tmo need cmd <<< "$line"
  now=$(date +%s); left=$((BUDGET_S - (now - START)))
  status=""
  if [ "$left" -lt 10 ]; then
    status="skipped: the ${BUDGET_S}s budget is spent"
  elif [ "$need" != "-" ] && ! "$PY" -c "import $need" >/dev/null 2>&1; then
    status="skipped: python module $need is not installed"
  fi
  t0=$(date +%s)
  if [ -z "$status" ]; then
    [ "$tmo" -gt "$left" ] && tmo=$left
    echo "[gpu_check] $name (timeout ${tmo}s) ..." >&2
    (cd "$REPO" && timeout --kill-after=10 "$tmo" bash -c "$cmd") > "$OUT/logs/$name.log" 2>&1
    rc=$?
    case $rc in
      0) status="ok" ;;
      124|137) status="TIMEOUT after ${tmo}s"; FAILED=1 ;;
      *) status="FAILED (exit $rc)"; FAILED=1 ;;
    esac
  fi
  echo "[gpu_check] $name: $status" >&2
  printf "%s\t%s\t%s\t%s\n" "$name" "$status" "$(( $(date +%s) - t0 ))" "$est" >> "$OUT/steps.tsv"
  [ "$name" = build ] && ensure_importable
  results_rows copy
  summary
done
echo "[gpu_check] done in $(( $(date +%s) - START ))s; see $OUT/summary.md" >&2
exit $FAILED
