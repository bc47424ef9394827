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

