"""DeepLift, DeepLiftShap and LayerDeepLift on the dispatcher-level rescale rules (methods/rescale.py).

Why not Captum's classes: they hook modules, so they fail on an activation module called more than
once and keep the plain gradient for PReLU, GELU, norm layers, functional activations, TorchScript and
exported programs (summation to delta 22-159 % off on such nets; issue #11).  The formulas are
Captum's (Shrikumar et al. 2017; DeepLiftShap = mean of DeepLift over a baseline distribution, Lundberg
& Lee 2017); only where the multipliers are computed differs.  On nets of `nn.ReLU` modules the maps
equal Captum's (tested).

Every result carries the trust checks "completeness" (|sum(attr) - (F(x) - F(x0))| / |F(x) - F(x0)|,
from the window sums; added by the engine's trust report) and "rectifier_rule" (non-linear backward
calls the rule changed / seen).  DeepLift and DeepLiftShap refuse a map whose completeness error
exceeds `tolerance`; LayerDeepLift reports it where the layer is a cut (every path crosses it), and
says it is undefined, with the share of the input gradient that bypasses the layer, elsewhere
(layer_methods.bypass_share).
"""
from __future__ import annotations

import torch

from ..errors import EsegetaError
from .base import MethodContext, ParamSpec
from .common import baseline_stack, baselines_of
from .guided import add_rule_check
from .rescale import rescale_gradients

TOLERANCE_PARAM = ParamSpec(
    "tolerance", "float", 0.01, minimum=0.0, maximum=1.0,
    help="largest relative summation-to-delta error accepted: |sum(attr) - (F(x) - F(x0))| / |F(x) - F(x0)|; "
         "a map beyond it is refused",
)


def completeness_of(ctx: MethodContext, attr: torch.Tensor, inputs: torch.Tensor, baselines: torch.Tensor):
    """Captum-convention diagnostics against the full-precision F (gradient.endpoint_scores)."""
    from .gradient import completeness, endpoint_scores
    return completeness(attr, *endpoint_scores(ctx, inputs, baselines))


def deep_lift(ctx: MethodContext):
    """(B, C, *S) attributions (x - x0) * m and diagnostics (delta, score change, rule counts)."""
    baselines = baselines_of(ctx)
    mult, diag, _ = rescale_gradients(ctx.forward, ctx.inputs, baselines, ctx.forward_args, "DeepLift")
    attr = (ctx.inputs - baselines) * mult
    diag.update(completeness_of(ctx, attr, ctx.inputs, baselines))
    return attr, diag


def deep_lift_shap(ctx: MethodContext):
    """Mean over the n baselines of DeepLift; one pass per baseline over the B windows (a program
    exported with a static batch runs as it did for the other methods)."""
    stack = baseline_stack(ctx)  # (n * B, C, *S), stacked per baseline key
    batch = ctx.inputs.shape[0]
    n = stack.shape[0] // batch
    from .gradient import completeness, endpoint_scores

    attr, f_x, f_b, diag = 0.0, 0.0, 0.0, {}
    for j in range(n):
        base = stack[j * batch:(j + 1) * batch]
        mult, counts, _ = rescale_gradients(ctx.forward, ctx.inputs, base, ctx.forward_args, "DeepLiftShap")
        attr = attr + (ctx.inputs - base) * mult / n
        fx, fb = endpoint_scores(ctx, ctx.inputs, base)
        f_x, f_b = f_x + fx / n, f_b + fb / n
        for key, value in counts.items():
            diag[key] = diag.get(key, 0) + value
    diag.update(completeness(attr, f_x, f_b))
    return attr, diag


def layer_deep_lift_map(ctx: MethodContext, layer: torch.nn.Module):
    """(B, K, *s) layer attributions (A(x) - A(x0)) * dF/dA with the rescale rules, and diagnostics."""
    baselines = baselines_of(ctx)
    _, diag, (a_x, a_b, grad) = rescale_gradients(
        ctx.forward, ctx.inputs, baselines, ctx.forward_args, "LayerDeepLift", layer=layer)
    attr = (a_x - a_b) * grad
    diag.update(completeness_of(ctx, attr, ctx.inputs, baselines))
    return attr, diag


def deep_lift_trust(result) -> None:
    """MethodSpec.trust of DeepLift and DeepLiftShap: refuse a map beyond the summation-to-delta
    tolerance (the engine's trust report adds the "completeness" check itself), and add the
    "rectifier_rule" check (non-linear backward calls the rule changed / seen)."""
    rel = (result.diagnostics or {}).get("relative_convergence_delta")
    tol = float((result.params or {}).get("tolerance", TOLERANCE_PARAM.default))
    if isinstance(rel, (int, float)) and rel > tol:
        raise EsegetaError(
            f"{result.name} misses summation to delta by {100 * rel:.3g} % on this model (tolerance "
            f"{100 * tol:.3g} %); use IntegratedGradients, or raise 'tolerance' knowingly."
        )
    add_rule_check(result)
