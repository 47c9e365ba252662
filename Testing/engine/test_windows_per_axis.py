"""Windows per axis: an axis the volume does not fill gets a window of the volume's size rounded up
to the divisor (not the cubic patch), the run says so, and the maps are those of the cubic run."""
import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_unet_instancenorm_prelu
from EsegetaLib.api import explain
from EsegetaLib.options import EngineOptions, Target
from EsegetaLib.windows import fit_patch

SHAPE = (40, 40, 12)
OPTIONS = dict(device="cpu", patch_size=16, divisor=4, overlap=0.25, batch_size=4)
METHODS = [("Saliency", {"absolute": False}), "InputXGradient", ("IntegratedGradients", {"n_steps": 4}),
           ("Occlusion", {"window_fraction": 0.25})]


def pointwise_net():
    """A real Conv3d network with 1x1x1 kernels: its output at a voxel sees only that voxel, so
    padding never changes what it computes inside the volume and both runs must agree exactly."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 6, 1), nn.PReLU(), nn.Conv3d(6, 2, 1)).double().eval()


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(4)
    i, j, k = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    tube = np.exp(-((i - 20) ** 2 + (j - 18) ** 2) / 10.0)
    return (100 + 300 * tube + 10 * rng.standard_normal(SHAPE))[None]


def test_fit_patch_rounds_the_volume_up_to_the_divisor():
    assert fit_patch((157, 393, 34), (64, 64, 64), 16) == (64, 64, 48)
    assert fit_patch((40, 40, 12), (16, 16, 16), 4) == (16, 16, 12)
    assert fit_patch((10, 12, 9), (16, 16, 16), 4) == (12, 12, 12)
    assert fit_patch((100, 100, 100), (64, 64, 64), 16) == (64, 64, 64)


def test_thin_volume_windows_are_no_thicker_than_needed_and_maps_unchanged(volume):
    target = Target(class_index=1, region="whole")
    fitted = explain(volume, pointwise_net(), METHODS, target, EngineOptions(**OPTIONS))
    cubic = explain(volume, pointwise_net(), METHODS, target, EngineOptions(**OPTIONS, fit_patch=False))
    assert fitted.engine["patch_size"] == [16, 16, 12] and cubic.engine["patch_size"] == [16, 16, 16]
    assert fitted.engine["padded_shape"] == [40, 40, 12] and cubic.engine["padded_shape"] == [40, 40, 16]
    assert all(k1 - k0 <= 12 for _, _, (k0, k1) in fitted.engine["windows"])
    assert fitted.engine["n_windows"] == cubic.engine["n_windows"] == 9
    # the run says what it did (the CLI copies the engine record into run.json)
    assert fitted.engine["patch_requested"] == [16, 16, 16]
    assert "K 12 voxels: window 12 instead of 16" in fitted.engine["patch_note"]
    assert "patch_note" not in cubic.engine
    for name in fitted.results:
        a, b = fitted.results[name].attribution, cubic.results[name].attribution
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9 * np.abs(b).max(), err_msg=name)


def test_a_unet_on_fitted_windows_sees_no_padding(volume):
    """A UNet's convolutions and instance norms do see the replicated slices of the cubic run (a
    quarter of each 16-slice window here), so its maps differ (printed); the fitted run has none."""
    net = make_unet_instancenorm_prelu().double()
    target = Target(class_index=1, region="whole")
    fitted = explain(volume, net, ["Saliency"], target, EngineOptions(**OPTIONS))
    cubic = explain(volume, net, ["Saliency"], target, EngineOptions(**OPTIONS, fit_patch=False))
    assert fitted.engine["padded_shape"] == list(SHAPE) and cubic.engine["padded_shape"] == [40, 40, 16]
    a, b = fitted.results["Saliency"].map, cubic.results["Saliency"].map
    assert a.shape == b.shape == SHAPE and np.isfinite(a).all() and np.abs(a).max() > 0
    print(f"Saliency on a UNet, fitted vs cubic windows: r = {np.corrcoef(a.ravel(), b.ravel())[0, 1]:.3f}")
