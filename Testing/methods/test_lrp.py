"""LRP on a BatchNorm/ReLU 3D UNet with concatenation skips: conservation of the epsilon rule, equal to
zennit (float64) for the epsilon, gamma, alpha-beta and composite rules, the patched run equal to the
sum of zennit's per-window maps, and the relevance accounting (biases) on a network with biases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from EsegetaLib.engine import ExplainSession
from EsegetaLib.options import EngineOptions, Target
from lrp_nets import BatchNormUNet, make_batchnorm_unet, zennit_lrp
from method_helpers import structured_volume

OPTIONS = EngineOptions(device="cpu", precision="fp32", divisor=4)
RULE_PARAMS = {"epsilon": {}, "gamma": {"gamma": 0.25}, "alpha_beta": {"alpha": 2.0, "beta": 1.0}, "composite": {}}


def _lrp(net, x, rule, options=OPTIONS, **params):
    session = ExplainSession(x[0].numpy(), net, Target(class_index=1, region="whole"), options)
    return session, session.attribute("LRP", {"rule": rule, "epsilon": 1e-9, **params})


def _top(shape):
    top = torch.zeros(shape, dtype=torch.float64)
    top[:, 1] = 1.0
    return top


def test_epsilon_conserves_relevance_on_a_bias_free_unet():
    net = make_batchnorm_unet(bias=False)
    x = structured_volume(16).double()
    _, result = _lrp(net, x, "epsilon")
    with torch.no_grad():
        explained = float(net(x)[:, 1].sum())
    check = {c.name: c for c in result.checks}["conservation"]
    relative = abs(result.attribution.sum() - explained) / result.diagnostics["lrp_output_abs"]
    print(f"\nLRP-epsilon (1e-9) on the bias-free BatchNorm/ReLU UNet: relevance {result.attribution.sum():.6f} vs "
          f"score {explained:.6f}: {relative:.2e} not conserved")
    assert relative <= 0.01 and check.status == "pass" and check.value == pytest.approx(relative, abs=1e-12)
    assert abs(result.diagnostics["lrp_absorbed_bias"]) < 1e-9 * abs(explained)
    assert result.attribution.min() < 0 < result.attribution.max()


def test_biases_absorb_relevance_and_the_check_says_so():
    """With biases LRP-epsilon does not conserve the score: the relevance the biases keep is counted
    (input relevance + bias share + stabiliser share = score), and the check warns."""
    net = make_batchnorm_unet(bias=True)
    x = structured_volume(16).double()
    _, result = _lrp(net, x, "epsilon")
    d = result.diagnostics
    with torch.no_grad():
        explained = float(net(x)[:, 1].sum())
    assert d["lrp_explained"] == pytest.approx(explained, rel=1e-12)
    accounted = result.attribution.sum() + d["lrp_absorbed_bias"] + d["lrp_absorbed_rule"] + d["lrp_absorbed_norm"]
    assert accounted == pytest.approx(explained, rel=1e-9)
    check = {c.name: c for c in result.checks}["conservation"]
    print(f"\nLRP-epsilon on the UNet with biases: {check.detail}")
    assert check.value > 0.01 and check.status == "warn" and "absorbed by biases" in check.detail


@pytest.mark.parametrize("rule", list(RULE_PARAMS))
@pytest.mark.parametrize("bias", [False, True], ids=["bias_free", "biases"])
def test_equals_zennit(rule, bias):
    net = make_batchnorm_unet(bias=bias)
    x = structured_volume(16).double()
    _, result = _lrp(net, x, rule, **RULE_PARAMS[rule])
    reference = zennit_lrp(net, x, _top((1, 2, 16, 16, 16)), rule, epsilon=1e-9, **RULE_PARAMS[rule])[0].numpy()
    scale = np.abs(reference).max()
    difference = np.abs(result.attribution - reference).max() / scale
    print(f"\nLRP {rule} ({'biases' if bias else 'bias-free'}) vs zennit: max |difference| / max |R| = {difference:.2e}")
    assert scale > 0 and difference < 1e-9


def test_patched_run_equals_the_sum_of_window_references():
    """Several overlapping windows: the engine's map equals the sum over windows of zennit's relevance
    with each window's blending weights as the top-level weights (the patched model's LRP)."""
    net = make_batchnorm_unet(bias=True)
    x = structured_volume(24).double()
    options = EngineOptions(device="cpu", precision="fp32", divisor=4, patch_size=16, overlap=0.5)
    session, result = _lrp(net, x, "gamma", options=options, gamma=0.25)
    assert len(session.windows) > 1
    total = torch.zeros((1, 24, 24, 24), dtype=torch.float64)
    for i, w in enumerate(session.windows):
        top = torch.zeros((1, 2) + tuple(session.grid.patch), dtype=torch.float64)
        top[:, 1] = session.window_weights([i])[0, 0]
        total[(slice(None),) + w] += zennit_lrp(net, x[(slice(None), slice(None)) + w], top, "gamma", epsilon=1e-9)[0]
    scale = float(total.abs().max())
    difference = float(np.abs(result.attribution - total.numpy()).max()) / scale
    print(f"\nLRP gamma over {len(session.windows)} windows vs the sum of zennit's window maps: {difference:.2e}")
    assert difference < 1e-9


def test_the_models_intensity_normalisation_passes_relevance_voxel_by_voxel():
    """A model loaded with its intensity normalisation (models.base.NormalizedNetwork): the map is the
    relevance of the normalised image the network reads, voxel by voxel (the offset keeps none), so the
    bias-free network still conserves the score."""
    from EsegetaLib.models.base import IntensityNormalization, NormalizedNetwork

    net = make_batchnorm_unet(bias=False)
    x = structured_volume(16).double()
    wrapped = NormalizedNetwork(IntensityNormalization([0.75], [1.5]), net).double()  # exact in float32
    _, result = _lrp(wrapped, x, "epsilon")
    _, bare = _lrp(net, (x - 0.75) * 1.5, "epsilon")
    np.testing.assert_allclose(result.attribution, bare.attribution, rtol=1e-9,
                               atol=1e-12 * np.abs(bare.attribution).max())
    assert {c.name: c for c in result.checks}["conservation"].value < 1e-6  # the stabiliser 1e-9 keeps ~1e-8


class _DeepSupervisionUNet(BatchNormUNet):
    """An auxiliary head on the decoder called after the main head (deep supervision in training),
    whose output the engine does not explain: composite's epsilon belongs on `head`, not on it."""

    def __init__(self):
        super().__init__(bias=True)
        self.aux = torch.nn.Conv3d(8, 2, 1)

    def forward(self, x):
        d2, d1 = self.decoder(x)
        out = self.head(d1)
        self.aux(d2)  # computed last, not part of the explained output
        return out


def test_composite_puts_epsilon_on_the_layer_producing_the_logits():
    torch.manual_seed(0)
    net = _DeepSupervisionUNet().eval().double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_var.uniform_(0.5, 1.5)
    x = structured_volume(16).double()
    _, result = _lrp(net, x, "composite")
    reference = zennit_lrp(net, x, _top((1, 2, 16, 16, 16)), "composite", epsilon=1e-9)[0].numpy()
    assert np.abs(result.attribution - reference).max() < 1e-9 * np.abs(reference).max()


class _Preprocessed(torch.nn.Module):
    """Preprocessing inside the forward (as nnU-Net's and bundles' pipelines do): axes permuted, a crop,
    a z-score with fixed constants and a clip, then the network, the output padded back."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, x):
        y = x.permute(0, 1, 4, 3, 2)[:, :, 2:14, 2:14, 2:14]
        y = torch.clamp((y - 0.4) / 0.7, -3.0, 3.0)
        out = self.network(y).permute(0, 1, 4, 3, 2)
        return torch.nn.functional.pad(out, (2, 2, 2, 2, 2, 2))


def test_preprocessing_inside_the_forward_passes_relevance_voxel_by_voxel():
    """The map equals the bare network's map on the preprocessed input, put back on the input's voxels
    (so the z-score's offset keeps no relevance and the bias-free network conserves)."""
    net = make_batchnorm_unet(bias=False)
    x = structured_volume(16).double()
    _, result = _lrp(_Preprocessed(net).double().eval(), x, "epsilon", options=EngineOptions(
        device="cpu", precision="fp32", divisor=1))
    y = torch.clamp((x.permute(0, 1, 4, 3, 2)[:, :, 2:14, 2:14, 2:14] - 0.4) / 0.7, -3.0, 3.0)
    _, bare = _lrp(net, y, "epsilon")
    expected = np.zeros((1, 16, 16, 16))
    expected.transpose(0, 3, 2, 1)[:, 2:14, 2:14, 2:14] = bare.attribution
    np.testing.assert_allclose(result.attribution, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())
    assert {c.name: c for c in result.checks}["conservation"].value < 1e-6


def test_opposite_sign_fails_the_check_and_says_so():
    """A bias that dominates the logit (z = x - 10 on a positive image): the input's relevance x is
    positive, the score negative.  The check fails and says the sign is opposite; the accounting
    (input + biases = score) still holds and the map is given."""
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([0.5, 1.0], dtype=torch.float64).view(2, 1, 1, 1, 1))
        net[0].bias.copy_(torch.tensor([0.0, -10.0], dtype=torch.float64))
    x = structured_volume(8).double().abs() + 0.1
    _, result = _lrp(net, x, "epsilon")
    d = result.diagnostics
    check = {c.name: c for c in result.checks}["conservation"]
    print(f"\nLRP on a bias-dominated net: {check.status}: {check.detail}")
    assert result.attribution.sum() > 0 > d["lrp_explained"]
    assert result.attribution.sum() == pytest.approx(float(x.sum()), rel=1e-6)  # R_x = w x, w = 1
    assert result.attribution.sum() + d["lrp_absorbed_bias"] + d["lrp_absorbed_rule"] == pytest.approx(
        d["lrp_explained"], rel=1e-9)
    assert check.status == "fail" and "opposite sign to the score" in check.detail
    assert "read the map's sign with care" in check.detail
