"""GradCAM++ and RISE (written here, not in Captum) against hand-computed references on tiny cases."""
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from EsegetaLib.methods.cam import gradcam_pp_map
from EsegetaLib.methods.rise import make_masks, rise_saliency
from method_helpers import make_context, run_method

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_gradcam_pp_formula_by_hand():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(1, 3, 2, 2, 2))
    G = rng.normal(size=(1, 3, 2, 2, 2))
    expected = np.zeros((2, 2, 2))
    for k in range(3):
        s = A[0, k].sum()
        w = 0.0
        for i, j, l in itertools.product(range(2), repeat=3):
            g = G[0, k, i, j, l]
            den = 2 * g ** 2 + s * g ** 3
            alpha = g ** 2 / den if den != 0 else 0.0
            w += alpha * max(g, 0.0)
        expected += w * A[0, k]
    expected = np.maximum(expected, 0.0)
    ours = gradcam_pp_map(torch.tensor(A), torch.tensor(G))[0, 0].numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12)


class TinyCamNet(nn.Module):
    """conv (stride 2) -> 'feat' -> 1x1 conv to 2 classes -> upsample: the class-1 score is linear in
    the layer's activation A, so dScore/dA is known in closed form (the 1x1 weights times the
    upsampled mask)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.feat = nn.Conv3d(1, 3, 2, stride=2)
        self.head = nn.Conv3d(3, 2, 1, bias=False)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x):
        return self.up(self.head(self.feat(x)))


def test_gradcam_pp_method_on_tiny_network():
    net = TinyCamNet().eval()
    x = torch.randn(1, 1, 4, 4, 4)
    spec, ctx = make_context("GradCAM++", net, x, {"layer": "feat"})
    ours = run_method(spec, ctx)[0]
    with torch.no_grad():
        A = net.feat(x)  # (1, 3, 2, 2, 2)
    w = ctx.forward_args[0]  # (1, 1, 4, 4, 4) region weights
    # d score / d A[k, v] = head_weight[1, k] * (number of region voxels that v's 2x2x2 block covers)
    block_sum = torch.nn.functional.avg_pool3d(w, 2) * 8
    G = net.head.weight[1, :, 0, 0, 0].view(1, 3, 1, 1, 1) * block_sum
    expected_low = gradcam_pp_map(A, G)
    expected = torch.nn.functional.interpolate(expected_low, size=(4, 4, 4), mode="trilinear", align_corners=False)
    torch.testing.assert_close(ours, expected.detach(), rtol=1e-5, atol=1e-6)


class LinearScore(nn.Module):
    def __init__(self, weights):
        super().__init__()
        self.weights = weights

    def forward(self, x, scale):
        return (x * self.weights).flatten(1).sum(1) * scale.flatten(1)[:, 0]


def test_rise_sum_by_hand():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 3, 3, 3)
    b = torch.full_like(x, -1.0)
    weights = torch.randn(1, 2, 3, 3, 3)
    masks = (torch.rand(5, 1, 3, 3, 3) > 0.5).float() * 0.75 + 0.125
    scale = torch.tensor([[2.0]])
    forward = LinearScore(weights)
    ours = rise_saliency(forward, x, b, masks, p_keep=0.4, forward_args=(scale,), batch=2)
    expected = np.zeros((3, 3, 3))
    for i in range(5):
        m = masks[i, 0].numpy()
        pert = x[0].numpy() * m + b[0].numpy() * (1 - m)
        score = float((pert * weights[0].numpy()).sum()) * 2.0
        expected += score * m
    expected /= 5 * 0.4
    np.testing.assert_allclose(ours.sum(dim=1)[0].numpy(), expected, rtol=1e-5)
    assert torch.allclose(ours[:, 0], ours[:, 1])  # shared equally over channels


def test_rise_masks():
    masks = make_masks(400, (16, 12, 10), (4, 3, 2), 0.3, torch.Generator().manual_seed(0))
    assert masks.shape == (400, 1, 16, 12, 10)
    assert float(masks.min()) >= 0 and float(masks.max()) <= 1
    assert float(masks.mean()) == pytest.approx(0.3, abs=0.03)
    # smooth: neighbouring voxels differ far less than an independent binary draw would
    assert float((masks[..., 1:] - masks[..., :-1]).abs().mean()) < 0.2


def test_rise_method_finds_the_only_relevant_block():
    """F(x) = sum of x over one 2^3 corner block, zero baseline: the RISE map is highest on that
    block and near its expected floor (F's mean, 8 p) far from it."""
    x = torch.ones(1, 1, 8, 8, 8)
    weights = torch.zeros(1, 1, 8, 8, 8)
    weights[..., :2, :2, :2] = 1.0
    spec, ctx = make_context("RISE", nn.Identity(), x, {"n_masks": 800, "cell_fraction": 0.25, "p_keep": 0.5,
                                                        "baseline": "zero", "restrict_to_region": False})

    class BlockSum(nn.Module):
        def forward(self, inp, *args):
            return (inp * weights).flatten(1).sum(1)

    ctx.forward = BlockSum()
    sal = run_method(spec, ctx)[0][0, 0]
    inside, far = float(sal[:2, :2, :2].mean()), float(sal[5:, 5:, 5:].mean())
    print(f"RISE on a one-block score: inside {inside:.2f}, far {far:.2f}")
    assert inside > 1.3 * far
    assert far == pytest.approx(8 * 0.5, rel=0.25)
