"""rca_loss: weights and the contrast start epoch against a hand computation in float64."""
import math

import pytest
import torch

from rca_fast.model import RCAOutput, rca_loss


def mlsm(logits, labels):
    """Multilabel soft margin by hand: mean over images of the mean over classes of
    -(y log sigmoid(x) + (1 - y) log sigmoid(-x))."""
    B, L = labels.shape
    logits = logits.detach()
    total = 0.0
    for b in range(B):
        row = 0.0
        for l in range(L):
            x, y = float(logits[b, l]), float(labels[b, l])
            row += -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 / (1 + math.exp(x))))
        total += row / L
    return total / B


def make_output(B, L, gen, contrast=True):
    logits = torch.randn(B, L, generator=gen, dtype=torch.float64, requires_grad=True)
    coarse = torch.randn(B, L, generator=gen, dtype=torch.float64, requires_grad=True)
    c = (torch.rand((), generator=gen, dtype=torch.float64) * 5).requires_grad_() if contrast else None
    return RCAOutput(logits, torch.zeros(B, L, 1, 1), coarse, torch.zeros(B, L, 1, 1), contrast_loss=c)


@pytest.mark.parametrize("B,L", [(2, 3), (5, 80)], ids=["B2-L3", "B5-L80"])
@pytest.mark.parametrize("epoch,coarse_w,contrast_w,start", [
    (1, 0.4, 0.01, 2), (2, 0.4, 0.01, 2), (7, 0.4, 0.01, 2), (2, 0.25, 0.3, 3), (3, 0.0, 1.0, 3),
], ids=["epoch1", "epoch2", "epoch7", "epoch2-w0.25-0.3-start3", "epoch3-w0-1-start3"])
def test_rca_loss_against_hand_computation(B, L, epoch, coarse_w, contrast_w, start, gen):
    out = make_output(B, L, gen)
    labels = (torch.rand(B, L, generator=gen) < 0.3).double()
    total, parts = rca_loss(out, labels, epoch, coarse_weight=coarse_w, contrast_weight=contrast_w,
                            contrast_start_epoch=start)
    cls, coarse = mlsm(out.logits, labels), mlsm(out.coarse_logits, labels)
    contrast = float(out.contrast_loss.detach())
    want = cls + coarse_w * coarse + (contrast_w * contrast if epoch >= start else 0.0)
    assert math.isclose(float(total.detach()), want, rel_tol=1e-10)
    assert parts == pytest.approx({"loss": want, "cls": cls, "coarse_cls": coarse, "contrast": contrast},
                                  rel=1e-10)
    total.backward()
    # the contrast term gets its weight as gradient only once it is switched on
    assert float(out.contrast_loss.grad or 0.0) == (contrast_w if epoch >= start else 0.0)


def test_rca_loss_without_contrast(gen):
    out = make_output(3, 4, gen, contrast=False)
    labels = torch.ones(3, 4, dtype=torch.bool)
    total, parts = rca_loss(out, labels, 5)
    want = mlsm(out.logits, labels) + 0.4 * mlsm(out.coarse_logits, labels)
    assert math.isclose(float(total.detach()), want, rel_tol=1e-10) and parts["contrast"] == 0.0


def test_rca_loss_bad_inputs(gen):
    out = make_output(2, 3, gen)
    with pytest.raises(ValueError,
                       match=r"labels must have the shape \(B, L\) = \(2, 3\) of out.logits, got \(2, 4\)"):
        rca_loss(out, torch.zeros(2, 4), 1)
    with pytest.raises(TypeError, match="epoch must be an int"):
        rca_loss(out, torch.zeros(2, 3), 1.5)
    with pytest.raises(TypeError, match="out must be an RCAOutput"):
        rca_loss({"logits": None}, torch.zeros(2, 3), 1)
    with pytest.raises(ValueError, match="coarse_weight must be >= 0"):
        rca_loss(out, torch.zeros(2, 3), 1, coarse_weight=-1.0)
