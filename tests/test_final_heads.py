"""PerClassCAMHead's implementations (the final CAM heads, issue 18 item 5): every one computes the
public code's function -- L separate branches of dense convs -- from the same parameters.

Oracle: the per-class dense-conv loop written here in float64 (branch l: its own first conv D -> W
on the input, two 3x3 convs W -> W, a 1x1 conv W -> 1), on the head's weights sliced per class.
"""
import pytest
import torch
import torch.nn.functional as F

from rca_fast.model import RCAModel
from rca_fast.model.heads import FINAL_HEAD_AUTO, FINAL_HEAD_IMPLS, PerClassCAMHead, resolve_final_head_impl

pytestmark = pytest.mark.filterwarnings("ignore:rca_fast. the compiled extension:RuntimeWarning")

# names and shapes of today's parameters (what existing checkpoints hold), for L, D, W
PARAMS = {"body.0.weight": lambda L, D, W: (L * W, D, 3, 3), "body.0.bias": lambda L, D, W: (L * W,),
          "body.2.weight": lambda L, D, W: (L * W, W, 3, 3), "body.2.bias": lambda L, D, W: (L * W,),
          "body.4.weight": lambda L, D, W: (L * W, W, 3, 3), "body.4.bias": lambda L, D, W: (L * W,),
          "classifier.weight": lambda L, D, W: (L, W, 1, 1), "classifier.bias": lambda L, D, W: (L,)}


def per_class_loop(x, params, L, W):
    """The public code's final head in float64: for each class l an independent branch
    conv3x3(D -> W) + ReLU, 2 x (conv3x3(W -> W) + ReLU), conv1x1(W -> 1); maps concatenated.
    ``params``: name -> float64 tensor (today's names); x (B, D, h, w) float64 -> (B, L, h, w)."""
    maps = []
    for l in range(L):
        sl = slice(l * W, (l + 1) * W)
        y = x
        for i in (0, 2, 4):
            y = F.relu(F.conv2d(y, params[f"body.{i}.weight"][sl], params[f"body.{i}.bias"][sl], padding=1))
        maps.append(F.conv2d(y, params["classifier.weight"][l:l + 1], params["classifier.bias"][l:l + 1]))
    return torch.cat(maps, dim=1)


def randomise_(head, gen):
    """Weights of a size that keeps activations O(1) and many ReLUs active, biases too."""
    with torch.no_grad():
        for p in head.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 4
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / fan_in ** 0.5)


@pytest.mark.parametrize("impl", FINAL_HEAD_IMPLS + ("auto",))
@pytest.mark.parametrize("L,D,W,B,h,w", [(3, 7, 5, 2, 5, 9), (1, 6, 3, 1, 4, 3)],
                         ids=["L3-D7-W5-B2-HW5x9", "L1-D6-W3-B1-HW4x3"])
def test_each_impl_equals_the_per_class_loop(impl, L, D, W, B, h, w, gen):
    """Forward and every gradient (input, each parameter) of the float32 head against the
    float64 per-class loop on the same weights."""
    head = PerClassCAMHead(D, W, L, impl=impl)
    randomise_(head, gen)
    x = torch.randn(B, D, h, w, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(B, L, h, w, generator=gen, dtype=torch.float64)

    params = {n: p.detach().double().requires_grad_(True) for n, p in head.named_parameters()}
    xr = x.clone().requires_grad_(True)
    want = per_class_loop(xr, params, L, W)
    want.backward(grad_out)

    xf = x.float().requires_grad_(True)
    got = head(xf)
    got.backward(grad_out.float())
    assert got.shape == (B, L, h, w) and got.is_contiguous()   # NCHW whatever ran
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xf.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    for name, p in head.named_parameters():
        torch.testing.assert_close(p.grad.double(), params[name].grad, rtol=1e-5, atol=1e-5, msg=name)


def test_parameters_and_state_dict_do_not_depend_on_the_impl(gen):
    """Every impl holds today's parameter names and shapes; a state dict saved under one loads into
    another and gives the same maps (existing checkpoints load whichever implementation runs)."""
    L, D, W = 2, 5, 3
    heads = {impl: PerClassCAMHead(D, W, L, impl=impl) for impl in FINAL_HEAD_IMPLS}
    for head in heads.values():
        assert {n: tuple(t.shape) for n, t in head.state_dict().items()} == \
            {n: f(L, D, W) for n, f in PARAMS.items()}
    source = heads["grouped"]
    randomise_(source, gen)
    x = torch.randn(2, D, 6, 5, generator=gen)
    want = source(x)
    for impl, head in heads.items():
        head.load_state_dict(source.state_dict())
        torch.testing.assert_close(head(x), want, rtol=1e-5, atol=1e-6, msg=impl)


def test_auto_follows_the_device_rule_and_bad_impls_are_named():
    assert resolve_final_head_impl("auto", torch.device("cpu")) == FINAL_HEAD_AUTO["cpu"]
    assert resolve_final_head_impl("auto", torch.device("cuda")) == FINAL_HEAD_AUTO["cuda"]
    assert set(FINAL_HEAD_AUTO.values()) <= set(FINAL_HEAD_IMPLS)
    assert resolve_final_head_impl("loop", torch.device("cpu")) == "loop"
    with pytest.raises(ValueError, match="impl must be 'auto' or one of .*'grouped'.*got 'dense'"):
        PerClassCAMHead(4, 2, 3, impl="dense")
    head = PerClassCAMHead(4, 2, 3)
    assert head.impl == "auto"
    with pytest.raises(ValueError, match="got None"):
        head.impl = None
    model = RCAModel(3, backbone="tiny", bank_slots=4, prototypes=2, final_head_impl="loop_channels_last")
    assert model.final_head.impl == "loop_channels_last"
    with pytest.raises(ValueError, match="got 'fast'"):
        RCAModel(3, backbone="tiny", bank_slots=4, prototypes=2, final_head_impl="fast")
