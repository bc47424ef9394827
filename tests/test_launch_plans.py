"""The offline compile check compiles what the runtime launches (issue 18 item 2).

The launchers are called here on fake CUDA tensors (``FakeTensorMode``: nothing is allocated, no
GPU) inside ``launch_rule.capturing(sms)``, with this file's own enumeration of what a run can
launch: every shape class the compile check names, every (query, bank) dtype pair the MemoryBank
accepts, MAP under bf16 / fp16 autocast, mixup on and off, training (forward + backward) and eval
(forward), with and without MAP labels, fp32 attention with IEEE and TF32 dots, at 132, 114 and 16
SMs.  Every captured plan x config it may launch (fixed rule and autotune candidates) must be among
the compile check's jobs (``compile_specs.jobs``): compared by compile identity
(``launch_rule.spec_key``), nothing is compiled here.
"""
import pytest
import torch

pytest.importorskip("triton")
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from rca_fast.kernels import compile_specs, launch_rule  # noqa: E402
from rca_fast.kernels.attention import backward as attn_bwd, forward as attn  # noqa: E402
from rca_fast.kernels.map import backward as map_bwd, forward as map_fwd  # noqa: E402
from rca_fast.kernels.nce import backward as nce_bwd, forward as nce_fwd  # noqa: E402
from rca_fast.kernels.offline_compile import _resolve  # noqa: E402
from rca_fast.profile.compile_mode import SHAPE_NAMES, _shape  # noqa: E402

BANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)     # MemoryBank's non-fp64 dtypes
SMS = (132, 114, 16)


def _cuda(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="cuda")


def runtime_launches(s, train):
    """Launch the three ops' kernels as a run at shape ``s`` does (inside capturing + fake mode)."""
    N, B, L, S, D, H, W, K = s["Np"], s["B"], s["L"], s["S"], s["D"], s["H"], s["W"], s["K"]
    for q_dt in BANK_DTYPES:
        for b_dt in BANK_DTYPES:
            q, bank, t = _cuda(N, D, dtype=q_dt), _cuda(L, S, D, dtype=b_dt), _cuda(N, dtype=torch.int64)
            for mix in (True, False):
                mt, w = (_cuda(N, dtype=torch.int64), _cuda(N)) if mix else (None, None)
                _, stats = nce_fwd.forward(q, bank, t, mt, w, 0.07)
                if train:
                    nce_bwd.backward(_cuda(N), q, bank, t, mt, w, stats, 0.07)
    # MAP: one dtype, or autocast features with the fp32 CAM probabilities of region_contrast
    for f_dt, c_dt in [(d, d) for d in BANK_DTYPES] + [(torch.bfloat16, torch.float32),
                                                         (torch.float16, torch.float32)]:
        feats, cams = _cuda(B, D, H, W, dtype=f_dt), _cuda(B, L, H, W, dtype=c_dt)
        for labels in (_cuda(B, L, dtype=torch.bool), None):
            emb, count, mean = map_fwd._launch_fwd(feats, cams, labels)
            if train:
                map_bwd._launch_bwd(torch.empty_like(emb), cams, labels, mean, count, False)
    for dt in BANK_DTYPES:
        for tf32 in (False, True):
            with compile_specs.allow_tf32(tf32):
                q, k, v = _cuda(B * H * W, D, dtype=dt), _cuda(L * K, D, dtype=dt), _cuda(L * K, D, dtype=dt)
                out, lse = attn.attention_forward(q, k, v, 0.125)
                if train:
                    attn_bwd.attention_backward(torch.empty_like(out), q, k, v, out, lse, 0.125)


@pytest.fixture(scope="module")
def compiled_keys():
    keys = set()
    for name in SHAPE_NAMES:
        for mode in compile_specs.MODES:
            for j in compile_specs.jobs(_shape(name), mode):
                keys.add(launch_rule.spec_key(_resolve(j.fn), j.args, j.kwargs))
    return keys


@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
def test_every_runtime_launch_is_compiled_by_the_compile_check(shape_name, compiled_keys):
    s = _shape(shape_name)
    missing, seen = [], 0
    for sms in SMS:
        for train in (True, False):
            with FakeTensorMode(), launch_rule.capturing(sms) as plans:
                runtime_launches(s, train)
            for plan in plans:
                for cfg in plan.configs():
                    seen += 1
                    if launch_rule.plan_key(plan, cfg) not in compiled_keys:
                        missing.append(f"{plan.name} {plan.dtypes} {cfg} {plan.constexprs} at {sms} SMs")
    assert seen > 100
    assert not missing, f"{len(missing)} launches not compiled by the compile check, e.g.:\n" + "\n".join(
        sorted(set(missing))[:8])


def test_capture_launches_nothing_and_allocates_nothing():
    """Plans are recorded, not run; a fake tensor of 2**33 elements costs nothing."""
    with FakeTensorMode(), launch_rule.capturing(132) as plans:
        huge = _cuda(2 ** 21, 4096, dtype=torch.bfloat16)
        attn.attention_forward(
            huge, _cuda(200, 4096, dtype=torch.bfloat16), _cuda(200, 4096, dtype=torch.bfloat16), 0.1
        )
    assert [p.name for p in plans] == ["attn_fwd"]
    assert plans[0].fixed is plans[0].configs()[0]


def test_plan_key_separates_what_triton_specialises():
    """Two launches differing only in a specialised integer (divisible by 16 or not) are two
    compiles; in a do_not_specialize one (N of the NCE) they are one."""
    s = _shape("voc")
    keys = {}
    for N in (16, 17, 32):
        with FakeTensorMode(), launch_rule.capturing(132) as plans:
            q, bank = _cuda(N, s["D"]), _cuda(s["L"], s["S"], s["D"])
            nce_fwd.forward(q, bank, _cuda(N, dtype=torch.int64), None, None, 0.07)
        keys[N] = launch_rule.plan_key(plans[0], plans[0].fixed)
    assert keys[17] != keys[16]            # BLOCK_N 16 vs 32: another binary
    assert keys[17] == keys[32]            # BLOCK_N 32 both; N itself is not specialised on
    for D in (64, 60):
        with FakeTensorMode(), launch_rule.capturing(132) as plans:
            q, bank = _cuda(16, D), _cuda(s["L"], s["S"], D)
            nce_fwd.forward(q, bank, _cuda(16, dtype=torch.int64), None, None, 0.07)
        keys[f"D{D}"] = launch_rule.plan_key(plans[0], plans[0].fixed)
    assert keys["D64"] != keys["D60"]      # D (a stride too) is specialised: divisible by 16 or not
