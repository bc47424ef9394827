"""benchmarks/gpu_check.sh --dry-run: the one-shot GPU check's plan (issue 11), checked without a GPU."""
import os
import re
import shutil
import subprocess

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.sh")
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _plans(text):
    """{plan title: [(step, estimate s, timeout s)]} and the printed totals, from the dry run."""
    plans, totals, current = {}, [], None
    for line in text.splitlines():
        if line.startswith("gpu_check plan"):
            current = plans.setdefault(line, [])
        m = re.match(r"\s+(\S+)\s+~\s*(\d+)s \(timeout\s+(\d+)s\)", line)
        if m:
            current.append((m.group(1), int(m.group(2)), int(m.group(3))))
        m = re.search(r"estimated total: (\d+)s \(budget (\d+)s", line)
        if m:
            totals.append((int(m.group(1)), int(m.group(2))))
    return plans, totals


def test_dry_run_lists_the_steps_in_priority_order_within_seven_minutes(tmp_path):
    out = tmp_path / "gpu_out"
    proc = subprocess.run(["bash", SCRIPT, str(out), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not out.exists()                       # a dry run runs and writes nothing
    plans, totals = _plans(proc.stdout)
    gpu = next(v for k, v in plans.items() if "GPU machine" in k)
    cpu = next(v for k, v in plans.items() if "CPU subset" in k)
    names = [s[0] for s in gpu]
    # the priority order: build, GPU tests, the headline rows, the step, profile ops
    order = ["build", "gpu_tests", "bench_map", "bench_nce", "bench_attention", "bench_ema", "bench_kmeans",
             "bench_rca_head", "step_eager", "step_amp", "step_compile", "profile_ops"]
    assert [n for n in names if n in order] == order
    assert sum(s[1] for s in gpu) == totals[0][0] <= totals[0][1] <= 420
    assert all(0 < est <= timeout for _, est, timeout in gpu + cpu)
    assert "--shapes voc" in proc.stdout and "--build-only" in proc.stdout
    assert "gpu_tests" not in [s[0] for s in cpu] and cpu


def test_bad_arguments_exit_with_usage(tmp_path):
    for args in ([], ["--bogus", str(tmp_path)], [str(tmp_path), str(tmp_path / "b")]):
        proc = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "usage" in proc.stderr
