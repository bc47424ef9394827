"""The launchers' host-side guards at their exact boundaries (issues 18 item 4, 23), on fake CUDA
tensors (``FakeTensorMode``: nothing is allocated, no GPU) with the plans captured, not launched:
CUDA's 65,535-program limit of grid axes y and z (MAP puts images and pixel blocks there) and the
int32 offsets of the NCE and MAP kernels (2**31 - 1 elements pass, 2**31 raise)."""
import pytest
import torch

pytest.importorskip("triton")
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from rca_fast.kernels import launch_rule  # noqa: E402
from rca_fast.kernels.map import backward as map_bwd, forward as map_fwd  # noqa: E402


def _cuda(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="cuda")


def _captured(fn, sms=132):
    """Run ``fn`` on fake CUDA tensors with launches captured; the captured plans."""
    with FakeTensorMode(), launch_rule.capturing(sms) as plans:
        fn()
    return list(plans)


def _map_fwd(B, L, D, H, W, labels=True):
    feats, cams = _cuda(B, D, H, W), _cuda(B, L, H, W)
    return map_fwd._launch_fwd(feats, cams, _cuda(B, L, dtype=torch.bool) if labels else None)


def _map_bwd(B, L, D, H, W, labels=True):
    emb, count, mean = _cuda(B, L, D), _cuda(B, L, dtype=torch.int64), _cuda(B, L, dtype=torch.float64)
    return map_bwd._launch_bwd(emb, _cuda(B, L, H, W), _cuda(B, L, dtype=torch.bool) if labels else None,
                               mean, count, False)


# ---------------------------------------------------------------------------------- grid axes
def test_map_forward_images_on_grid_axis_y_up_to_65535():
    (plan,) = _captured(lambda: _map_fwd(65535, 3, 5, 1, 1))
    assert plan.grid(dict(plan.constexprs, **plan.fixed.kwargs))[1] == 65535
    with pytest.raises(ValueError, match=r"map_fwd: .*65536 programs on CUDA grid axis y \(B: images"):
        _captured(lambda: _map_fwd(65536, 3, 5, 1, 1))


def test_map_backward_pixel_blocks_and_images_within_the_grid_limits():
    # the backward's fixed BLOCK_HW is 128 (and no candidate is narrower): 65,535 blocks of 128 pixels
    (plan,) = _captured(lambda: _map_bwd(1, 2, 3, 1, 65535 * 128))
    assert max(plan.grid(dict(plan.constexprs, **c.kwargs))[1] for c in plan.configs()) == 65535
    with pytest.raises(ValueError, match=r"map_bwd: .*65536 programs on CUDA grid axis y \(H\*W blocks"):
        _captured(lambda: _map_bwd(1, 2, 3, 1, 65535 * 128 + 1))
    _captured(lambda: _map_bwd(65535, 2, 3, 1, 1))
    with pytest.raises(ValueError, match=r"map_bwd: .*65536 programs on CUDA grid axis z \(B: images"):
        _captured(lambda: _map_bwd(65536, 2, 3, 1, 1))


# ------------------------------------------------------------------------------ int32 offsets
def _nce_fwd(N, L, S, D, q_strides=None, bank_strides=None):
    from rca_fast.kernels.nce import forward as nce_fwd
    q = torch.empty_strided((N, D), q_strides or (D, 1), device="cuda")
    bank = torch.empty_strided((L, S, D), bank_strides or (0, 0, 1), device="cuda")   # an expanded bank
    return nce_fwd.forward(q, bank, _cuda(N, dtype=torch.int64), None, None, 0.07)


def _nce_bwd(N, L, S, D, bank_dtype=torch.float32):
    from rca_fast.kernels.nce import backward as nce_bwd
    q, stats = _cuda(N, D), _cuda(N, 4)
    bank = torch.empty_strided((L, S, D), (0, 0, 1), dtype=bank_dtype, device="cuda")
    return nce_bwd.backward(_cuda(N), q, bank, _cuda(N, dtype=torch.int64), None, None, stats, 0.07)


def _raises_naming(extent_name, fn, sms=132):
    with pytest.raises(ValueError, match=r"int32 offsets, but " + extent_name + r" = 2147483648 elements"):
        _captured(fn, sms)


def test_nce_forward_int32_guards_at_the_boundary():
    big = 2 ** 31
    # N * S positive similarities (N = 1: 2**31 - 1 slots of an expanded bank)
    _captured(lambda: _nce_fwd(1, 1, big - 1, 1))
    _raises_naming(r"N \* S \(positive similarities\)", lambda: _nce_fwd(2, 1, big // 2, 1))
    # N * L * chunks logsumexp parts (one chunk per class once N * L fills the SMs)
    (lse, _) = _captured(lambda: _nce_fwd(1, big - 1, 1, 1))
    assert lse.args[11] == 1 and lse.args[12] == big - 1        # n_chunks, n_units
    _raises_naming(r"N \* L \* chunks \(logsumexp parts\)", lambda: _nce_fwd(2 ** 16, 2 ** 15, 1, 1))
    # the query's extent (its row stride) and one class of the bank's (its slot stride)
    _captured(lambda: _nce_fwd(2, 1, 1, 1, q_strides=(big - 1, 1)))
    _raises_naming("the query's extent", lambda: _nce_fwd(2, 1, 1, 1, q_strides=(big, 1)))
    _captured(lambda: _nce_fwd(2, 1, 2, 1, bank_strides=(0, big - 1, 1)))
    _raises_naming("one class of the bank's extent", lambda: _nce_fwd(2, 1, 2, 1, bank_strides=(0, big, 1)))


def test_nce_backward_int32_guards_count_the_split_partials():
    """The backward's fp32 partial gradients are splits x N x D: with N = 16, D = 128 (one column
    block) and a bank cut into one chunk per split, splits = 2 x SMs, so 4096 x SMs elements; 2**31 at
    2**19 SMs must raise although N x D is only 2048."""
    big = 2 ** 31
    plans = _captured(lambda: _nce_bwd(16, 1, 128 * (2 ** 20 - 2), 128, torch.bfloat16), sms=2 ** 19 - 1)
    (plan,) = plans
    assert plan.grid({})[0] * 16 * 128 == big - 4096              # splits * N * D, just below
    _raises_naming(r"splits \* N \* D \(partial gradients\)",
                   lambda: _nce_bwd(16, 1, 128 * 2 ** 20, 128, torch.bfloat16), sms=2 ** 19)
    _captured(lambda: _nce_bwd(2 ** 29 - 1, 1, 1, 1))             # N * 4 row statistics = 2**31 - 4
    _raises_naming(r"N \* 4 \(row statistics\)", lambda: _nce_bwd(2 ** 29, 1, 1, 1))


def _map_strided(B, L, D, HW, f_strides, c_strides):
    feats = torch.empty_strided((B, D, 1, HW), f_strides, device="cuda")
    cams = torch.empty_strided((B, L, 1, HW), c_strides, device="cuda")
    return map_fwd._launch_fwd(feats, cams, None)


def test_map_int32_guards_at_the_boundary():
    big = 2 ** 31
    # features: (D - 1) * stride_d + (HW - 1) * stride_hw inside one image
    _captured(lambda: _map_strided(1, 1, 2, 1, (big, big - 1, 1, 1), (1, 1, 1, 1)))
    with pytest.raises(ValueError, match=r"one image of features spans 2147483648 elements"):
        _captured(lambda: _map_strided(1, 1, 2, 1, (big + 1, big, 1, 1), (1, 1, 1, 1)))
    _captured(lambda: _map_strided(1, 2, 1, 1, (1, 1, 1, 1), (big, big - 1, 1, 1)))
    with pytest.raises(ValueError, match=r"one image of cams spans 2147483648 elements"):
        _captured(lambda: _map_strided(1, 2, 1, 1, (1, 1, 1, 1), (big + 1, big, 1, 1)))
    # the backward's gradient (contiguous, allocated by it): D * HW - 1
    _captured(lambda: _map_bwd(1, 1, 2 ** 30, 1, 2))
    with pytest.raises(ValueError, match=r"one image of features spans 2147483648 elements"):
        _captured(lambda: _map_bwd(1, 1, 715827883, 1, 3))      # 3 * 715827883 = 2**31 + 1


# ------------------------------------------------------------------------- MAP slots and tiles
# classes per pass over the features (SLOTS), by L, with and without labels: with labels few classes
# are present (4 take VOC/COCO in one pass), without every class is (8 bound the accumulator); never
# more than L rounded up to a power of two
EXPECTED_SLOTS = {1: (1, 1), 3: (4, 4), 4: (4, 4), 5: (4, 8), 8: (4, 8), 20: (4, 8), 80: (4, 8)}


@pytest.mark.parametrize("L", sorted(EXPECTED_SLOTS))
@pytest.mark.parametrize("labels", [True, False])
def test_map_slots_and_tile_bounds(L, labels):
    fwd, = _captured(lambda: _map_fwd(2, L, 512, 46, 46, labels))
    bwd, = _captured(lambda: _map_bwd(2, L, 512, 46, 46, labels))
    want = EXPECTED_SLOTS[L][0 if labels else 1]
    for plan in (fwd, bwd):
        assert plan.constexprs["SLOTS"] == want, (plan.name, plan.constexprs)
        assert plan.constexprs["LP"] >= L and plan.constexprs["LP"] & (plan.constexprs["LP"] - 1) == 0
    for cfg in fwd.configs():
        k = cfg.kwargs
        # the [SLOTS, BLOCK_D, BLOCK_HW] fp32 accumulator: <= 64 registers a thread; <= 16 CAM loads in flight
        assert want * k["BLOCK_D"] * k["BLOCK_HW"] // (32 * cfg.num_warps) <= 64, k
        assert want * k["UNROLL"] <= 16, k
        assert k["MEAN_HW"] * want <= 1024 * cfg.num_warps, k
    for cfg in bwd.configs():
        # with 8 classes a pass the [16, 256] output tile spilled (sm_90a): at most 16 x 128 then
        assert cfg.kwargs["BLOCK_D"] * cfg.kwargs["BLOCK_HW"] <= (4096 if want <= 4 else 2048), cfg.kwargs
