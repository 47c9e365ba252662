"""Noise tunnels in the engine: samples batched together give the same maps as one at a time, and
the patched map equals the mean over the same global noise draws of the patched base method."""
import numpy as np
import pytest
import torch

from conftest import make_unet_instancenorm_prelu
from EsegetaLib.engine import ExplainSession
from EsegetaLib.methods import noise as nt
from EsegetaLib.options import EngineOptions, Target

VOLUME = np.random.default_rng(5).standard_normal((24, 24, 24))


@pytest.fixture(scope="module")
def net64():
    return make_unet_instancenorm_prelu().double()


@pytest.mark.parametrize("patch", [None, 16], ids=["one_window", "8_windows"])
@pytest.mark.parametrize("method", ["SmoothGrad", "VarGrad"])
def test_batched_samples_equal_one_at_a_time(net64, patch, method):
    params = {"nt_samples": 5, "base_method": "InputXGradient"}
    target = Target(region="whole")
    batched = ExplainSession(VOLUME, net64, target, EngineOptions(patch_size=patch, divisor=4, batch_size=8))
    single = ExplainSession(VOLUME, net64, target, EngineOptions(patch_size=patch, divisor=4, batch_size=1))
    a = batched.attribute(method, params).attribution
    b = single.attribute(method, params).attribution
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * np.abs(b).max())


def test_patched_smoothgrad_is_the_mean_of_patched_base_maps_on_the_same_noise(net64):
    params = {"nt_samples": 3, "base_method": "InputXGradient", "stdev_fraction": 0.1}
    session = ExplainSession(VOLUME, net64, Target(region="whole"), EngineOptions(patch_size=16, divisor=4, seed=3))
    result = session.attribute("SmoothGrad", params).attribution
    # The same draws, in the same order, from a generator seeded as the engine seeds it.
    generator = torch.Generator().manual_seed(3)
    sigma = nt.stdev(session.stats, params)
    x = session.volume
    maps = []
    for _ in range(3):
        noisy = (x + nt.draw(x[None], sigma, 1, generator)[0].to(x.dtype)).numpy()
        maps.append(session.attribute("InputXGradient", {}, inputs=noisy).attribution)
    expected = np.mean(maps, axis=0)
    np.testing.assert_allclose(result, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())
