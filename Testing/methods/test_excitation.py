"""Excitation backprop: the engine's maps against a reference written out by hand (explicit positive
convolutions, a hand-built trilinear interpolation matrix, max-unpooling) on a small BatchNorm/ReLU
net, conservation, the contrastive form, and refusals (PReLU/InstanceNorm, negative inputs, residual
additions, one-output models)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from EsegetaLib.engine import ExplainSession
from EsegetaLib.errors import EsegetaError
from EsegetaLib.options import EngineOptions, Target
from method_helpers import make_unet_instancenorm_prelu, structured_volume

OPTIONS = EngineOptions(device="cpu", precision="fp32", divisor=2)


def _relu_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv3d(4, 6, 3, padding=1), nn.BatchNorm3d(6), nn.ReLU(),  # "4": the explained layer
        nn.MaxPool3d(2),
        nn.Conv3d(6, 6, 3, padding=1), nn.ReLU(),
        nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
        nn.Conv3d(6, 2, 1))
    with torch.no_grad():
        bn = net[3]
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)  # positive scales
        bn.bias.uniform_(-0.1, 0.1)
        net[9].weight[:, :3] = net[9].weight[:, :3].abs()  # both classes have excitatory inputs
    return net.eval().double()


def _interp_matrix(n: int) -> torch.Tensor:
    """(2n, n) linear interpolation, scale 2, align_corners=False (PyTorch's source-index formula)."""
    m = torch.zeros(2 * n, n, dtype=torch.float64)
    for o in range(2 * n):
        src = max((o + 0.5) / 2 - 0.5, 0.0)
        i0 = int(np.floor(src))
        i1 = min(i0 + 1, n - 1)
        lam = src - i0
        m[o, i0] += 1 - lam
        m[o, i1] += lam
    return m


def _excite_conv(a, p, weight, padding):
    wp = weight.clamp(min=0)
    z = F.conv3d(a, wp, None, 1, padding)
    s = torch.where(z > 0, p / torch.where(z > 0, z, torch.ones_like(z)), torch.zeros_like(p))
    return a * F.conv_transpose3d(s, wp, None, 1, padding)


def _reference(net, x, top):
    """MWP at the output of net[4] by the formulas, layer by layer from the top."""
    with torch.no_grad():
        a1 = F.relu(net[0](x))
        y3 = net[3](net[2](a1))
        a4 = F.relu(y3)
        a5, idx = F.max_pool3d(a4, 2, return_indices=True)
        y6 = net[6](a5)
        a7 = F.relu(y6)
        a8 = net[8](a7)
        p8 = _excite_conv(a8, top, net[9].weight, 0)
        # trilinear: z = U a7 = a8 (non-negative weights, no bias); P_a7 = a7 * U^T (P / z)
        s = torch.where(a8 > 0, p8 / torch.where(a8 > 0, a8, torch.ones_like(a8)), torch.zeros_like(p8))
        mats = [_interp_matrix(n) for n in a7.shape[2:]]
        c = torch.einsum("ncijk,ia,jb,kd->ncabd", s, *mats)
        p7 = a7 * c
        p6 = p7 * (y6 > 0)
        p5 = _excite_conv(a5, p6, net[6].weight, 1)
        p4 = F.max_unpool3d(p5, idx, 2, output_size=a4.shape[2:])
    return p4


def _session(net, volume):
    return ExplainSession(volume, net, Target(class_index=1, region="whole"), OPTIONS)


def test_equals_the_hand_written_reference_and_conserves():
    net = _relu_net()
    x = structured_volume(16).double()
    result = _session(net, x[0].numpy()).attribute("ExcitationBackprop", {"layer": "4"})
    top = torch.zeros(1, 2, 16, 16, 16, dtype=torch.float64)
    top[:, 1] = 1.0
    reference = _reference(net, x, top).sum(dim=1)[0].numpy()
    assert reference.min() >= 0 and reference.sum() > 0
    np.testing.assert_allclose(result.map, reference, rtol=1e-9, atol=1e-12 * reference.max())
    # a convolution as the layer (the rule modules' hooks come first): P at its output = P after
    # the positive-scale BatchNorm and the ReLU's gate
    conv = _session(net, x[0].numpy()).attribute("ExcitationBackprop", {"layer": "2"})
    with torch.no_grad():
        gate = net[3](net[2](F.relu(net[0](x)))) > 0
    at_conv = (_reference(net, x, top) * gate).sum(dim=1)[0].numpy()
    np.testing.assert_allclose(conv.map, at_conv, rtol=1e-9, atol=1e-12 * at_conv.max())
    check = {c.name: c for c in result.checks}["conservation"]
    loss = abs(reference.sum() - 16 ** 3) / 16 ** 3
    print(f"ExcitationBackprop conservation on the ReLU net: relative loss {check.value:.3e}")
    assert check.value == pytest.approx(loss, rel=1e-6, abs=1e-12) and check.status == "pass"


def test_contrastive_is_the_class_minus_the_contrast_class():
    net = _relu_net()
    x = structured_volume(16).double()
    session = _session(net, x[0].numpy())
    top = torch.zeros(1, 2, 16, 16, 16, dtype=torch.float64)
    top[:, 1], top[:, 0] = 1.0, -1.0
    reference = _reference(net, x, top).sum(dim=1)[0].numpy()
    assert reference.min() < 0 < reference.max()
    signed = session.attribute("ContrastiveExcitationBackprop", {"layer": "4", "relu": False})
    np.testing.assert_allclose(signed.map, reference, rtol=1e-9, atol=1e-12 * np.abs(reference).max())
    rectified = session.attribute("ContrastiveExcitationBackprop", {"layer": "4"})
    np.testing.assert_allclose(rectified.map, np.clip(reference, 0, None), rtol=1e-9,
                               atol=1e-12 * np.abs(reference).max())


def test_several_windows_sum_to_the_patched_models_map():
    """Linear in the top-level probabilities: the additive map of several windows equals the sum of
    each window's reference with its blending weights as top-level probabilities."""
    net = _relu_net()
    x = structured_volume(16).double()
    session = ExplainSession(x[0].numpy(), net, Target(class_index=1, region="whole"),
                             EngineOptions(device="cpu", precision="fp32", divisor=2, patch_size=8, overlap=0.5))
    result = session.attribute("ExcitationBackprop", {"layer": "4"})
    total = torch.zeros(16, 16, 16, dtype=torch.float64)
    for i, w in enumerate(session.windows):
        top = torch.zeros((1, 2) + tuple(session.grid.patch), dtype=torch.float64)
        top[:, 1] = session.window_weights([i])[0, 0]
        total[w] += _reference(net, x[(slice(None), slice(None)) + w], top).sum(dim=1)[0]
    np.testing.assert_allclose(result.map, total.numpy(), rtol=1e-9, atol=1e-12 * float(total.max()))


def test_refused_on_prelu_instancenorm_unet():
    net = make_unet_instancenorm_prelu()
    session = ExplainSession(structured_volume(16)[0].numpy(), net, Target(class_index=1, region="whole"),
                             EngineOptions(device="cpu", precision="fp32"))
    for name in ("ExcitationBackprop", "ContrastiveExcitationBackprop"):
        with pytest.raises(EsegetaError, match="no rule for .*PReLU"):
            session.attribute(name)


def test_refused_on_negative_inputs_above_the_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 3, padding=1),
                        nn.Conv3d(4, 2, 1)).eval().double()  # the classifier reads a signed conv output
    session = _session(net, structured_volume(16)[0].double().numpy())
    with pytest.raises(EsegetaError, match="non-negative activations.*'3'"):
        session.attribute("ExcitationBackprop", {"layer": "1"})


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.b = nn.Conv3d(4, 4, 3, padding=1)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        h = self.relu(self.a(x))
        return self.head(self.relu(h + self.b(h)))


def test_refused_on_residual_additions_and_one_output_models():
    torch.manual_seed(0)
    session = _session(_Residual().eval().double(), structured_volume(16)[0].double().numpy())
    with pytest.raises(EsegetaError, match="residual addition"):
        session.attribute("ExcitationBackprop", {"layer": "relu"})
    torch.manual_seed(0)
    single = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 1, 1)).eval().double()
    session = ExplainSession(structured_volume(16)[0].double().numpy(), single,
                             Target(class_index=0, region="whole"), OPTIONS)
    assert np.abs(session.attribute("ExcitationBackprop", {"layer": "1"}).map).max() > 0
    with pytest.raises(EsegetaError, match="needs a contrast class"):
        session.attribute("ContrastiveExcitationBackprop", {"layer": "1"})


def test_refused_on_exported_programs_with_the_real_reason():
    """An unflattened .pt2 program's modules are graph interpreters: the refusal says that (and what
    to use), not 'no rule for InterpreterModule'."""
    from EsegetaLib.methods.excitation import check_network

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1)).eval()
    check_network(net)  # the eager network has a rule for every module
    program = torch.export.export(net, (torch.rand(1, 1, 8, 8, 8),))
    with pytest.raises(EsegetaError, match=r"exported program \(\.pt2\) keeps only its operations.*model card") as error:
        check_network(torch.export.unflatten(program))
    assert "InterpreterModule" not in str(error.value)
