"""The throughput profiler ``python -m rca_fast.profile`` (op mode and step mode), on the CPU.

The byte and FLOP counts of every row are checked against the work computed here from tensors of
the profiled shapes (their ``nbytes``) and loops over the regions, slots and iterations -- not
against rca_fast.profile.counts.  Timings are only checked to be positive and consistent with the
other columns: performance targets live in benchmarks/.
"""
import json
import math
import os

import pytest
import torch
from PIL import Image

from rca_fast.ops import available_backends
from rca_fast.profile import main

CPU = torch.device("cpu")
# few timed calls and small ceiling probes: the test checks the machinery, not the numbers
QUICK = ["--budget-ms", "5", "--min-reps", "2", "--max-reps", "3", "--warmup", "1",
         "--ceiling-copy-mb", "4", "--ceiling-matmul-n", "96", "--progress", "off"]
SHAPES = [dict(B=2, L=3, S=7, D=60, H=7, W=13, K=2, present=2),
          dict(B=3, L=1, S=5, D=33, H=5, W=3, K=3, present=2)]
OPS = [("masked_average_pool", "fwd"), ("masked_average_pool", "bwd"), ("bank_nce_loss", "fwd"),
       ("bank_nce_loss", "bwd"), ("prototype_attention", "fwd"), ("prototype_attention", "bwd"),
       ("ema_update_", "fwd"), ("kmeans", "fwd")]


def shape_id(s):
    return f"B{s['B']}-L{s['L']}-S{s['S']}-D{s['D']}-HW{s['H']}x{s['W']}-K{s['K']}-present{s['present']}"


def spec(s):
    return f"{s['B']},{s['L']},{s['S']},{s['D']},{s['H']}x{s['W']},{s['K']},{s['present']}"


def nbytes(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype).nbytes


def expected_work(s, dtype, kmeans_iters):
    """(bytes, flops) per (op, direction), from tensors of the shapes and loops over the work."""
    B, L, S, D, H, W, K = (s[k] for k in "BLSDHWK")
    regions = [(b, c) for b in range(B) for c in range(min(s["present"], L))]   # present pairs
    N, P = len(regions), L * K
    i64, f32, boolean = torch.int64, torch.float32, torch.bool
    out = {}
    map_flops = sum(2 * H * W * D for _ in regions)          # masked sum of each region
    # only the present pairs' CAM rows are read (an absent class's mask is never built)
    cam_rows = sum(nbytes(H, W, dtype=dtype) for _ in regions)
    out["masked_average_pool", "fwd"] = (
        nbytes(B, D, H, W, dtype=dtype) + cam_rows + nbytes(B, L, dtype=boolean)
        + nbytes(B, L, D, dtype=dtype) + nbytes(B, L, dtype=i64), map_flops)
    out["masked_average_pool", "bwd"] = (
        nbytes(B, L, D, dtype=dtype) + cam_rows + nbytes(B, L, dtype=boolean)
        + nbytes(B, D, H, W, dtype=dtype), map_flops)
    sims = sum(2 * D for _ in regions for _ in range(L * S))  # every region against every slot
    nce_in = (nbytes(N, D, dtype=dtype) + nbytes(L, S, D, dtype=dtype) + 2 * nbytes(N, dtype=i64)
              + nbytes(N, dtype=f32))
    out["bank_nce_loss", "fwd"] = (nce_in + nbytes(1, dtype=f32), sims)
    # backward: the minimum work -- no saved scores read, no scores recomputed
    out["bank_nce_loss", "bwd"] = (nce_in + nbytes(1, dtype=f32) + nbytes(N, D, dtype=dtype), sims)
    q, kv = nbytes(B, H * W, D, dtype=dtype), nbytes(P, D, dtype=dtype)
    pairs = B * H * W * P
    out["prototype_attention", "fwd"] = (q + 2 * kv + q, pairs * (2 * D + 2 * D))
    # grad of value, of the scores, of query and of key: 4 products of 2*D per (pixel, prototype)
    out["prototype_attention", "bwd"] = ((q + 2 * kv + q) + (q + 2 * kv), pairs * (2 * 2 * D + 2 * 2 * D))
    out["ema_update_", "fwd"] = (nbytes(N, D, dtype=dtype) + nbytes(N, dtype=i64)
                                 + 2 * nbytes(N, D, dtype=dtype) + 2 * nbytes(L, dtype=i64),
                                 sum(3 * D for _ in range(N)))
    flops = 0
    for _ in range(L):
        flops += 2 * S * D                                    # distances to the first centre
        for _ in range(1, K):
            flops += (2 + int(math.log(K))) * 2 * S * D       # greedy k-means++ candidates
        for _ in range(kmeans_iters):
            flops += 2 * S * K * D                            # Lloyd: every point to every centre
    out["kmeans", "fwd"] = (nbytes(L, S, D, dtype=dtype) + nbytes(L, K, D, dtype=dtype)
                            + nbytes(L, S, dtype=i64) + nbytes(L, dtype=f32), flops)
    return out


def cpu_backends(op, wanted):
    return [b for b in wanted if b in available_backends(op, CPU)]


def check_png(path):
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 200 and img.size[1] > 200


@pytest.mark.parametrize("shape,dtype", [(SHAPES[0], "fp32"), (SHAPES[1], "fp32"), (SHAPES[0], "bf16")],
                         ids=[f"{shape_id(SHAPES[0])}-fp32", f"{shape_id(SHAPES[1])}-fp32",
                              f"{shape_id(SHAPES[0])}-bf16"])
def test_ops_rows_match_work_formulas(tmp_path, gen, shape, dtype):
    seed = int(torch.randint(1 << 30, (1,), generator=gen))
    iters = int(torch.randint(1, 4, (1,), generator=gen))
    doc = main(["ops", "--shapes", spec(shape), "--dtype", dtype, "--backends", "torch,cuda",
                "--kmeans-iters", str(iters), "--seed", str(seed), "--out", str(tmp_path), *QUICK])
    with open(tmp_path / "profile.json") as f:
        saved = json.load(f)
    assert saved["rows"] == json.loads(json.dumps(doc["rows"]))
    for key in ("device", "torch", "triton", "git_commit"):
        assert saved[key], key
    assert saved["torch"] == torch.__version__
    want = expected_work(shape, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype], iters)
    expected_rows = sorted((op, d, b) for op, d in OPS for b in cpu_backends(op, ["torch", "cuda"]))
    got_rows = sorted((r["op"], r["direction"], r["backend"]) for r in saved["rows"])
    assert got_rows == expected_rows
    c = saved["ceilings"]
    assert c["copy_GBps"] > 0 and c["fp32_TFLOPs"] > 0
    rate = c["bf16_TFLOPs"] if dtype == "bf16" else c["fp32_TFLOPs"]
    for r in saved["rows"]:
        where = f"{r['op']}.{r['direction']} [{r['backend']}]"
        assert r["ms"] > 0 and r["min_ms"] > 0 and r["first_ms"] > 0 and r["reps"] >= 2, where
        assert r["min_ms"] <= r["p20_ms"] <= r["ms"] <= r["p80_ms"], where
        assert (r["bytes"], r["flops"]) == want[r["op"], r["direction"]], where
        assert r["GBps"] == pytest.approx(r["bytes"] / r["ms"] / 1e6, rel=1e-9), where
        assert r["TFLOPs"] == pytest.approx(r["flops"] / r["ms"] / 1e9, rel=1e-9), where
        memory_ms, compute_ms = r["bytes"] / c["copy_GBps"] / 1e6, r["flops"] / rate / 1e9
        assert r["roofline_ms"] == pytest.approx(max(memory_ms, compute_ms), rel=1e-9), where
        assert r["bound"] == ("memory" if memory_ms >= compute_ms else "compute"), where
        assert r["roofline_frac"] == pytest.approx(r["roofline_ms"] / r["ms"], rel=1e-9), where
        # x torch from the saved timings (the torch row compared with itself proved nothing)
        torch_ms = next(t["ms"] for t in saved["rows"]
                        if (t["op"], t["direction"], t["backend"]) == (r["op"], r["direction"], "torch"))
        assert r["speedup_vs_torch"] == pytest.approx(torch_ms / r["ms"], rel=1e-9), where
    check_png(tmp_path / "roofline.png")


def test_ops_default_backends_include_compile(tmp_path, gen):
    """Without --backends: every available backend but Triton (on the CPU), plus torch.compile."""
    shape = dict(B=2, L=3, S=5, D=12, H=3, W=5, K=2, present=1)
    doc = main(["ops", "--shapes", spec(shape), "--ops", "ema", "--out", str(tmp_path),
                "--seed", str(int(torch.randint(1 << 30, (1,), generator=gen))), *QUICK])
    want = [b for b in available_backends("ema_update_", CPU) if b != "triton"] + ["compile"]
    assert sorted(r["backend"] for r in doc["rows"]) == sorted(want)
    assert not doc["failed"]
    compiled = next(r for r in doc["rows"] if r["backend"] == "compile")
    assert compiled["ms"] > 0 and compiled["rel_err_vs_torch"] < 1e-6
    check_png(tmp_path / "roofline.png")


def broken_ema_update_(*args, **kwargs):
    raise RuntimeError("boom: a broken backend")


def supports_everything(op, device, dtypes):
    return None


def test_ops_broken_backend_is_reported_and_others_still_run(tmp_path, monkeypatch, capsys):
    from rca_fast.ops import _dispatch
    monkeypatch.setitem(_dispatch.PROVIDERS, "ema_update_",
                        {"torch": _dispatch.PROVIDERS["ema_update_"]["torch"],
                         "cuda": f"{__name__}:broken_ema_update_"})
    monkeypatch.setitem(_dispatch.CAPABILITIES, "cuda", f"{__name__}:supports_everything")
    doc = main(["ops", "--shapes", "2,3,5,12,3x5,2,1", "--ops", "ema_update_", "--backends", "torch,cuda",
                "--out", str(tmp_path), *QUICK])
    assert [r["backend"] for r in doc["rows"]] == ["torch"]
    assert [(f["op"], f["backend"]) for f in doc["failed"]] == [("ema_update_", "cuda")]
    assert "boom" in doc["failed"][0]["error"]
    assert "FAILED" in capsys.readouterr().out


def test_help_explains_every_column(tmp_path, capsys):
    main(["ops", "--shapes", "1,2,3,8,4x5,1,1", "--ops", "kmeans,ema_update_", "--backends", "torch",
          "--out", str(tmp_path), "--no-plot", *QUICK])
    printed = capsys.readouterr().out.splitlines()
    header = next(line for line in printed if line.startswith("shape"))
    columns = header.split()
    assert len(columns) >= 15
    with pytest.raises(SystemExit) as exit_info:
        main(["ops", "--help"])
    assert exit_info.value.code == 0
    helptext = capsys.readouterr().out
    explained = {line.split()[0] for line in helptext.splitlines() if line.startswith("  ") and line.split()}
    assert set(columns) <= explained, set(columns) - explained
    with pytest.raises(SystemExit):
        main(["step", "--help"])
    step_help = capsys.readouterr().out
    for column in ("part", "ms", "share"):
        assert any(line.split()[:1] == [column] for line in step_help.splitlines() if line.startswith("  "))


@pytest.mark.parametrize("text", ["voc,", "1,2,3", "0,2,3,4,5", "2,3,4,8,5x5,6", "vocc", "2,3,4,8,5x"])
def test_bad_shapes_are_rejected(tmp_path, text):
    with pytest.raises(ValueError, match="--shapes"):
        main(["ops", "--shapes", text, "--out", str(tmp_path), *QUICK])


def test_bad_backend_is_rejected(tmp_path):
    with pytest.raises(SystemExit, match="--backends"):
        main(["ops", "--backends", "torch,magic", "--out", str(tmp_path), *QUICK])


def test_step_attribution_charges_backward_to_the_forward_part():
    """A conv 'backbone' and a linear 'coarse_head': the convolution's backward is charged to the
    backbone, the matmul's backward to the CAM heads, the forward ops to their own parts."""
    from torch.profiler import ProfilerActivity, profile

    from rca_fast.profile.step_mode import Labels, split_events

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Conv2d(3, 8, 3)
            self.coarse_head = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.coarse_head(self.backbone(x).mean(dim=(2, 3)))

        def update_bank(self, out):
            return 0

        def refresh_prototypes(self, seed=0):
            return None

    model = Tiny()
    labels = Labels(model)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(torch.randn(2, 3, 9, 9)).square().sum().backward()
    finally:
        labels.remove()
    assert "update_bank" not in model.__dict__ and not model._forward_hooks
    _, by_op = split_events(prof.events(), on_gpu=False)
    assert any("convolution" in name for name in by_op["backbone fwd"])
    assert any("convolution_backward" in name for name in by_op["backbone bwd"])
    assert not any("convolution" in name for name in by_op.get("CAM heads bwd", {}))
    assert any(name in ("aten::addmm", "aten::linear") for name in by_op["CAM heads fwd"])
    assert any(name in ("aten::mm", "AddmmBackward0") for name in by_op["CAM heads bwd"])
    assert "aten::square" in by_op["loss and other fwd"] or "aten::pow" in by_op["loss and other fwd"]


def test_step_mode_runs_and_splits_the_step(tmp_path):
    doc = main(["step", "--steps", "2", "--warmup-steps", "1", "--out", str(tmp_path), "--progress", "off",
                "--num-images", "8", "--batch_size", "4", "--input_size", "32", "--crop_size", "32",
                "--bank-slots", "12", "--prototypes", "2", "--num_classes", "3",
                "--aggregation", "softmax"])  # the attention op (the public linear form is a plain matmul)
    with open(tmp_path / "step.json") as f:
        saved = json.load(f)
    parts = {r["part"]: r for r in saved["split"] if r["kind"] == "part"}
    total = next(r for r in saved["split"] if r["kind"] == "total")
    assert all(r["ms"] >= 0 for r in parts.values())
    # The remainder part makes the parts sum to the total by construction; what can be checked:
    # the measured parts fit in the step (the remainder was not clamped at 0), and the total
    # minus the amortised k-means is the mean 'rca::step' range of the trace, read here.
    kmeans = next(r for r in parts.values() if r["part"].startswith("k-means refresh"))
    rest = [r for r in parts.values() if not r["part"].startswith(("untracked", "idle", "k-means"))]
    wall = total["ms"] - kmeans["ms"]
    assert sum(r["ms"] for r in rest) <= wall * (1 + 1e-6)
    with open(tmp_path / "trace.json") as f:
        trace = json.load(f)
    steps = [e["dur"] / 1e3 for e in trace["traceEvents"] if e.get("name") == "rca::step" and "dur" in e]
    assert len(steps) == 2 and wall == pytest.approx(sum(steps) / 2, rel=0.05), (steps, wall)
    for part in ("backbone fwd", "backbone bwd", "CAM heads fwd", "CAM heads bwd", "RCA head: MAP fwd",
                 "RCA head: NCE fwd", "RCA head: NCE bwd", "RCA head: attention fwd", "optimiser"):
        assert parts[part]["ms"] > 0, part
    assert saved["device"] and saved["git_commit"] and saved["steps"] == 2
    # the public head ships inside the package (rca_fast.ref.public_head): always compared
    assert saved["public"]["public_ms"] > 0 and saved["public"]["rca_fast_ms"] > 0
    assert saved["public"]["step_with_public_ms"] == pytest.approx(
        total["ms"] - saved["public"]["rca_fast_ms"] + saved["public"]["public_ms"])
    with open(tmp_path / "trace.json") as f:
        trace = json.load(f)
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"rca::step", "rca::op::bank_nce_loss", "rca::module::backbone"} <= names
    check_png(tmp_path / "step.png")
    assert [r["part"] for r in doc["split"]] == [r["part"] for r in saved["split"]]


def test_cpu_rows_stay_under_their_ceilings(tmp_path, gen):
    """The ceilings bound every row: with a square ceiling product far smaller than the ops' own
    (8 x 8), a roofline from the square alone would put the attention and NCE rows far above
    100%; the ops' products are probed too, so no row is faster than its roofline by more than
    timing noise (fastest call against the fastest probe call, 25%), and a row that is gets
    flagged.  k-means runs 1 iteration: its count assumes every iteration runs."""
    shape = dict(B=2, L=3, S=37, D=48, H=11, W=13, K=4, present=2)
    doc = main(["ops", "--shapes", spec(shape), "--backends", "torch,cuda", "--kmeans-iters", "1",
                "--seed", str(int(torch.randint(1 << 30, (1,), generator=gen))), "--out", str(tmp_path),
                "--no-plot", "--budget-ms", "20", "--min-reps", "5", "--max-reps", "50", "--warmup", "2",
                "--ceiling-copy-mb", "4", "--ceiling-matmul-n", "8", "--progress", "off"])
    assert len(doc["rows"]) >= 8 and not doc["failed"]
    probed = {tuple(p["gemm"]) for p in doc["ceiling_probes"] if p["key"] == "fp32_TFLOPs"}
    assert (1, 2 * 11 * 13, 48, 3 * 4) in probed        # attention's scores: (B*HW, D) @ (D, L*K)
    for r in doc["rows"]:
        where = (f"{r['op']}.{r['direction']} [{r['backend']}]: {r['ms']:.4g} ms, "
                 f"roof {r['roofline_ms']:.4g} ms")
        assert r["above_ceiling"] == (r["roofline_ms"] > r["ms"]), where
        assert r["roofline_ms"] <= 1.25 * r["min_ms"], where


def test_rows_above_their_ceiling_are_flagged_not_printed_as_results():
    from rca_fast.profile import ops_mode
    base = dict(shape="s", short="nce", direction="fwd", backend="torch", p20_ms=0.9, p80_ms=1.1,
                bytes=1000, flops=2000, GBps=1.0, TFLOPs=1.0, intensity=2.0, bound="compute")
    doc = {"device": "cpu", "dtype": "fp32", "skipped": [], "failed": [],
           "ceilings": {"copy_GBps": 1.0, "fp32_TFLOPs": 1.0},
           "rows": [dict(base, ms=1.0, roofline_ms=2.5, roofline_frac=2.5, above_ceiling=True),
                    dict(base, short="map", ms=1.0, roofline_ms=0.5, roofline_frac=0.5, above_ceiling=False)]}
    text = ops_mode.table(doc)
    nce = next(line for line in text.splitlines() if " nce " in line)
    assert "250" not in nce and ops_mode.ABOVE in nce
    assert "50.0" in next(line for line in text.splitlines() if " map " in line)
    assert ops_mode.ABOVE_NOTE in text


def test_cpu_profile_prints_no_torch_log_screens(tmp_path):
    """A fresh CPU profile with torch.compile: no 'No CUDA runtime is found, using CUDA_HOME=...'
    (CUDA_HOME set, as on a machine with a toolkit and no GPU) and no dynamo graph-break screens;
    what torch logged comes back as one 'note:' line at most per warning."""
    import subprocess
    import sys
    env = dict(os.environ, CUDA_HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    proc = subprocess.run(
        [sys.executable, "-m", "rca_fast.profile", "ops", "--shapes", "2,3,5,12,3x5,2,2", "--ops", "map",
         "--backends", "torch,compile", "--device", "cpu", "--out", str(tmp_path / "out"), "--no-plot",
         "--no-check", *QUICK], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "No CUDA runtime" not in output, output
    assert "_dynamo" not in output and "Graph break from" not in output.replace("(Graph break from",
                                                                                ""), output
    rows = [line for line in proc.stdout.splitlines() if line.startswith("B2-L3")]
    assert len(rows) == 4, output                    # map fwd/bwd x torch/compile: the table is there
    notes = [line for line in output.splitlines() if line.startswith("note:")]
    assert len(notes) <= 2 and all(len(n) < 300 for n in notes), output
    others = [line for line in output.splitlines() if line.strip() and line not in rows and line not in notes
              and not line.startswith(("device:", "shape", "---", "wrote"))]
    assert not others, output
