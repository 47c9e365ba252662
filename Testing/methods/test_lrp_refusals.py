"""LRP refuses, in one line naming the layer or op and before the relevance pass, networks it has no
rule for: gating modules, ops without a rule in unknown modules, functional non-linearities, products
of activations, functional normalisation, TorchScript and exported programs; and alpha-beta parameters that break conservation.
Rectifier-like activation modules (GELU) pass relevance unchanged instead of being refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from EsegetaLib.engine import ExplainSession
from EsegetaLib.errors import EsegetaError
from EsegetaLib.methods import get_method
from EsegetaLib.options import EngineOptions, Target
from method_helpers import make_context, structured_volume

OPTIONS = EngineOptions(device="cpu", precision="fp32", divisor=1)


def _session(net, prepare=True):
    x = structured_volume(8).double()
    net = net.double().eval() if prepare else net  # exported programs refuse eval()
    return ExplainSession(x[0].numpy(), net, Target(class_index=1, region="whole"), OPTIONS)


def _refused(net, pattern, prepare=True, **params):
    session = _session(net, prepare)
    with pytest.raises(EsegetaError, match=pattern) as error:
        session.attribute("LRP", params)
    assert "\n" not in str(error.value)
    return str(error.value)


class _Functional(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.head = nn.Conv3d(4, 2, 1)
        self.op = op

    def forward(self, x):
        return self.head(self.op(self.conv(x)))


class _Gate(nn.Module):
    """x * sigmoid(conv(x)) with the sigmoid called functionally (no module to refuse statically)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.gate = nn.Conv3d(4, 4, 1)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        h = F.relu(self.conv(x))
        return self.head(h * self.gate(h))


class _Unknown(nn.Module):
    def forward(self, x):
        return x.abs()


def test_module_without_a_rule_is_refused_before_the_forward():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 2, 1))
    _refused(net, r"no rule for layer '1' \(Tanh\)")
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Softmax(dim=1))
    _refused(net, r"no rule for layer '1' \(Softmax\)")


def test_unknown_modules_are_checked_op_by_op():
    """A module type without a rule of its own is refused only for an op that has no rule, naming
    the op and the module; one of linear ops runs (LRP-0 from the gradient)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), _Unknown(), nn.Conv3d(4, 2, 1))
    _refused(net, r"no rule for abs in '1' \(_Unknown\)")

    class Halve(nn.Module):
        def forward(self, x):
            return torch.cat([x[:, :2], 0.5 * x[:, 2:]], 1)

    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1, bias=False), Halve(), nn.Conv3d(4, 2, 1, bias=False))
    result = _session(net).attribute("LRP", {"epsilon": 1e-12})
    with torch.no_grad():
        score = float(net(structured_volume(8).double())[:, 1].sum())
    assert result.attribution.sum() == pytest.approx(score, rel=1e-9)


@pytest.mark.parametrize("op, pattern", [
    (torch.sigmoid, r"no rule for sigmoid in the network's forward \(_Functional\)"),
    (lambda t: torch.softmax(t, 1), r"no rule for a softmax inside the network"),
    (lambda t: t.clamp(-1, 1), r"no rule for a clamp"),
    (lambda t: t / t.abs().amax(), r"no rule for (abs|amax|a division)"),
])
def test_functional_ops_without_a_rule_are_refused_naming_them(op, pattern):
    torch.manual_seed(0)
    _refused(_Functional(op), pattern)


def test_products_of_activations_and_functional_normalisation_are_refused():
    torch.manual_seed(0)
    _refused(_Gate(), r"a product of two activations \(attention or gating\)")
    _refused(_Functional(lambda t: F.instance_norm(t)), r"norm.* called outside a module")


def test_a_functional_convolution_with_a_constant_kernel_takes_lrp0_and_is_counted():
    torch.manual_seed(0)
    weight = torch.randn(4, 4, 3, 3, 3, dtype=torch.float64)
    net = _Functional(lambda t: F.conv3d(F.relu(t), weight, padding=1))
    for m in (net.conv, net.head):
        m.bias = None
    result = _session(net).attribute("LRP", {"epsilon": 1e-12})
    with torch.no_grad():
        score = float(net.double()(structured_volume(8).double())[:, 1].sum())
    assert result.attribution.sum() == pytest.approx(score, rel=1e-9)
    assert result.diagnostics["lrp_functional_linear"] == 1
    assert "1 linear map(s) outside the rule layers" in {c.name: c for c in result.checks}[
        "conservation"].detail


def test_functional_relu_and_residual_additions_have_rules():
    """A functional ReLU and a residual addition are covered (gradient routing / proportional split):
    the map sums to the score on a bias-free net."""
    torch.manual_seed(0)

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv3d(1, 4, 3, padding=1, bias=False)
            self.b = nn.Conv3d(4, 4, 3, padding=1, bias=False)
            self.head = nn.Conv3d(4, 2, 1, bias=False)

        def forward(self, x):
            h = F.relu(self.a(x))
            return self.head(torch.relu(h + self.b(h)))

    net = Residual().double().eval()
    result = _session(net).attribute("LRP", {"epsilon": 1e-12})
    x = structured_volume(8).double()
    with torch.no_grad():
        score = float(net(x)[:, 1].sum())
    assert result.attribution.sum() == pytest.approx(score, rel=1e-9)


def test_gelu_passes_relevance_unchanged():
    """GELU (not positively homogeneous) gets the pass rule: R_z = R_a, so a bias-free net conserves."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1, bias=False), nn.GELU(), nn.Conv3d(4, 2, 1, bias=False))
    result = _session(net).attribute("LRP", {"epsilon": 1e-12})
    x = structured_volume(8).double()
    with torch.no_grad():
        score = float(net.double()(x)[:, 1].sum())
    assert result.attribution.sum() == pytest.approx(score, rel=1e-9)
    plain = _session(net).attribute("InputXGradient")
    assert not np.allclose(result.attribution, plain.attribution)  # not gradient x input


def test_torchscript_and_exported_programs_are_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1)).double().eval()
    x = structured_volume(8).double()
    scripted = torch.jit.trace(net, x)
    with pytest.raises(EsegetaError, match="LRP cannot run on a TorchScript model"):
        _session(scripted, prepare=False).attribute("LRP")  # the engine's run-level check refuses layer-hooking methods too
    program = torch.export.export(net, (x,))
    # as models/export.load_program gives it (unflattened: its submodules run as graph modules), and inlined
    for exported in (torch.export.unflatten(program), program.module()):
        spec, ctx = make_context("LRP", exported, x)
        with pytest.raises(EsegetaError, match=r"LRP cannot run on an exported program \(.pt2\).*model card"):
            spec.attribute(ctx)


def test_alpha_beta_must_differ_by_one():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1))
    _refused(net, r"alpha - beta = 1", rule="alpha_beta", alpha=1.0, beta=1.0)
    assert get_method("LRP").resolve_params({"rule": "alpha_beta", "alpha": 1.0, "beta": 0.0})["beta"] == 0.0
