"""Captum's layer attribution methods, reduced over the layer's channels and brought to the input grid.

Each returns the layer's attribution (B, K, *s) from Captum, combines the K channels
(`channel_reduce`: sum keeps completeness for conductance/IG/DeepLift), upsamples trilinearly to the
input grid and shares the map across the input channels.  Layer activations of a window depend on
the window's context, so the engine blends per-window maps ("blended"), an approximation.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import MethodContext, MethodSpec, ParamSpec
from .baselines import BASELINE_PARAMS, prepare_baseline_distribution, prepare_baselines
from .common import CHANNEL_REDUCE_PARAM, LAYER_PARAM, baseline_stack, baselines_of, first_tensor, reduce_channels, steps_batch, to_input_grid
from .deeplift import layer_deep_lift_map
from .guided import add_rule_check
from .layers import layer_for

LAYER_APPROX = ("computed per window and blended with the window weights; a window's layer activations "
                "depend on its context, so this approximates the whole-volume layer map")
STEPS_PARAM = ParamSpec("n_steps", "int", 32, minimum=2, maximum=1024, help="integration steps")
ADAPTIVE_PARAMS = (
    ParamSpec("n_steps", "int", 16, minimum=2, maximum=1024,
              help="integration steps: where adaptive refinement starts, or the fixed number when adaptive is off"),
    ParamSpec("adaptive", "bool", True, help="subdivide the path until the completeness error is within 'tolerance'"),
    ParamSpec("tolerance", "float", 0.01, minimum=1e-6, maximum=1.0, help="relative completeness error aimed at"),
    ParamSpec("max_steps", "int", 512, minimum=4, maximum=8192, help="cap on the gradient evaluations per window"),
)


def _args(ctx):
    return ctx.forward_args if ctx.forward_args else None


def _finish(ctx: MethodContext, layer_attr) -> torch.Tensor:
    return to_input_grid(reduce_channels(first_tensor(layer_attr), ctx.params["channel_reduce"]), ctx.inputs,
                         ctx.layer_geometry)


def layer_activation(ctx):
    from captum.attr import LayerActivation
    return _finish(ctx, LayerActivation(ctx.forward, layer_for(ctx)).attribute(ctx.inputs, additional_forward_args=_args(ctx)))


def layer_gradient_x_activation(ctx):
    from captum.attr import LayerGradientXActivation
    return _finish(ctx, LayerGradientXActivation(ctx.forward, layer_for(ctx)).attribute(
        ctx.inputs, additional_forward_args=_args(ctx)))


def _path_layer_method(ctx, captum_class):
    """LayerConductance, InternalInfluence, LayerIntegratedGradients: one call shape, n_steps on a path."""
    steps = ctx.params["n_steps"]
    return _finish(ctx, captum_class(ctx.forward, layer_for(ctx)).attribute(
        ctx.inputs, baselines=baselines_of(ctx), additional_forward_args=_args(ctx), n_steps=steps,
        internal_batch_size=steps_batch(ctx, ctx.inputs.shape[0], steps)))


def layer_conductance(ctx):
    from captum.attr import LayerConductance
    return _path_layer_method(ctx, LayerConductance)


def internal_influence(ctx):
    from captum.attr import InternalInfluence
    return _path_layer_method(ctx, InternalInfluence)


def _layer_output(network_call, layer, x, replacement=None):
    """The layer's output on x (first tensor), or the score with the layer's output replaced."""
    store = {}

    def hook(module, args, output):
        if replacement is not None:
            value = replacement()
            if isinstance(output, (tuple, list)):
                return type(output)([value] + list(output[1:]))
            return value
        store["A"] = first_tensor(output)

    handle = layer.register_forward_hook(hook)
    try:
        out = network_call(x)
    finally:
        handle.remove()
    return out if replacement is not None else store["A"]


def layer_integrated_gradients(ctx):
    """Adaptive by default: Integrated Gradients in the layer's activation space (Captum's
    LayerIntegratedGradients definition: the layer's output A moves from A(baseline) to A(x) while
    the rest of the network sees x), integrated by methods/adaptive.py until the completeness
    error against its own reference F(x; A(x)) - F(x; A(baseline)) is within `tolerance` (for
    networks whose skips bypass the layer this is not F(x) - F(baseline), the reference Captum's
    delta uses). `adaptive=False`: Captum's LayerIntegratedGradients with `n_steps` nodes."""
    if not ctx.params.get("adaptive", False):
        from captum.attr import LayerIntegratedGradients
        return _path_layer_method(ctx, LayerIntegratedGradients)
    from .adaptive import adaptive_integrated_gradients

    layer = layer_for(ctx)
    args = tuple(ctx.forward_args or ())
    with torch.no_grad():
        a_x = _layer_output(lambda v: ctx.forward(v, *args), layer, ctx.inputs).detach()
        a_b = _layer_output(lambda v: ctx.forward(v, *args), layer, baselines_of(ctx)).detach()

    def layer_forward(points, x, *rest):
        return _layer_output(lambda v: ctx.forward(v, *rest), layer, x, replacement=lambda: points)

    attr, diag = adaptive_integrated_gradients(
        layer_forward, a_x, a_b, (ctx.inputs,) + args, tolerance=ctx.params["tolerance"],
        initial_steps=ctx.params["n_steps"], max_steps=ctx.params["max_steps"],
        batch=steps_batch(ctx, ctx.inputs.shape[0], ctx.params["max_steps"]))
    return _finish(ctx, attr), diag


def layer_deep_lift(ctx):
    """DeepLift at the layer with the dispatcher-level rescale rules (methods/deeplift.py): works with
    reused activation modules, functional and in-place activations, norm layers."""
    attr, diag = layer_deep_lift_map(ctx, layer_for(ctx))
    return _finish(ctx, attr), diag


def layer_gradient_shap(ctx):
    """Per example (each window has its own slice of the baseline distribution), numpy seeded
    identically so every window follows the same random paths (see gradient.gradient_shap)."""
    from captum.attr import LayerGradientShap
    explainer = LayerGradientShap(ctx.forward, layer_for(ctx))
    stack = baseline_stack(ctx)
    batch = ctx.inputs.shape[0]
    stack = stack.view(stack.shape[0] // batch, batch, *ctx.inputs.shape[1:])
    outs = []
    for b in range(batch):
        args = tuple(a[b:b + 1] if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch else a
                     for a in (ctx.forward_args or ()))
        state = np.random.get_state()
        try:
            np.random.seed(int(ctx.params["seed"]))
            outs.append(first_tensor(explainer.attribute(
                ctx.inputs[b:b + 1], baselines=stack[:, b], n_samples=ctx.params["n_samples"], stdevs=0.0,
                additional_forward_args=args or None)))
        finally:
            np.random.set_state(state)
    return _finish(ctx, torch.cat(outs, dim=0))


COMMON = (LAYER_PARAM, CHANNEL_REDUCE_PARAM)


def _spec(name, attribute, captum, cost, signed=True, baseline=False, extra=(), prepare=None, description="",
          trust=None):
    return MethodSpec(
        name=name, family="layer", signed=signed, needs_baseline=baseline, needs_layer=True, cost=cost,
        patching="blended", params=COMMON + tuple(extra) + (BASELINE_PARAMS if baseline else ()),
        attribute=attribute, captum=captum, approximation=LAYER_APPROX,
        prepare=prepare if prepare else (prepare_baselines if baseline else None), description=description,
        trust=trust,
    )


SPECS = [
    _spec("LayerActivation", layer_activation, "LayerActivation", 0.5,
          description="the layer's activations (channel sum), upsampled"),
    _spec("LayerGradientXActivation", layer_gradient_x_activation, "LayerGradientXActivation", 1.0,
          description="layer activation times its gradient"),
    _spec("LayerConductance", layer_conductance, "LayerConductance", 32.0, baseline=True, extra=(STEPS_PARAM,),
          description="conductance of the layer's units along the baseline-to-input path"),
    _spec("InternalInfluence", internal_influence, "InternalInfluence", 32.0, baseline=True, extra=(STEPS_PARAM,),
          description="integrated gradient of the score w.r.t. the layer along the input path"),
    _spec("LayerIntegratedGradients", layer_integrated_gradients, "LayerIntegratedGradients", 32.0, baseline=True,
          extra=ADAPTIVE_PARAMS, description="integrated gradients in the layer's activation space"),
    _spec("LayerDeepLift", layer_deep_lift, "LayerDeepLift", 2.0, baseline=True, trust=add_rule_check,
          description="DeepLift attributions to the layer's units (dispatcher-level rescale rules)"),
    _spec("LayerGradientShap", layer_gradient_shap, "LayerGradientShap", 16.0, baseline=True,
          extra=(ParamSpec("n_samples", "int", 16, minimum=1, maximum=1024, help="random path samples"),
                 ParamSpec("seed", "int", 0, minimum=0, maximum=2 ** 31 - 1, help="seed of the path samples"),
                 ParamSpec("n_baselines", "int", 4, minimum=1, maximum=64, help="baselines in the distribution"),
                 ParamSpec("baseline_noise", "float", 0.1, minimum=0.0, maximum=2.0,
                           help="stdev of the baseline distribution, fraction of the intensity range")),
          prepare=prepare_baseline_distribution, description="expected gradients at the layer"),
]
