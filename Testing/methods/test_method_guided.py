"""Guided backprop and deconvolution are really guided on any rectifier (DESIGN.md section 3)."""
import json

import pytest
import torch
from captum.attr import Deconvolution, GuidedBackprop, Saliency
from torch import nn

from EsegetaLib.errors import EsegetaError
from method_helpers import (make_context, make_net_batchnorm_relu, make_unet_instancenorm_prelu,
                            roi_weights, run_method, shared_file, structured_volume)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _maps(network, x, name):
    spec, ctx = make_context(name, network, x)
    ours = run_method(spec, ctx)[0]
    plain = Saliency(ctx.forward).attribute(x, abs=False, additional_forward_args=ctx.forward_args)
    return ours, plain, ctx


@pytest.mark.parametrize("name", ["GuidedBackprop", "Deconvolution"])
def test_differs_from_plain_gradient_on_prelu_unet(name):
    ours, plain, ctx = _maps(make_unet_instancenorm_prelu(), structured_volume(16), name)
    rel = float((ours - plain).norm() / plain.norm())
    print(f"{name} vs plain gradient on the PReLU UNet: relative L2 difference {rel:.3f}")
    assert rel > 0.1
    # ... while Captum's own class silently returns the plain gradient there (the trap)
    captum_cls = GuidedBackprop if name == "GuidedBackprop" else Deconvolution
    theirs = captum_cls(ctx.forward).attribute(ctx.inputs, additional_forward_args=ctx.forward_args)
    torch.testing.assert_close(theirs, plain)


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("name, captum_cls", [("GuidedBackprop", GuidedBackprop), ("Deconvolution", Deconvolution)])
def test_equals_captum_on_pure_relu_network(name, captum_cls, channels):
    network = make_net_batchnorm_relu(in_channels=channels)
    x = structured_volume(16, channels)
    ours, plain, ctx = _maps(network, x, name)
    theirs = captum_cls(ctx.forward).attribute(x, additional_forward_args=ctx.forward_args)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    assert float((ours - plain).abs().max()) > 0


class FunctionalNet(nn.Module):
    """Rectifiers as functional calls and several activation modules (none of them nn.ReLU)."""

    def __init__(self, act):
        super().__init__()
        torch.manual_seed(1)
        self.c1 = nn.Conv3d(1, 6, 3, padding=1)
        self.c2 = nn.Conv3d(6, 6, 3, padding=1)
        self.c3 = nn.Conv3d(6, 2, 1)
        self.act = act

    def forward(self, x):
        h = self.act(self.c1(x)) if self.act is not None else torch.relu(self.c1(x))
        h = torch.nn.functional.relu(self.c2(h), inplace=True) if self.act is None else self.act(self.c2(h))
        return self.c3(h)


@pytest.mark.parametrize("act", [None, nn.LeakyReLU(0.1), nn.PReLU(), nn.ELU(), nn.GELU(), nn.SiLU()],
                         ids=["functional_relu", "leaky", "prelu", "elu", "gelu", "silu"])
def test_guided_on_any_rectifier(act):
    network = FunctionalNet(act).eval()
    x = structured_volume(12)
    ours, plain, _ = _maps(network, x, "GuidedBackprop")
    assert float((ours - plain).norm() / plain.norm()) > 0.05
    # reference rule written out by hand with autograd hooks on the activations' inputs:
    # guided grad_in = relu(f'(x) * grad_out), applied at every activation
    xr = x.clone().requires_grad_(True)
    h1 = network.c1(xr)
    h1.register_hook(lambda g: g.clamp(min=0))
    a1 = (network.act or torch.relu)(h1)
    h2 = network.c2(a1)
    h2.register_hook(lambda g: g.clamp(min=0))
    a2 = (network.act or torch.relu)(h2)
    out = network.c3(a2)
    (out[:, 1:2] * roi_weights(x)).sum().backward()
    torch.testing.assert_close(ours, xr.grad, rtol=1e-5, atol=1e-7)


def test_guided_on_torch_export_program_equals_eager():
    eager = FunctionalNet(nn.GELU()).eval()
    x = structured_volume(12)
    exported = torch.export.export(eager, (x,)).module()
    ours_eager, plain, _ = _maps(eager, x, "GuidedBackprop")
    ours_exported, _, _ = _maps(exported, x, "GuidedBackprop")
    torch.testing.assert_close(ours_exported, ours_eager, rtol=1e-5, atol=1e-7)
    assert float((ours_exported - plain).norm() / plain.norm()) > 0.05


def test_torchscript_gives_the_eager_map():
    """The rule is applied at the dispatcher, which TorchScript reaches too (no longer refused)."""
    eager = make_unet_instancenorm_prelu()
    x = structured_volume(16)
    ours_eager, plain, _ = _maps(eager, x, "GuidedBackprop")
    ours_scripted, _, _ = _maps(torch.jit.trace(eager, x), x, "GuidedBackprop")
    torch.testing.assert_close(ours_scripted, ours_eager, rtol=1e-5, atol=1e-7)
    assert float((ours_scripted - plain).norm() / plain.norm()) > 0.1


def test_network_without_rectifiers_is_refused():
    network = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1)).eval()
    spec, ctx = make_context("Deconvolution", network, structured_volume(8))
    with pytest.raises(EsegetaError, match="no rectifier"):
        spec.attribute(ctx)


def build_meshnet(layers_json, state_dict):
    """MeshNet (mindgrab) as a PyTorch module from its layers.json; blocks of conv/norm/act grouped
    as model.<i>.<j> to match the state dict's names."""
    ops = json.loads(layers_json.read_text())["forward_pass"]
    blocks, current = [], []
    for op in ops:
        kind, p = op["op"], dict(op["params"])
        if kind == "conv3d":
            if current:
                blocks.append(nn.Sequential(*current))
            current = []
            index = len(blocks)
            p["bias"] = f"model.{index}.bias" in state_dict or f"model.{index}.0.bias" in state_dict
            current.append(nn.Conv3d(**p))
        elif kind == "group_norm":
            current.append(nn.GroupNorm(p["num_groups"], p["num_channels"], affine=False))
        elif kind == "batch_norm3d":
            current.append(nn.BatchNorm3d(p["num_features"], affine=False, track_running_stats=False))
        elif kind == "gelu":
            current.append(nn.GELU())
        else:
            raise ValueError(kind)
    blocks.append(current[0] if len(current) == 1 else nn.Sequential(*current))
    model = nn.Sequential()
    model.add_module("model", nn.Sequential(*blocks))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def test_guided_on_real_meshnet_gelu_groupnorm():
    layers = shared_file("models", "mindgrab", "layers.json")
    weights = shared_file("models", "mindgrab", "model.pth")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    network = build_meshnet(layers, state)
    assert any(isinstance(m, nn.GELU) for m in network.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in network.modules())
    x = structured_volume(16)
    scripted = shared_file("models", "mindgrab", "mindgrab.ts.pt")
    with torch.no_grad():  # the module built from layers.json is the shipped model
        torch.testing.assert_close(network(x), torch.jit.load(str(scripted), map_location="cpu")(x))
    ours, plain, _ = _maps(network, x, "GuidedBackprop")
    assert torch.isfinite(ours).all() and float(ours.std()) > 0
    rel = float((ours - plain).norm() / plain.norm())
    print(f"GuidedBackprop vs plain gradient on MeshNet (GELU+GroupNorm): relative L2 difference {rel:.3f}")
    assert rel > 0.1
