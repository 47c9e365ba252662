"""Each Captum-wrapped method equals a direct Captum call on the same forward (one window = volume)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum import attr as ca

from method_helpers import make_context, make_net_batchnorm_relu, make_unet_instancenorm_prelu, run_method, structured_volume

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def setup():
    network = make_unet_instancenorm_prelu(in_channels=2)
    x = structured_volume(16, 2)
    return network, x


def _ctx(name, setup, params=None, **kw):
    network, x = setup
    spec, ctx = make_context(name, network, x, params, **kw)
    return spec, ctx, ctx.forward, ctx.forward_args


def _close(ours, theirs):
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs.detach(), **TOL)


def _upsample_share(layer_map, x):
    up = F.interpolate(layer_map, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)
    return (up / x.shape[1]).expand_as(x)


def test_saliency_and_input_x_gradient(setup):
    spec, ctx, f, args = _ctx("Saliency", setup)
    _close(run_method(spec, ctx)[0], ca.Saliency(f).attribute(ctx.inputs, additional_forward_args=args))
    spec, ctx, f, args = _ctx("Saliency", setup, {"absolute": False})
    _close(run_method(spec, ctx)[0], ca.Saliency(f).attribute(ctx.inputs, abs=False, additional_forward_args=args))
    spec, ctx, f, args = _ctx("InputXGradient", setup)
    _close(run_method(spec, ctx)[0], ca.InputXGradient(f).attribute(ctx.inputs, additional_forward_args=args))


def test_integrated_gradients_and_deeplift(setup):
    spec, ctx, f, args = _ctx("IntegratedGradients", setup, {"n_steps": 8, "adaptive": False})
    base = ctx.prepared["baselines"]
    _close(run_method(spec, ctx)[0], ca.IntegratedGradients(f).attribute(
        ctx.inputs, baselines=base, additional_forward_args=args, n_steps=8))


@pytest.fixture(scope="module")
def relu_setup():
    """DeepLift's references: Captum's hooks are right on nn.ReLU modules (on the PReLU/InstanceNorm
    UNet Captum keeps plain gradients; Testing/methods/test_method_dispatch_rules.py)."""
    return make_net_batchnorm_relu(in_channels=2), structured_volume(16, 2)


def test_deeplift_family_equals_captum_on_relu_network(relu_setup):
    spec, ctx, f, args = _ctx("DeepLift", relu_setup)
    _close(run_method(spec, ctx)[0], ca.DeepLift(f).attribute(
        ctx.inputs, baselines=ctx.prepared["baselines"], additional_forward_args=args))
    spec, ctx, f, args = _ctx("DeepLiftShap", relu_setup, {"n_baselines": 3})
    stack = torch.cat([ctx.prepared[k] for k in ("baselines", "baselines_1", "baselines_2")])
    _close(run_method(spec, ctx)[0], ca.DeepLiftShap(f).attribute(ctx.inputs, baselines=stack, additional_forward_args=args))
    network, x = relu_setup
    layer = dict(network.named_modules())["3"]
    spec, ctx, f, args = _ctx("LayerDeepLift", relu_setup, {"layer": "3"})
    theirs = ca.LayerDeepLift(f, layer).attribute(x, baselines=ctx.prepared["baselines"], additional_forward_args=args)
    _close(run_method(spec, ctx)[0], _upsample_share(theirs.sum(dim=1, keepdim=True), x))


def test_gradient_shap(setup):
    spec, ctx, f, args = _ctx("GradientShap", setup, {"n_baselines": 3, "n_samples": 5, "seed": 3})
    stack = torch.cat([ctx.prepared[k] for k in ("baselines", "baselines_1", "baselines_2")])
    np.random.seed(3)
    theirs = ca.GradientShap(f).attribute(ctx.inputs, baselines=stack, n_samples=5, stdevs=0.0, additional_forward_args=args)
    _close(run_method(spec, ctx)[0], theirs)


@pytest.mark.parametrize("name, nt_type", [("SmoothGrad", "smoothgrad"), ("SmoothGradSquared", "smoothgrad_sq"),
                                           ("VarGrad", "vargrad")])
def test_noise_tunnels_equal_captum_noise_tunnel(setup, name, nt_type):
    from EsegetaLib.methods.noise import stdev
    spec, ctx, f, args = _ctx(name, setup, {"nt_samples": 3}, seed=11)
    ours = run_method(spec, ctx)[0]
    torch.manual_seed(11)  # our generator was seeded 11: same normal draws as the global RNG
    theirs = ca.NoiseTunnel(ca.Saliency(f)).attribute(
        ctx.inputs, nt_type=nt_type, nt_samples=3, stdevs=stdev(ctx.stats, ctx.params), additional_forward_args=args)
    _close(ours, theirs)


def test_gradcam_and_layer_methods(setup):
    from EsegetaLib.methods.layers import resolve_layer
    network, x = setup
    _, layer = resolve_layer(network, None, x)
    spec, ctx, f, args = _ctx("GradCAM", setup)
    cam = ca.LayerGradCam(f, layer).attribute(x, additional_forward_args=args, relu_attributions=True)
    _close(run_method(spec, ctx)[0], _upsample_share(cam, x))
    cases = {
        "LayerActivation": lambda b: ca.LayerActivation(f, layer).attribute(x, additional_forward_args=args),
        "LayerGradientXActivation": lambda b: ca.LayerGradientXActivation(f, layer).attribute(x, additional_forward_args=args),
        "LayerConductance": lambda b: ca.LayerConductance(f, layer).attribute(x, baselines=b, n_steps=6, additional_forward_args=args),
        "InternalInfluence": lambda b: ca.InternalInfluence(f, layer).attribute(x, baselines=b, n_steps=6, additional_forward_args=args),
        "LayerIntegratedGradients": lambda b: ca.LayerIntegratedGradients(f, layer).attribute(
            x, baselines=b, n_steps=6, additional_forward_args=args),
    }
    for name, direct in cases.items():
        params = {"n_steps": 6} if name in ("LayerConductance", "InternalInfluence", "LayerIntegratedGradients") else {}
        if name in ("LayerConductance", "InternalInfluence", "LayerIntegratedGradients"):
            # Captum's fixed rule (adaptive: Testing/methods/test_adaptive_ig.py, test_layer_path_completeness.py)
            params["adaptive"] = False
        spec, ctx, _, _ = _ctx(name, setup, params)
        theirs = direct(ctx.prepared.get("baselines"))
        _close(run_method(spec, ctx)[0], _upsample_share(theirs.sum(dim=1, keepdim=True), x))
    spec, ctx, _, _ = _ctx("LayerGradientShap", setup, {"n_samples": 4, "n_baselines": 2})
    stack = torch.cat([ctx.prepared["baselines"], ctx.prepared["baselines_1"]])
    np.random.seed(0)
    theirs = ca.LayerGradientShap(f, layer).attribute(x, baselines=stack, n_samples=4, stdevs=0.0, additional_forward_args=args)
    _close(run_method(spec, ctx)[0], _upsample_share(theirs.sum(dim=1, keepdim=True), x))


def test_guided_gradcam_equals_captum_on_relu_network():
    network = make_net_batchnorm_relu(in_channels=2)
    x = structured_volume(16, 2)
    spec, ctx = make_context("GuidedGradCam", network, x, {"layer": "2"})  # layer where the CAM is non-zero
    theirs = ca.GuidedGradCam(ctx.forward, ctx.layer or dict(network.named_modules())["2"]).attribute(
        x, additional_forward_args=ctx.forward_args, interpolate_mode="trilinear")
    ours = run_method(spec, ctx)[0]
    assert float(ours.abs().max()) > 0
    _close(ours, theirs)


def test_perturbation_methods(setup):
    network, x = setup
    # same perturbations_per_eval as the engine's context (4): batched forwards round differently
    # Occlusion: 4^3 windows (window_fraction 0.25 of 16), stride = window
    spec, ctx, f, args = _ctx("Occlusion", setup, {"window_fraction": 0.25, "restrict_to_region": False})
    base = ctx.prepared["baselines"]
    theirs = ca.Occlusion(f).attribute(x, sliding_window_shapes=(2, 4, 4, 4), strides=(2, 4, 4, 4), baselines=base,
                                       additional_forward_args=args, perturbations_per_eval=4)
    _close(run_method(spec, ctx)[0], theirs)
    from EsegetaLib.methods.features import grid_mask
    mask = grid_mask((16, 16, 16), (8, 8, 8))
    spec, ctx, f, args = _ctx("FeatureAblation", setup, {"block_fraction": 0.5, "restrict_to_region": False})
    _close(run_method(spec, ctx)[0], ca.FeatureAblation(f).attribute(
        x, baselines=base, feature_mask=mask, additional_forward_args=args, perturbations_per_eval=4))
    for name, cls, kwargs in [("ShapleyValueSampling", ca.ShapleyValueSampling, {"n_samples": 2}),
                              ("Lime", ca.Lime, {"n_samples": 20}), ("KernelShap", ca.KernelShap, {"n_samples": 20})]:
        spec, ctx, f, args = _ctx(name, setup, dict(kwargs, block_fraction=0.5, restrict_to_region=False, seed=5))
        ours = run_method(spec, ctx)[0]
        torch.manual_seed(5)
        if name == "Lime":  # Lasso penalty 0.01 relative to |F(x) - F(b)|
            from captum._utils.models.linear_model import SkLearnLasso
            with torch.no_grad():
                scale = abs(float(f(x, *args) - f(base, *args)))
            torch.manual_seed(5)
            theirs = cls(f, interpretable_model=SkLearnLasso(alpha=0.01 * scale)).attribute(
                x, baselines=base, feature_mask=mask, additional_forward_args=args, perturbations_per_eval=4, **kwargs)
            _close(ours, theirs)
            continue
        theirs = cls(f).attribute(x, baselines=base, feature_mask=mask, additional_forward_args=args,
                        perturbations_per_eval=4, **kwargs)
        _close(ours, theirs)


@pytest.mark.parametrize("name, params", [
    ("GradientShap", {"n_samples": 3, "n_baselines": 2}), ("DeepLiftShap", {"n_baselines": 2}),
    ("IntegratedGradients", {"n_steps": 4}), ("LayerGradientShap", {"n_samples": 3, "n_baselines": 2}),
])
def test_a_batch_of_windows_equals_windows_one_by_one(name, params):
    """The engine batches windows; random paths and baseline distributions must not depend on it."""
    import dataclasses
    network = make_unet_instancenorm_prelu()
    x = torch.cat([structured_volume(8, seed=0), structured_volume(8, seed=1)])
    spec, ctx = make_context(name, network, x, params)
    batched = run_method(spec, ctx)[0]
    for b in range(2):
        single = dataclasses.replace(
            ctx, inputs=x[b:b + 1], forward_args=tuple(a[b:b + 1] for a in ctx.forward_args),
            prepared={k: v[b:b + 1] for k, v in ctx.prepared.items()})
        torch.testing.assert_close(batched[b:b + 1], run_method(spec, single)[0], rtol=1e-4, atol=1e-6)


def test_lime_is_scale_free(setup):
    """Captum's fixed Lasso alpha zeroes Lime on small scores; ours scales with |F(x) - F(b)|."""
    network, x = setup
    params = {"n_samples": 20, "block_fraction": 0.5, "restrict_to_region": False}
    spec, ctx, f, args = _ctx("Lime", setup, params)
    big = run_method(spec, ctx)[0]

    class Tiny(torch.nn.Module):
        def forward(self, inp, *a):
            return f(inp, *a) * 1e-4

    import dataclasses
    small = run_method(spec, dataclasses.replace(ctx, forward=Tiny()))[0]
    assert float(small.abs().max()) > 0
    torch.testing.assert_close(small, big * 1e-4, rtol=1e-3, atol=1e-9)
