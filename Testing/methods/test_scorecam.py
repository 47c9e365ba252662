"""Score-CAM: the engine's patched run against a direct implementation written here (one window),
against rerunning every window of the sliding-window model (several windows), and a pointwise
BatchNorm/ReLU network on which the sliding-window model is the whole-volume model exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from EsegetaLib.engine import ExplainSession
from EsegetaLib.methods.baselines import make_baseline
from EsegetaLib.methods.common import resample_layer_map
from EsegetaLib.methods.layers import layer_geometry
from EsegetaLib.options import EngineOptions, Target
from method_helpers import make_net_batchnorm_relu, stats_of, structured_volume

PARAMS = {"layer": "5", "baseline": "constant_low", "relu": False}  # signed: compare every voxel  # the ReLU after the stride-2 conv: half resolution


def _direct_score_cam(net, x, layer, baseline, score, relu=False):
    """Score-CAM straight from the paper on one volume: hook, resample, normalise, mask, score."""
    store = {}
    handle = layer.register_forward_hook(lambda m, a, out: store.__setitem__("A", out.detach()))
    with torch.no_grad():
        net(x)
    handle.remove()
    geo = layer_geometry(net, layer, x)
    a = resample_layer_map(store["A"], tuple(x.shape[2:]), geo)[0]  # (K, *S)
    cam = torch.zeros(x.shape[2:], dtype=torch.float64)
    with torch.no_grad():
        f_b = score(baseline)
        for k in range(a.shape[0]):
            lo, hi = a[k].min(), a[k].max()
            if hi <= lo:
                continue
            m = (a[k] - lo) / (hi - lo)
            w = score(baseline + m * (x - baseline)) - f_b
            cam += w * a[k].double()
    return torch.clamp(cam, min=0) if relu else cam


def test_one_window_equals_direct_implementation():
    net = make_net_batchnorm_relu().double()
    x = structured_volume(16).double()
    session = ExplainSession(x[0].numpy(), net, Target(class_index=1, region="whole"),
                             EngineOptions(device="cpu", divisor=2, precision="fp32"))
    assert len(session.windows) == 1
    result = session.attribute("ScoreCAM", PARAMS)
    baseline = make_baseline(x, stats_of(x), {"baseline": "constant_low"})
    direct = _direct_score_cam(net, x, net[5], baseline, lambda z: float(net(z)[:, 1].double().sum()))
    assert float(direct.std()) > 0  # a non-trivial map
    np.testing.assert_allclose(result.map, direct.numpy(), rtol=1e-9, atol=1e-9 * float(direct.abs().max()))
    assert result.diagnostics["channels_scored"] == 16
    assert result.diagnostics["volumes_evaluated"] == 17  # the baseline + one masked volume per channel


def test_patched_run_equals_rerunning_every_window():
    """Several overlapping windows: the weights from the patched score (cached windows, only the
    changed ones rerun) equal F computed by rerunning the whole sliding-window model."""
    net = make_net_batchnorm_relu().double()
    x = structured_volume(16).double()
    session = ExplainSession(x[0].numpy(), net, Target(class_index=1, region="whole"),
                             EngineOptions(device="cpu", divisor=2, precision="fp32", patch_size=8, overlap=0.5))
    assert len(session.windows) > 8
    result = session.attribute("ScoreCAM", PARAMS)

    def full_score(z):
        total = 0.0
        with torch.no_grad():
            for i, w in enumerate(session.windows):
                out = net(z[(slice(None), slice(None)) + w])[:, 1:2]
                total += float((out * session.window_weights([i])).sum())
        return total

    activation = session.layer_activation(net[5], x[0], tuple(tuple(g) for g in result.diagnostics["layer_geometry"]))
    baseline = make_baseline(x, stats_of(x), {"baseline": "constant_low"})
    f_b = full_score(baseline)
    cam = torch.zeros(x.shape[2:], dtype=torch.float64)
    for k in range(activation.shape[1]):
        a = activation[0, k].double()
        if a.max() <= a.min():
            continue
        m = (a - a.min()) / (a.max() - a.min())
        cam += (full_score(baseline + m * (x - baseline)) - f_b) * a
    cam = cam.numpy()
    assert cam.std() > 0
    np.testing.assert_allclose(result.map, cam, rtol=1e-7, atol=1e-9 * np.abs(cam).max())
    # every masked volume (and the baseline) differs from x in every window: all rerun, batched
    assert result.diagnostics["windows_rerun"] == result.diagnostics["volumes_evaluated"] * len(session.windows)


def _pointwise_bn_relu_net():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv3d(1, 6, 1), nn.BatchNorm3d(6), nn.ReLU(), nn.Conv3d(6, 6, 1), nn.BatchNorm3d(6),
                        nn.ReLU(), nn.Conv3d(6, 2, 1))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval().double()


def test_multi_window_equals_whole_model_on_a_pointwise_net():
    """1x1x1 convolutions: each output voxel depends on its input voxel only, so the blended
    sliding-window model is the whole-volume model and Score-CAM must not depend on the windows."""
    net = _pointwise_bn_relu_net()
    volume = structured_volume(16)[0].double().numpy()
    maps = []
    for patch in (None, 8):
        session = ExplainSession(volume, net, Target(class_index=1, region="whole"),
                                 EngineOptions(device="cpu", divisor=2, precision="fp32", patch_size=patch))
        maps.append(session.attribute("ScoreCAM", {"layer": "2", "baseline": "mean", "relu": False}).map)
    assert np.abs(maps[0]).max() > 0
    np.testing.assert_allclose(maps[1], maps[0], rtol=1e-8, atol=1e-10 * np.abs(maps[0]).max())


def test_max_channels_keeps_the_most_variable_channels():
    net = make_net_batchnorm_relu().double()
    x = structured_volume(16).double()
    session = ExplainSession(x[0].numpy(), net, Target(class_index=1, region="whole"),
                             EngineOptions(device="cpu", divisor=2, precision="fp32"))
    result = session.attribute("ScoreCAM", dict(PARAMS, max_channels=4))
    assert result.diagnostics["channels_scored"] == 4
    assert result.diagnostics["volumes_evaluated"] == 5


def test_automatic_layer_on_a_monai_unet():
    from method_helpers import make_unet_instancenorm_prelu

    net = make_unet_instancenorm_prelu()
    volume = structured_volume(16)[0].numpy()
    session = ExplainSession(volume, net, Target(class_index=1, region="whole"),
                             EngineOptions(device="cpu", precision="fp32"))
    result = session.attribute("ScoreCAM")
    assert result.diagnostics["layer"]
    assert np.isfinite(result.map).all() and result.map.min() >= 0
    assert result.attribution.shape == (1, 16, 16, 16)


def test_channel_weight_check_warns_without_positive_evidence():
    """The trust check "channel_weights" passes when some channel raises the score and warns when
    none does (the rectified map is then empty)."""
    net = make_net_batchnorm_relu().double()
    x = structured_volume(16).double()
    options = EngineOptions(device="cpu", divisor=2, precision="fp32")
    session = ExplainSession(x[0].numpy(), net, Target(class_index=1, region="whole"), options)
    positive = session.attribute("ScoreCAM", {"layer": "5", "baseline": "constant_low"})
    assert positive.diagnostics["channel_weight_max"] > 0
    assert {c.name: c.status for c in positive.checks}["channel_weights"] == "pass"
    # the baseline equal to the input: every masked volume is the input, every weight exactly 0
    same = session.attribute("ScoreCAM", {"layer": "5", "baseline": "user", "baseline_volume": x[0].numpy()})
    assert same.diagnostics["channel_weight_max"] == 0.0
    assert {c.name: c.status for c in same.checks}["channel_weights"] == "warn"
    assert float(np.abs(same.map).max()) == 0.0
