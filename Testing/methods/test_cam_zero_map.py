"""Grad-CAM's map is zero at every voxel when the gradient-weighted sum of a rectified layer's
channels is <= 0 everywhere (a model that reads the class out through negative weights, as the
trained DynUNet of the ground-truth zoo does at its automatic layer).  Such a map would say "no
evidence here"; the engine refuses it with the reason, and relu=false shows the negative evidence.
Captum's LayerGradCam on the same network gives the same zero map, so the zero is the method's."""
import numpy as np
import pytest
import torch
from torch import nn

from EsegetaLib.engine import ExplainSession
from EsegetaLib.errors import EsegetaError
from EsegetaLib.options import EngineOptions, Target


def _negative_readout_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1))
    with torch.no_grad():
        net[2].weight[1] = -net[2].weight[1].abs() - 0.1  # class 1 read from every channel with a negative weight
        net[2].bias[1] = 5.0  # so that class 1 is still predicted somewhere
    return net.eval()


@pytest.mark.parametrize("method", ["GradCAM", "GradCAM++", "GuidedGradCam"])
def test_zero_cam_is_refused_with_its_reason(method):
    volume = np.random.RandomState(0).rand(12, 12, 12).astype(np.float32)
    net = _negative_readout_net()
    session = ExplainSession(volume, net, Target(class_index=1, region="whole"),
                             EngineOptions(device="cpu", divisor=1, precision="fp32"))
    if method == "GradCAM++":  # weights from positive gradients only: relu=false cannot help
        for relu in (True, False):
            with pytest.raises(EsegetaError, match=r"GradCAM\+\+'s map is zero at every voxel: it weights 1's "
                                                   r"channels by their positive gradients only, and none is positive"):
                session.attribute(method, {"layer": "1", "relu": relu})
        return
    if method == "GuidedGradCam":  # the guided factor is zero too: the guided rule's reason
        for relu in (True, False):
            with pytest.raises(EsegetaError, match=r"GuidedGradCam's map is zero at every voxel: the rule removed the "
                                                   r"whole backward signal at 1 of 1 rectifier calls"):
                session.attribute(method, {"layer": "1", "relu": relu})
        return
    with pytest.raises(EsegetaError, match=rf"{method}'s map is zero at every voxel: the gradient-weighted sum of "
                                           r"1's channels is <= 0 everywhere.*relu=false"):
        session.attribute(method, {"layer": "1"})
    negative = session.attribute(method, {"layer": "1", "relu": False}).map
    assert np.abs(negative).max() > 0

    if method == "GradCAM":  # Captum's Grad-CAM on the same network and score: the same zero map
        from captum.attr import LayerGradCam

        def score(x):
            return net(x)[:, 1].sum(dim=(1, 2, 3))[:, None]

        x = torch.from_numpy(volume)[None, None]
        reference = LayerGradCam(score, net[1]).attribute(x, target=0, relu_attributions=True)
        assert not bool(reference.any())
        unrectified = LayerGradCam(score, net[1]).attribute(x, target=0, relu_attributions=False)
        assert float(unrectified.detach().max()) <= 0 < float(-unrectified.detach().min())
