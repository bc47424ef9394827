"""The determinism rule of the Triton kernels (kernels/launch_rule.py): a launch's config is a pure
function of shapes and dtypes (the same in every process), autotuning only under
RCA_FAST_AUTOTUNE=1, and the offline compile check covers every config the rule can pick.

No GPU needed: the rule's functions are called directly, as the GPU launchers call them."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
from rca_fast.kernels import compile_specs, launch_rule  # noqa: E402
from rca_fast.kernels.attention import backward as attention_bwd, forward as attention  # noqa: E402
from rca_fast.kernels.map import forward as kmap, tiles as kmap_tiles  # noqa: E402
from rca_fast.kernels.nce import backward as nce_bwd, forward as nce  # noqa: E402
from rca_fast.kernels.nce.tiles import dot_mode  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Prints every config the fixed rule picks for a grid of shapes and dtypes, as JSON.
RULE_SCRIPT = r"""
import json, torch
from rca_fast.kernels.attention import backward as attention_bwd, forward as attention
from rca_fast.kernels.map import backward as kmap_bwd, forward as kmap
from rca_fast.kernels.nce import backward as nce_bwd, forward as nce
from rca_fast.kernels.nce.tiles import dot_mode
dts = [torch.float32, torch.bfloat16, torch.float16]
out = {}
for q in dts:
    for m in dts:
        out[f"nce_fwd {q} {m}"] = nce.lse_launch_config(dot_mode(q, m))
    out[f"nce_bwd {q}"] = nce_bwd.bwd_launch_config(q)
    for N in (1, 17, 33, 512):
        out[f"nce_bwd_blocks {q} {N}"] = nce_bwd.bwd_blocks(N, 512, q, False)
        out[f"nce_block_n {N}"] = nce.fwd_block_n(N, False)
    for P, D in ((1, 1), (37, 60), (200, 512), (800, 512)):
        out[f"attn {q} {P} {D}"] = attention.fwd_launch_blocks(q, P, D, D)
        out[f"attn_bwd {q} {P} {D}"] = attention_bwd.bwd_launch_blocks(q, P, D, D)
for slots in (1, 4, 8):
    c = kmap._fwd_configs(slots, False)[0]
    out[f"map_fwd {slots}"] = [c.kwargs, c.num_warps]
for slots in (1, 4, 8):
    c = kmap_bwd._bwd_configs(False, slots)[0]
    out[f"map_bwd {slots}"] = [c.kwargs, c.num_warps]
print(json.dumps(out, sort_keys=True, default=str))
"""


def _rule_in_subprocess():
    env = dict(os.environ)
    env.pop("RCA_FAST_AUTOTUNE", None)
    env["PYTHONHASHSEED"] = "random"       # set and dict orders differ between the two processes
    proc = subprocess.run([sys.executable, "-c", RULE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_same_config_for_the_same_shapes_in_two_processes():
    first, second = _rule_in_subprocess(), _rule_in_subprocess()
    assert first == second
    # and the same as in this process (the launchers call exactly these functions)
    for q_name, q in DTYPES.items():
        assert first[f"nce_bwd {q}"] == json.loads(json.dumps(nce_bwd.bwd_launch_config(q)))
        assert first[f"attn {q} 200 512"] == json.loads(json.dumps(attention.fwd_launch_blocks(q, 200, 512,
                                                                                               512)))


def test_autotune_only_on_request(monkeypatch):
    monkeypatch.delenv(launch_rule.AUTOTUNE_ENV, raising=False)
    assert not launch_rule.autotune_requested()
    for value in ("0", "", "no"):
        monkeypatch.setenv(launch_rule.AUTOTUNE_ENV, value)
        assert not launch_rule.autotune_requested()
    for value in ("1", "true", "ON"):
        monkeypatch.setenv(launch_rule.AUTOTUNE_ENV, value)
        assert launch_rule.autotune_requested()


@pytest.mark.parametrize("mode", ["fp32", "bf16", "fp16", "mix", "amp"])
@pytest.mark.parametrize("shape_name", ["voc", "one"])
def test_compile_check_covers_every_config_the_rule_picks(mode, shape_name):
    """The configs the launchers pick by default are among the compile check's launchable jobs."""
    from rca_fast.profile.compile_mode import _shape
    shape = _shape(shape_name)
    jobs = compile_specs.jobs(shape, mode)
    launched = {(j.kernel, tuple(sorted((k, v) for k, v in j.kwargs.items() if k.startswith("BLOCK")
                                        or k in ("num_warps", "num_stages", "maxnreg", "UNROLL", "MEAN_HW"))))
                for j in jobs if j.launchable}
    q, m = {"mix": (torch.float32, torch.bfloat16), "amp": (torch.bfloat16, torch.float32)}.get(mode) \
        or (DTYPES[mode], DTYPES[mode])
    N, D, P = shape["Np"], shape["D"], shape["L"] * shape["K"]

    def has(kernel, cfg):
        want = tuple(sorted(cfg.items()))
        return (kernel, want) in launched
    fwd = dict(nce.lse_launch_config(dot_mode(q, m)), BLOCK_N=nce.fwd_block_n(N, False))
    assert has("nce_lse", fwd)
    block_n, block_dv = nce_bwd.bwd_blocks(N, D, m, False)
    assert has("nce_bwd", dict(nce_bwd.bwd_launch_config(m), BLOCK_N=block_n, BLOCK_DV=block_dv))
    if mode not in ("mix", "amp"):
        assert has("attn_fwd", attention.fwd_launch_blocks(q, P, D, D))
        assert has("attn_bwd_scores", attention_bwd.bwd_launch_blocks(q, P, D, D)["scores"])
    if mode != "mix":
        for has_labels in (True, False):
            slots = kmap_tiles.slots_per_pass(True, has_labels, shape["L"])
            c = kmap._fwd_configs(slots, False)[0]
            assert has(
                "map_fwd", dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=c.maxnreg)
            )


def test_no_launchable_config_list_holds_the_spilling_tiles():
    """The tiles that spilled on sm_90a with an fp32 operand (issue 11) are gone from the lists an
    fp32 launch can use: 128-wide NCE tiles and the 16-bit attention configs."""
    for family in ("f32x3", "split"):
        for cfg in nce.LSE_CONFIGS[family]:
            assert cfg.kwargs["BLOCK_S"] <= 64 and cfg.kwargs["BLOCK_D"] <= 64
    for cfg in nce_bwd.BWD_CONFIGS["f32x3"]:
        assert cfg.kwargs["BLOCK_D"] <= 32
    assert nce_bwd.BWD_BLOCK_DV["f32x3"] <= 64
    assert attention.precision_family(torch.float32) == "fp32"
    assert attention.precision_family(torch.bfloat16) == "16bit"


def test_nce_offsets_guarded_before_int32_wraps(monkeypatch, gen):
    """The NCE kernels index with int32 offsets: the launchers check every extent first (forward
    and backward) and raise a ValueError naming it at 2**31 elements."""
    from rca_fast.kernels.nce import tiles as nce_tile
    with pytest.raises(ValueError, match=r"N \* S .* = 2147483648 elements reaches 2\*\*31"):
        nce_tile.check_int32_offsets("bank_nce_loss", **{"N * S (positive similarities)": 2 ** 31})
    nce_tile.check_int32_offsets("bank_nce_loss", **{"N * S": 2 ** 31 - 1})
    seen = []

    def record(op, **extents):
        seen.append((op, extents))
    monkeypatch.setattr(nce, "check_int32_offsets", record)
    monkeypatch.setattr(nce_bwd, "check_int32_offsets", record)
    N, L, S, D = 5, 3, 7, 9
    query = torch.randn(N, D, generator=gen, dtype=torch.float64).float().requires_grad_(True)
    bank = torch.randn(L, S, D, generator=gen, dtype=torch.float64).float()
    target = torch.tensor([0, 1, 2, 1, 0])
    loss, stats = nce.forward(query.detach(), bank, target, None, None, 0.07)
    nce_bwd.backward(torch.ones(N), query.detach(), bank, target, None, None, stats, 0.07)
    (fwd_op, fwd), (bwd_op, bwd) = seen
    assert fwd_op == "bank_nce_loss" and bwd_op.startswith("bank_nce_loss")
    assert fwd["N * S (positive similarities)"] == N * S
    assert fwd["N * L * chunks (logsumexp parts)"] % (N * L) == 0
    assert fwd["the query's extent"] == (N - 1) * D + D - 1
    assert fwd["one class of the bank's extent"] == (S - 1) * D + D - 1
    assert bwd["splits * N * D (partial gradients)"] % (N * D) == 0
    # the backward reads the (N, 4) statistics at rows * 4 (int32): with S and L * chunks below 4
    # the forward's N * S and N * L * chunks bound nothing there
    assert bwd["N * 4 (row statistics)"] == 4 * N


def test_compile_check_compiles_the_dtype_pairs_the_trainer_launches():
    """Under --amp the trainer's forward runs in bf16 autocast: the NCE gets a bf16 query against the
    default fp32 bank, and MAP bf16 features with fp32 CAM probabilities (region_contrast takes them
    in fp32).  Those launches load other dtypes than any single-dtype mode (and the NCE takes the
    tf32x3 scheme): the compile check must compile them, not only the same configs in fp32."""
    from rca_fast.profile.compile_mode import _shape
    F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
    compiled = {}
    for mode in compile_specs.MODES:
        for j in compile_specs.jobs(_shape("voc"), mode):
            if j.launchable:
                compiled.setdefault(j.kernel, set()).add((j.args[0], j.args[1]))
    # (query, bank) of the NCE: one dtype, the fp32-query/bf16-bank mix, and --amp with an fp32 bank
    for pair in ((F32, F32), (BF16, BF16), (F16, F16), (F32, BF16), (BF16, F32)):
        for kernel in ("nce_lse", "nce_bwd"):
            assert pair in compiled[kernel], f"{kernel} is never compiled with (query, bank) = {pair}"
    # MAP: (features, cams) forward, (grad of the embeddings: the features' dtype, cams) backward
    for pair in ((F32, F32), (BF16, BF16), (F16, F16), (BF16, F32)):
        for kernel in ("map_fwd", "map_bwd"):
            assert pair in compiled[kernel], f"{kernel} is never compiled with (features, cams) = {pair}"


def test_compile_check_compiles_the_tf32_attention_an_fp32_launch_can_take(monkeypatch):
    """fp32 attention switches its dots to tf32 when torch allows TF32 matmuls
    (torch.backends.cuda.matmul.allow_tf32, or torch.set_float32_matmul_precision("high")): other
    instructions and registers than the IEEE dots, so the compile check must compile them too."""
    from rca_fast.kernels.attention import tiles as attention_tile
    from rca_fast.profile.compile_mode import _shape
    # not monkeypatch.setattr: allow_tf32 is a property of torch's cuBLAS module object, and
    # monkeypatch's undo may try to delete it (an AttributeError at teardown in a fresh venv)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with launch_rule.capturing(132):                               # compiled, as on a GPU
            picked = attention_tile.kernel_meta(torch.float32, torch.device("cuda"))["PRECISION"]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert picked == "tf32"
    jobs = compile_specs.jobs(_shape("voc"), "fp32")
    for kernel in ("attn_fwd", "attn_bwd_scores", "attn_bwd_grads"):
        precisions = {j.kwargs["PRECISION"] for j in jobs if j.kernel == kernel and j.launchable}
        assert precisions == {"ieee", "tf32"}, (kernel, precisions)
