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


def layer_integrated_gradients(ctx):
    from captum.attr import LayerIntegratedGradients
    return _path_layer_method(ctx, LayerIntegratedGradients)


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
          extra=(STEPS_PARAM,), description="integrated gradients in the layer's activation space"),
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
