"""Bad input gets one clear line naming the problem and what to do."""
import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_unet_instancenorm_prelu
from engine_helpers import IG
from EsegetaLib.api import explain
from EsegetaLib.engine import ExplainSession
from EsegetaLib.errors import EsegetaError
from EsegetaLib.options import EngineOptions, Target

OPTIONS = EngineOptions(divisor=4)


def _volume(shape=(16, 16, 16)):
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _one_line(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message
    for word in words:
        assert word.lower() in message.lower(), message


class _Constant(nn.Module):
    """Predicts class 0 everywhere (class 1's logit is far below)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.copy_(torch.tensor([5.0, -5.0]))

    def forward(self, x):
        return self.conv(x)


@pytest.fixture(scope="module")
def net():
    return make_unet_instancenorm_prelu()


@pytest.mark.parametrize("array,words", [
    (np.zeros((16, 16)), ["3D array", "(16, 16)"]),
    (np.zeros((1, 1, 8, 8, 8)), ["3D array", "(1, 1, 8, 8, 8)"]),
    (np.where(np.arange(4096).reshape(16, 16, 16) == 7, np.nan, 0.0), ["1 NaN or infinite voxel"]),
    (np.full((8, 8, 8), np.inf), ["512 NaN or infinite"]),
])
def test_bad_arrays(net, array, words):
    with pytest.raises(EsegetaError) as excinfo:
        ExplainSession(array, net, Target(region="whole"), OPTIONS)
    _one_line(excinfo, *words)


def test_empty_predicted_region_names_class_and_suggests():
    with pytest.raises(EsegetaError) as excinfo:
        ExplainSession(_volume(), _Constant(), Target(class_index=1, region="predicted"), OPTIONS)
    _one_line(excinfo, "class 1", "'whole'", "'roi'", "another class")


def test_class_out_of_range(net):
    with pytest.raises(EsegetaError) as excinfo:
        ExplainSession(_volume(), net, Target(class_index=5, region="whole"), OPTIONS)
    _one_line(excinfo, "class index 5", "2 classes")


def test_output_grid_mismatch():
    shrinking = nn.Sequential(nn.Conv3d(1, 2, 3, stride=2, padding=1))
    with pytest.raises(EsegetaError) as excinfo:
        ExplainSession(_volume(), shrinking, Target(region="whole"), OPTIONS)
    _one_line(excinfo, "output grid (8, 8, 8) differs from its input grid (16, 16, 16)", "resample")


def test_channel_mismatch(net):
    with pytest.raises(EsegetaError) as excinfo:
        ExplainSession(np.zeros((2, 16, 16, 16), np.float32), net, Target(region="whole"), OPTIONS)
    _one_line(excinfo, "1 input channel", "has 2")


@pytest.mark.parametrize("target,words", [
    (Target(region="roi", mask=np.ones((8, 8, 8), bool)), ["shape (8, 8, 8)", "(16, 16, 16)"]),
    (Target(region="roi", mask=np.zeros((16, 16, 16), bool)), ["empty"]),
    (Target(region="roi"), ["needs a mask"]),
    (Target(region="point", point=(3, 40, 2)), ["outside the volume"]),
    (Target(region="everywhere"), ["region must be one of"]),
])
def test_bad_targets(net, target, words):
    with pytest.raises(EsegetaError) as excinfo:
        ExplainSession(_volume(), net, target, OPTIONS)
    _one_line(excinfo, *words)


def test_parameter_out_of_range(net):
    session = ExplainSession(_volume(), net, Target(region="whole"), OPTIONS)
    with pytest.raises(EsegetaError) as excinfo:
        session.attribute(IG, {"n_steps": 0})
    _one_line(excinfo, "n_steps", ">= 1")
    with pytest.raises(EsegetaError) as excinfo:
        session.attribute(IG, {"n_step": 4})
    _one_line(excinfo, "no parameter 'n_step'", "did you mean 'n_steps'")


def test_unknown_method_suggests_closest(net):
    pytest.importorskip("EsegetaLib.methods.catalog", reason="the method catalogue is not written yet")
    with pytest.raises(EsegetaError) as excinfo:
        explain(_volume(), net, ["Salency"], Target(region="whole"), OPTIONS)
    _one_line(excinfo, "unknown method 'Salency'", "did you mean 'Saliency'")
