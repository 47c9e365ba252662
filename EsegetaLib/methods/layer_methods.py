"""Captum's layer attribution methods, reduced over the layer's channels and brought to the input grid.

Each returns the layer's attribution (B, K, *s) from Captum, combines the K channels
(`channel_reduce`: sum keeps completeness for conductance/IG/DeepLift), upsamples trilinearly to the
input grid and shares the map across the input channels.  Layer activations of a window depend on
the window's context, so the engine blends per-window maps ("blended"), an approximation.
"""
from __future__ import annotations

import numpy as np
import torch

from .adaptive import GUARD_PARAMS
from .base import MethodContext, MethodSpec, ParamSpec
from .baselines import BASELINE_PARAMS, prepare_baseline_distribution, prepare_baselines
from .common import CHANNEL_REDUCE_PARAM, LAYER_PARAM, baseline_stack, baselines_of, first_tensor, reduce_channels, steps_batch, to_input_grid
from .deeplift import layer_deep_lift_map
from .guided import add_rule_check
from .layers import layer_for

LAYER_APPROX = ("computed per window and blended with the window weights; a window's layer activations "
                "depend on its context, so this approximates the whole-volume layer map")
ADAPTIVE_PARAMS = (
    ParamSpec("n_steps", "int", 16, minimum=2, maximum=1024,
              help="integration steps: where adaptive refinement starts, or the fixed number when adaptive is off"),
    ParamSpec("adaptive", "bool", True, help="subdivide the path until the completeness error is within 'tolerance'"),
    ParamSpec("tolerance", "float", 0.01, minimum=1e-6, maximum=1.0, help="relative completeness error aimed at"),
    ParamSpec("max_steps", "int", 512, minimum=4, maximum=8192, help="cap on the gradient evaluations per window"),
) + GUARD_PARAMS


REFINED_PARAMS = (
    ParamSpec("n_steps", "int", 16, minimum=2, maximum=1024,
              help="integration steps: the first of the doublings, or the fixed number when adaptive is off"),
    ParamSpec("adaptive", "bool", True,
              help="double the steps until the map changes by at most 'tolerance' between doublings"),
    ParamSpec("tolerance", "float", 0.01, minimum=1e-6, maximum=1.0,
              help="relative L2 change of the layer map between successive doublings aimed at"),
    ParamSpec("max_steps", "int", 128, minimum=4, maximum=8192, help="cap on the steps of the last doubling"),
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


REFINE_CAP = 128  # steps of the last doubling at most (16+32+64+128 = 240 evaluations per window)


def _refined(ctx, captum_class, why: str):
    """A Captum path method whose sum has no completeness reference, its step count doubled from
    `n_steps` until the layer map changes by at most `tolerance` (relative L2 norm, over the window
    batch) between successive doublings, or the next doubling would pass min(`max_steps`, REFINE_CAP)
    (a cap: without a reference, more steps buy convergence of the map only).  `adaptive`
    off: `n_steps` fixed.  Diagnostics: steps used, the last relative change, and `completeness_undefined`
    (`why`) for the trust report."""
    steps, spent = int(ctx.params["n_steps"]), 0
    layer = layer_for(ctx)
    explainer = captum_class(ctx.forward, layer)
    previous, change = None, None
    while True:
        attr = first_tensor(explainer.attribute(
            ctx.inputs, baselines=baselines_of(ctx), additional_forward_args=_args(ctx), n_steps=steps,
            internal_batch_size=steps_batch(ctx, ctx.inputs.shape[0], steps))).detach()
        spent += steps
        if previous is not None:
            change = float((attr - previous).double().norm() / attr.double().norm().clamp_min(1e-30))
        if not ctx.params.get("adaptive", False) or (change is not None and change <= ctx.params["tolerance"]) \
                or 2 * steps > min(ctx.params["max_steps"], REFINE_CAP):
            break
        previous, steps = attr, 2 * steps
    batch = ctx.inputs.shape[0]
    diag = {"steps_total": spent * batch, "steps_max": spent, "path_examples": batch,
            "steps_final_max": steps, "completeness_undefined": why}
    if change is not None:
        diag["refinement_change_max"] = change
        diag["refinement_unconverged"] = int(change > ctx.params["tolerance"])
    return attr, diag


def bypass_share(ctx, layer) -> float:
    """Share of the score's input gradient that flows around `layer`, largest over the baseline, the
    path's midpoint and the input: ||g_around||_1 / (||g_around||_1 + ||g_through||_1), where
    g_around = dF/dx with the layer's output held fixed (detached) and g_through = dF/dx - g_around.
    0 exactly when every path from the input to the score crosses the layer (a cut: the layer is
    the network's first block, or its output feeds the rest of a chain); MONAI UNets' skips make it
    large for inner layers.  Completeness of conductance (sum over units = F(x) - F(baseline))
    holds only for a cut (Dhamdhere et al. 2019, "How important is a neuron?")."""
    args = tuple(ctx.forward_args or ())
    base = baselines_of(ctx)
    worst = 0.0
    for alpha in (0.0, 0.5, 1.0):
        point = (base + alpha * (ctx.inputs - base)).detach()
        with torch.enable_grad():
            x = point.clone().requires_grad_(True)
            total = torch.autograd.grad(ctx.forward(x, *args).sum(), x)[0].double()
            x = point.clone().requires_grad_(True)
            around = _layer_output(lambda v: ctx.forward(v, *args), layer, x,
                                   replacement=None, detach=True)
            if not around.requires_grad:
                continue  # nothing reaches the score except through the layer
            g = torch.autograd.grad(around.sum(), x, allow_unused=True)[0]
        if g is None:
            continue
        g = g.double()
        a, t = float(g.abs().sum()), float((total - g).abs().sum())
        worst = max(worst, a / max(a + t, 1e-300))
    return worst


def _conductance_integrand(ctx, layer):
    """Per layer unit, d/da of the path through the layer: dF/dA(x(a)) * dA(x(a))/da, the tangent
    dA/da = J_A (x - b) by forward-mode AD (torch.func.jvp), dF/dA by reverse mode.  Its sum over
    units is dF(x(a))/da on a cut, so its integral is conductance with an exact reference."""
    def integrand(points, directions, *rest):
        call = lambda v: ctx.forward(v, *rest)
        _, tangent = torch.func.jvp(lambda v: _layer_output(call, layer, v), (points,), (directions,))
        store = {}

        def keep(module, inputs, output):
            store["A"] = first_tensor(output)

        handle = layer.register_forward_hook(keep)
        try:
            with torch.enable_grad():
                score = call(points.detach().requires_grad_(True))
                grad = torch.autograd.grad(score.sum(), store["A"])[0]
        finally:
            handle.remove()
        return score.detach(), grad.detach() * tangent.detach()
    return integrand


def layer_conductance(ctx):
    """Captum's LayerConductance (Dhamdhere et al. 2019): per unit, int dF/dA dA/da da along the
    baseline-to-input path.  On a layer every path crosses (`bypass_share` 0) its sum is F(x) -
    F(baseline): integrated adaptively (methods/adaptive.py, forward-mode tangents) with that
    completeness check.  Where skips bypass the layer the sum misses the bypassing part whatever the
    steps: completeness is undefined (the trust report says so with the bypassing share) and the steps
    are refined until the map converges (`_refined`)."""
    from captum.attr import LayerConductance

    layer = layer_for(ctx)
    share = bypass_share(ctx, layer)
    if share > 0.0 or not ctx.params.get("adaptive", False):
        attr, diag = _refined(ctx, LayerConductance, CONDUCTANCE_UNDEFINED.format(name="LayerConductance", share=share) if share > 0 else
                              "adaptive off: fixed steps with no completeness check")
        diag["layer_bypass_share_max"] = share
        return _finish(ctx, attr), diag
    from .adaptive import adaptive_integrated_gradients

    attr, diag = adaptive_integrated_gradients(
        ctx.forward, ctx.inputs, baselines_of(ctx), tuple(ctx.forward_args or ()),
        tolerance=ctx.params["tolerance"], initial_steps=ctx.params["n_steps"], max_steps=ctx.params["max_steps"],
        batch=steps_batch(ctx, ctx.inputs.shape[0], ctx.params["max_steps"]),
        integrand=_conductance_integrand(ctx, layer))
    diag["layer_bypass_share_max"] = 0.0
    return _finish(ctx, attr), diag


CONDUCTANCE_UNDEFINED = ("completeness is undefined for {name} at this layer: {share:.1%} of the input gradient "
                         "bypasses it (skip connections), so the layer's attributions cannot sum to F(x) - F(baseline); "
                         "choose a layer every path crosses, or LayerIntegratedGradients (its own completeness)")
INFLUENCE_UNDEFINED = ("InternalInfluence has no completeness property: it integrates the layer's gradient along the "
                       "path without multiplying by the activation change")


def internal_influence(ctx):
    """Captum's InternalInfluence (Leino et al. 2018): the layer gradient integrated along the path.
    No completeness reference exists; the steps are doubled until the map converges (`_refined`)."""
    from captum.attr import InternalInfluence
    attr, diag = _refined(ctx, InternalInfluence, INFLUENCE_UNDEFINED)
    return _finish(ctx, attr), diag


def _layer_output(network_call, layer, x, replacement=None, detach=False):
    """The layer's output on x (first tensor), or the score with the layer's output replaced
    (`replacement()`), or held fixed (`detach`: every call of the layer gives its output detached)."""
    store = {}

    def hook(module, args, output):
        if detach:
            if isinstance(output, (tuple, list)):
                return type(output)(o.detach() if isinstance(o, torch.Tensor) else o for o in output)
            return output.detach()
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
    return out if (replacement is not None or detach) else store["A"]


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
    layer = layer_for(ctx)
    attr, diag = layer_deep_lift_map(ctx, layer)
    # summation to delta at a layer holds where every path crosses it; elsewhere the trust report
    # says it is undefined, with the bypassing share, instead of a misleading warning (75-160 % on
    # MONAI UNets' default layers, docs/readme/architectures.md)
    share = bypass_share(ctx, layer)
    diag["layer_bypass_share_max"] = share
    if share > 0.0:
        diag["completeness_undefined"] = CONDUCTANCE_UNDEFINED.format(name="LayerDeepLift", share=share)
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
    _spec("LayerConductance", layer_conductance, "LayerConductance", 32.0, baseline=True, extra=ADAPTIVE_PARAMS,
          description="conductance of the layer's units along the baseline-to-input path; adaptive with a "
                      "completeness check on a layer every path crosses, else completeness stated undefined"),
    _spec("InternalInfluence", internal_influence, "InternalInfluence", 32.0, baseline=True, extra=REFINED_PARAMS,
          description="integrated gradient of the score w.r.t. the layer along the input path (no completeness "
                      "property; steps doubled until the map converges)"),
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
