"""The offline sm_90a compile check, ``python -m rca_fast.profile compile`` (issue 11).

A small subset runs here (the per-row NCE kernel at the size-1 shape, plus a planted config known
to spill); CI runs the whole check.  The ptxas log parsers are checked on literal logs."""
import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from rca_fast.kernels.offline_compile import SM90_SHARED_LIMIT, parse_ptxas, row_problems  # noqa: E402
from rca_fast.profile.compile_mode import ROW_KEYS, parse_nvcc_log  # noqa: E402

PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_nce_lse_kernel' for 'sm_90a'
ptxas info    : Function properties for _nce_lse_kernel
    600 bytes stack frame, 848 bytes spill stores, 980 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 600 bytes cumulative stack size
"""


def test_parse_ptxas_reads_registers_spills_and_stack():
    assert parse_ptxas(PTXAS_LOG) == dict(registers=255, spill_bytes=848 + 980, stack_bytes=600)
    clean = PTXAS_LOG.replace("600 bytes stack frame, 848 bytes spill stores, 980 bytes spill loads",
                              "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")
    assert parse_ptxas(clean)["spill_bytes"] == 0
    with pytest.raises(ValueError, match="registers"):
        parse_ptxas("ptxas fatal: something else")


def test_parse_nvcc_log_one_row_per_kernel():
    log = ("ptxas info    : Compiling entry function '_Z10ema_kernelIfEvPT_' for 'sm_90a'\n"
           "ptxas info    : Function properties for _Z10ema_kernelIfEvPT_\n"
           "    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 380 bytes cmem[0]\n"
           "ptxas info    : Compiling entry function 'assign_kernel' for 'sm_90a'\n"
           "ptxas info    : Used 32 registers, 360 bytes cmem[0]\n")
    rows = parse_nvcc_log(log, "ema.cu")
    assert [(r["registers"], r["spill_bytes"], r["shared_bytes"]) for r in rows] == [(40, 12, 2048),
                                                                                     (32, 0, 0)]
    assert rows[0]["kernel"].startswith("ema.cu:") and rows[1]["kernel"] == "ema.cu:assign_kernel"
    if shutil.which("c++filt"):              # demangled: void ema_kernel<float>(float*)
        assert (rows[0]["kernel"], rows[0]["dtype"]) == ("ema.cu:ema_kernel", "fp32")


def test_row_problems_flags_spills_shared_memory_and_failures():
    row = dict(kernel="k", config="c", dtype="fp32", shared_bytes=1024, registers=128, spill_bytes=0,
               launchable=True, error=None)
    assert row_problems(row) is None
    assert "spills" in row_problems(dict(row, spill_bytes=4))
    assert "shared memory" in row_problems(dict(row, shared_bytes=SM90_SHARED_LIMIT + 1))
    assert row_problems(dict(row, shared_bytes=SM90_SHARED_LIMIT)) is None
    assert row_problems(dict(row, error="PTXASError: ...")) == "compile failed"
    assert row_problems(dict(row, spill_bytes=4, launchable=False)) is None   # never launched


def test_headroom_rule_flags_fixed_rule_configs_over_240_registers():
    """A fixed-rule config (what runs by default) may need at most 240 registers under the Triton it
    is compiled with, so another ptxas (Triton 3.6's) has room before it spills; an autotune
    candidate may use up to the 255 the launch allows."""
    row = dict(kernel="k", config="c", dtype="fp32", shared_bytes=1024, registers=240, spill_bytes=0,
               launchable=True, fixed=True, error=None)
    assert row_problems(row) is None
    assert "241 registers" in row_problems(dict(row, registers=241))
    assert row_problems(dict(row, registers=255, fixed=False)) is None


def test_every_plans_fixed_config_is_marked_fixed_in_the_jobs():
    """The headroom rule needs to know which compiled rows are the fixed rule's: each captured plan's
    fixed config is a job marked ``fixed``, its other candidates are not (unless another plan fixes them)."""
    from rca_fast.kernels import compile_specs, launch_rule
    from rca_fast.kernels.offline_compile import _resolve
    from rca_fast.profile.compile_mode import _shape
    plans = compile_specs.capture(_shape("voc"), "mix", 132)
    jobs = compile_specs.plan_jobs(plans, "mix")
    fixed = {launch_rule.spec_key(_resolve(j.fn), j.args, j.kwargs) for j in jobs if j.fixed}
    want = {launch_rule.plan_key(p, p.fixed) for p in plans}
    assert fixed == want
    assert any(not j.fixed for j in jobs)                 # the autotune candidates


def test_compile_subset_writes_the_json_and_fails_on_a_planted_spill(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "rca_fast.profile", "compile", "--out", str(tmp_path),
           "--kernels", "nce_row", "--shapes", "one", "--dtypes", "fp32", "bf16", "--jobs", "2",
           "--progress", "off", "--plant-spill"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "compile.json").read_text())
    assert doc["rows"] and all(tuple(sorted(r)) == tuple(sorted(ROW_KEYS)) for r in doc["rows"])
    by_kernel = {}
    for r in doc["rows"]:
        by_kernel.setdefault(r["kernel"], []).append(r)
    # the per-row kernel reads fp32 buffers whatever the query's dtype: one dtype, with and without mixup
    assert {r["dtype"] for r in by_kernel["nce_row"]} == {"fp32"}
    assert {"HAS_MIX0" in r["config"] for r in by_kernel["nce_row"]} == {True, False}
    for r in by_kernel["nce_row"]:          # the real kernel: compiled, no spills, a few registers
        assert r["launchable"] and r["spill_bytes"] == 0 and 0 < r["registers"] <= 255
        assert 0 <= r["shared_bytes"] <= SM90_SHARED_LIMIT
    (planted,) = by_kernel["nce_lse"]
    assert planted["config"].startswith("PLANTED") and planted["spill_bytes"] > 0
    # the planted row, and only it, is the reason for the non-zero exit
    assert [p["config"] for p in doc["problems"]] == [planted["config"]]
    assert "FAIL nce_lse PLANTED" in proc.stderr
