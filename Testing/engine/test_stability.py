"""Explanation stability under test-time augmentation (EsegetaLib/stability.py): no augmentation
gives a zero coefficient-of-variation map; axis flips of a flip-equivariant network (kernels
symmetric under every mirror) give back the plain map and the plain probabilities."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from EsegetaLib.engine import ExplainSession
from EsegetaLib.errors import EsegetaError
from EsegetaLib.options import EngineOptions, Target
from EsegetaLib.stability import augmentations, entropy, mean_and_cv, parse_stability, run_stability

OPTIONS = EngineOptions(device="cpu", precision="fp32", divisor=1)
METHODS = [("Saliency", {"absolute": False}), ("IntegratedGradients", {"n_steps": 4, "adaptive": False})]


def _symmetric_net(seed: int = 0) -> nn.Module:
    """Conv3d layers with kernels symmetric under every axis mirror and zero padding: the network
    commutes with flips of the volume."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.Conv3d(4, 2, 1))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv3d):
                w = m.weight
                for axis in (2, 3, 4):
                    w.copy_(0.5 * (w + w.flip(axis)))
    return net.eval().double()


def _volume(n: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.arange(n)] * 3, indexing="ij")
    blob = np.exp(-((i - 4) ** 2 + (j - 6) ** 2 + (k - 7) ** 2) / 6.0)
    return (blob + 0.1 * rng.standard_normal((n, n, n)))[None].astype(np.float64)


def test_parse_stability():
    assert parse_stability(None) is None and parse_stability("none") is None
    assert parse_stability("flips").kind == "flips"
    spec = parse_stability("noise:5:0.1")
    assert (spec.kind, spec.samples, spec.fraction) == ("noise", 5, 0.1)
    assert parse_stability("noise:3").fraction == 0.05
    for bad in ("flip", "noise", "noise:0", "noise:x", "noise:2:-1"):
        with pytest.raises(EsegetaError, match="--stability"):
            parse_stability(bad)
    assert [a.name for a in augmentations(parse_stability("flips"), _volume())][:2] == ["identity", "flip_I"]
    assert len(augmentations(parse_stability("flips"), _volume())) == 8


def test_mean_cv_and_entropy_formulas():
    mean, cv = mean_and_cv([np.array([1.0, 0.0, 2.0]), np.array([3.0, 0.0, -2.0])])
    np.testing.assert_allclose(mean, [2.0, 0.0, 0.0])
    assert cv[0] == pytest.approx(0.5) and cv[1] == 0.0 and cv[2] == pytest.approx(2.0 / (1e-6 * 2.0))
    np.testing.assert_allclose(entropy(np.array([[0.5, 1.0], [0.5, 0.0]])), [np.log(2.0), 0.0], atol=1e-6)


@pytest.mark.parametrize("stability", [None, "noise:3:0"])
def test_no_augmentation_gives_a_zero_cv_map(stability):
    net = _symmetric_net()
    session = ExplainSession(_volume(), net, Target(class_index=1, region="whole"), OPTIONS)
    result = run_stability(session, lambda a: net, METHODS, parse_stability(stability))
    for name, params in METHODS:
        mean, cv = result.maps[name]
        assert float(np.abs(cv).max()) == 0.0
        np.testing.assert_allclose(mean, session.attribute(name, params).map, rtol=1e-6, atol=1e-9)
    assert result.prediction_entropy.shape == (12, 12, 12)


def test_noise_draws_vary_the_map():
    net = _symmetric_net()
    session = ExplainSession(_volume(), net, Target(class_index=1, region="whole"), OPTIONS)
    result = run_stability(session, lambda a: net, METHODS[:1], parse_stability("noise:3:0.5"))
    assert result.augmentations == ["noise_0", "noise_1", "noise_2"]
    assert float(np.median(result.maps["Saliency"][1])) > 0


def test_flips_of_a_flip_equivariant_net_give_the_plain_map():
    net = _symmetric_net()
    volume = _volume()
    mask = np.zeros((12, 12, 12), bool)
    mask[2:7, 3:10, 5:9] = True  # an asymmetric region: it must be carried with each mirror
    session = ExplainSession(volume, net, Target(class_index=1, region="roi", mask=mask), OPTIONS)
    result = run_stability(session, lambda a: net, METHODS, parse_stability("flips"))
    assert len(result.augmentations) == 8
    for name, params in METHODS:
        plain = session.attribute(name, params).map
        mean, cv = result.maps[name]
        assert float(np.abs(plain).max()) > 0
        np.testing.assert_allclose(mean, plain, rtol=1e-6, atol=1e-9 * float(np.abs(plain).max()))
        assert float(np.median(cv)) < 1e-6
    np.testing.assert_allclose(result.mean_probabilities, session.probabilities, atol=1e-6)


def test_a_mirror_sensitive_net_is_not_stable_under_flips():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 3, padding=1)).eval().double()
    session = ExplainSession(_volume(), net, Target(class_index=1, region="whole"), OPTIONS)
    result = run_stability(session, lambda a: net, METHODS[:1], parse_stability("flips"))
    plain = session.attribute(*METHODS[0]).map
    assert float(np.abs(result.maps["Saliency"][0] - plain).max()) > 1e-3 * float(np.abs(plain).max())
    assert float(np.median(result.maps["Saliency"][1])) > 0.01
