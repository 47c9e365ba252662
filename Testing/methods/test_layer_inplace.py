"""Layer methods give the same map whether the network's activations run in place or not (#11 item 1).

An in-place activation after the explained layer overwrites the layer output a method keeps: before
the fix Grad-CAM++ changed the map and Layer Integrated Gradients crashed ("a leaf Variable ...").
The reference is the same network with every `inplace` flag off, built separately."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from EsegetaLib.api import explain
from EsegetaLib.errors import EsegetaError
from EsegetaLib.methods import all_methods
from EsegetaLib.options import EngineOptions, Target

LAYER_METHODS = [s.name for s in all_methods() if s.needs_layer]
OPTIONS = EngineOptions(device="cpu", divisor=2)


def _block_net(inplace: bool):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(inplace=inplace),
        nn.Conv3d(8, 8, 3, stride=2, padding=1), nn.ReLU(inplace=inplace),
        nn.Conv3d(8, 8, 3, padding=1), nn.LeakyReLU(0.1, inplace=inplace),
        nn.Upsample(scale_factor=2), nn.Conv3d(8, 2, 1)).eval()


class _FunctionalInplace(nn.Module):
    """relu_ called functionally on the explained layer's output: no flag can switch it off."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv3d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv3d(8, 2, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu_(self.conv1(x)))


def _maps(network, methods, layer):
    vol = np.random.RandomState(0).rand(16, 16, 16).astype(np.float32)
    expl = explain(vol, network, [(m, {"layer": layer}) for m in methods], target=Target(region="whole"),
                   options=OPTIONS)
    # a model-level result (feature visualisation) has no map of the input: compare its volume
    return {m: (r.outputs["feature_volume"][0] if r.model_level else r.map) for m, r in expl.results.items()}


def test_every_layer_method_same_with_inplace_relu():
    # Excitation backprop refuses the LeakyReLU of this net by design (Testing/methods/test_excitation.py):
    # in place or not, the refusal must be the same.
    refused = [m for m in LAYER_METHODS if "Excitation" in m]
    for name in refused:
        for inplace in (True, False):
            with pytest.raises(EsegetaError, match="no rule for LeakyReLU"):
                _maps(_block_net(inplace), [name], "2")
    methods = [m for m in LAYER_METHODS if m not in refused]
    inplace, reference = _maps(_block_net(True), methods, "2"), _maps(_block_net(False), methods, "2")
    for name in methods:
        assert np.abs(reference[name]).max() > 0, name
        np.testing.assert_allclose(inplace[name], reference[name], rtol=1e-5, atol=1e-6 * np.abs(reference[name]).max(),
                                   err_msg=name)


def test_inplace_flags_restored_after_run():
    net = _block_net(True)
    _maps(net, ["GradCAM++"], "2")
    assert net[1].inplace and net[3].inplace and net[5].inplace


def test_monai_dynunet_inplace_leakyrelu_matches_out_of_place_copy():
    from monai.networks.nets import DynUNet

    torch.manual_seed(0)
    net = DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                  filters=[4, 8, 16], norm_name="instance").eval()
    assert any(getattr(m, "inplace", False) for m in net.modules())  # MONAI's default LeakyReLU(inplace=True)
    reference = copy.deepcopy(net)
    for m in reference.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    methods = ["GradCAM++", "LayerIntegratedGradients", "GradCAM"]
    layer = "bottleneck.conv1"
    a, b = _maps(net, methods, layer), _maps(reference, methods, layer)
    for name in methods:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6 * (np.abs(b[name]).max() + 1e-12), err_msg=name)


def test_functional_inplace_after_layer():
    """Grad-CAM++ keeps its own copy (same map as relu out of place); Layer IG is refused in one line."""
    net = _FunctionalInplace().eval()

    class OutOfPlace(_FunctionalInplace):
        def forward(self, x):
            return self.conv2(torch.relu(self.conv1(x)))

    reference = OutOfPlace().eval()
    np.testing.assert_allclose(_maps(net, ["GradCAM++"], "conv1")["GradCAM++"],
                               _maps(reference, ["GradCAM++"], "conv1")["GradCAM++"], rtol=1e-5, atol=1e-7)
    with pytest.raises(EsegetaError) as err:
        _maps(net, ["LayerIntegratedGradients"], "conv1")
    assert "in place" in str(err.value) and "\n" not in str(err.value)
