"""Gradient-family methods wrapped from Captum, plus guided backprop/deconvolution for any rectifier.

All of them are linear in the score's gradient, so the engine runs them "additive": the map of the
blended sliding-window model is the sum of the per-patch maps (DESIGN.md "What a patched run
explains"); `finalize` (e.g. Saliency's absolute value) is applied once to that sum.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict

import numpy as np
import torch

from .adaptive import GUARD_PARAMS
from .base import MethodContext, MethodSpec, ParamSpec
from .baselines import BASELINE_PARAMS, prepare_baseline_distribution, prepare_baselines
from .common import baseline_stack, baselines_of, steps_batch
from .deeplift import TOLERANCE_PARAM, deep_lift, deep_lift_shap, deep_lift_trust
from .guided import rectified_gradients, rectified_trust


def _args(ctx: MethodContext):
    return ctx.forward_args if ctx.forward_args else None


def _abs_if(flag: str):
    def finalize(attr: torch.Tensor, params: Dict[str, Any]) -> torch.Tensor:
        return attr.abs() if params.get(flag, False) else attr
    return finalize


# --- Saliency / InputXGradient -------------------------------------------------------------------

def saliency(ctx: MethodContext):
    from captum.attr import Saliency
    # signed per patch; the absolute value (Captum's default) is taken once on the summed map
    return Saliency(ctx.forward).attribute(ctx.inputs, abs=False, additional_forward_args=_args(ctx))


def input_x_gradient(ctx: MethodContext):
    from captum.attr import InputXGradient
    return InputXGradient(ctx.forward).attribute(ctx.inputs, additional_forward_args=_args(ctx))


# --- Integrated Gradients ------------------------------------------------------------------------

def completeness(attr: torch.Tensor, score_x: torch.Tensor, score_b: torch.Tensor) -> Dict[str, float]:
    """Diagnostics of a path method, in Captum's convention so that they add up over windows:
    `convergence_delta` = sum(attr) - (F(x) - F(b)) (signed, absolute) and `score_change` =
    F(x) - F(b) both sum over windows (F of the patched model is the sum of window scores);
    `relative_convergence_delta` = |delta| / |F(x) - F(b)| is recomputed from the sums
    (`merge_diagnostics`, or the engine's own equivalent)."""
    change = float((score_x - score_b).double().sum())
    delta = float(attr.double().sum()) - change
    return {
        "convergence_delta": delta,
        "score_change": change,
        "relative_convergence_delta": abs(delta) / max(abs(change), 1e-12),
    }


def merge_diagnostics(parts):
    """Combine per-window diagnostics of an additive path method: sum the additive keys, then the
    relative delta from the sums."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    delta = sum(float(p["convergence_delta"]) for p in parts)
    change = sum(float(p["score_change"]) for p in parts)
    return {"convergence_delta": delta, "score_change": change,
            "relative_convergence_delta": abs(delta) / max(abs(change), 1e-12)}


def endpoint_scores(ctx: MethodContext, *inputs: torch.Tensor):
    """F of each input without gradient and in full precision (autocast off where the forward
    allows it): completeness compares a map with the change of the function being explained, the
    full-precision model, even when the map was computed under bf16 autocast."""
    exact = getattr(ctx.forward, "full_precision", None)
    args = ctx.forward_args or ()
    with torch.no_grad(), (exact() if exact is not None else contextlib.nullcontext()):
        return [ctx.forward(x, *args) for x in inputs]


def integrated_gradients(ctx: MethodContext):
    """Adaptive by default (methods/adaptive.py: subdivided where the integrand changes fastest until
    the completeness error is within `tolerance` or `max_steps`); `adaptive=False`: Captum's
    IntegratedGradients with `n_steps` nodes of the `integration` rule."""
    steps = ctx.params["n_steps"]
    baselines = baselines_of(ctx)
    if ctx.params.get("adaptive", False):
        from .adaptive import adaptive_integrated_gradients
        return adaptive_integrated_gradients(
            ctx.forward, ctx.inputs, baselines, ctx.forward_args or (), tolerance=ctx.params["tolerance"],
            initial_steps=steps, max_steps=ctx.params["max_steps"],
            batch=steps_batch(ctx, ctx.inputs.shape[0], ctx.params["max_steps"]),
            budgets=ctx.prepared.get("delta_budget"), ends=ctx.prepared.get("path_ends"))
    from captum.attr import IntegratedGradients
    attr = IntegratedGradients(ctx.forward).attribute(
        ctx.inputs, baselines=baselines, additional_forward_args=_args(ctx), n_steps=steps,
        method=ctx.params["integration"], internal_batch_size=steps_batch(ctx, ctx.inputs.shape[0], steps),
    )
    diag = completeness(attr, *endpoint_scores(ctx, ctx.inputs, baselines))
    return attr, diag


# --- GradientShap (DeepLift and DeepLiftShap: methods/deeplift.py) ---------------------------------

def _per_example(ctx: MethodContext, run):
    """Distribution-of-baselines methods take one shared baseline set per call: patches have their
    own baseline slices, so run example by example."""
    stack = baseline_stack(ctx)  # (n * B, C, *S) stacked per key
    batch = ctx.inputs.shape[0]
    n = stack.shape[0] // batch
    stack = stack.view(n, batch, *ctx.inputs.shape[1:])
    outs = []
    for b in range(batch):
        args = tuple(a[b:b + 1] if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch else a
                     for a in (ctx.forward_args or ()))
        outs.append(run(ctx.inputs[b:b + 1], stack[:, b], args or None))
    return torch.cat(outs, dim=0)


def gradient_shap(ctx: MethodContext):
    """Captum GradientShap with stdevs=0: the input noise is already in the globally drawn baseline
    distribution, and numpy's RNG (which Captum uses for baseline indices and path positions) is
    seeded identically for every patch so that all patches integrate along the same random paths."""
    from captum.attr import GradientShap
    explainer = GradientShap(ctx.forward)
    seed = int(ctx.params["seed"])

    def run(x, base, args):
        state = np.random.get_state()
        try:
            np.random.seed(seed)
            return explainer.attribute(x, baselines=base, n_samples=ctx.params["n_samples"], stdevs=0.0,
                                       additional_forward_args=args)
        finally:
            np.random.set_state(state)

    return _per_example(ctx, run)


# --- Guided backprop / deconvolution (any rectifier) ---------------------------------------------

def guided_backprop(ctx: MethodContext):
    return rectified_gradients(ctx.forward, ctx.inputs, ctx.forward_args, "guided", "GuidedBackprop")


def deconvolution(ctx: MethodContext):
    return rectified_gradients(ctx.forward, ctx.inputs, ctx.forward_args, "deconvolution", "Deconvolution")


ABS_PARAM = ParamSpec("absolute", "bool", True, help="absolute value of the gradient (Captum's default)")
SHAP_PARAMS = (
    ParamSpec("n_baselines", "int", 4, minimum=1, maximum=64, help="baselines in the reference distribution"),
    ParamSpec("baseline_noise", "float", 0.1, minimum=0.0, maximum=2.0,
              help="stdev of the Gaussian spread of the reference distribution, fraction of the intensity range"),
)

SPECS = [
    MethodSpec(
        name="Saliency", family="gradient", signed=False, needs_baseline=False, needs_layer=False, cost=1.0,
        patching="additive", params=(ABS_PARAM,), attribute=saliency, finalize=_abs_if("absolute"),
        captum="Saliency", description="gradient of the target score (absolute by default)",
    ),
    MethodSpec(
        name="InputXGradient", family="gradient", signed=True, needs_baseline=False, needs_layer=False, cost=1.0,
        patching="additive", params=(), attribute=input_x_gradient, captum="InputXGradient",
        description="input times gradient",
    ),
    MethodSpec(
        name="IntegratedGradients", family="gradient", signed=True, needs_baseline=True, needs_layer=False,
        cost=32.0, patching="additive",
        params=(ParamSpec("n_steps", "int", 16, minimum=2, maximum=1024,
                          help="integration steps: where adaptive refinement starts, or the fixed number "
                               "when adaptive is off"),
                ParamSpec("adaptive", "bool", True,
                          help="subdivide the path where the gradient changes fastest until the completeness "
                               "error is within 'tolerance' (or 'max_steps' is reached; the result says so)"),
                ParamSpec("tolerance", "float", 0.01, minimum=1e-6, maximum=1.0,
                          help="relative completeness error |sum(attr) - (F(x) - F(b))| / |F(x) - F(b)| aimed at"),
                ParamSpec("max_steps", "int", 512, minimum=4, maximum=8192,
                          help="cap on the gradient evaluations per window (adaptive)"),
                ParamSpec("integration", "choice", "gausslegendre",
                          choices=("gausslegendre", "riemann_trapezoid", "riemann_middle", "riemann_left", "riemann_right"),
                          help="quadrature rule when adaptive is off (adaptive uses Gauss-Lobatto on sub-intervals)"),
                ) + GUARD_PARAMS + BASELINE_PARAMS,
        attribute=integrated_gradients, prepare=prepare_baselines, captum="IntegratedGradients",
        description="path integral of gradients from a baseline, adaptive until the completeness error is "
                    "within tolerance (default 1 %), else the next baseline, else refused; reports the steps "
                    "used, the baseline and the relative convergence delta",
    ),
    MethodSpec(
        name="GuidedBackprop", family="gradient", signed=True, needs_baseline=False, needs_layer=False, cost=1.0,
        patching="additive", params=(), attribute=guided_backprop, captum=None, trust=rectified_trust,
        description="guided backpropagation through every rectifier (ReLU, PReLU, LeakyReLU, ELU, GELU, SiLU, functional)",
    ),
    MethodSpec(
        name="Deconvolution", family="gradient", signed=True, needs_baseline=False, needs_layer=False, cost=1.0,
        patching="additive", params=(), attribute=deconvolution, captum=None, trust=rectified_trust,
        description="deconvnet rule (relu of the backward signal) through every rectifier",
    ),
    MethodSpec(
        name="DeepLift", family="gradient", signed=True, needs_baseline=True, needs_layer=False, cost=2.0,
        patching="additive", params=(TOLERANCE_PARAM,) + BASELINE_PARAMS, attribute=deep_lift,
        prepare=prepare_baselines, captum="DeepLift", trust=deep_lift_trust,
        description="DeepLift rescale rule on every non-linear op at the dispatcher (any model format); "
                    "refused beyond the summation-to-delta tolerance or naming an op without a rule",
    ),
    MethodSpec(
        name="DeepLiftShap", family="gradient", signed=True, needs_baseline=True, needs_layer=False, cost=8.0,
        patching="additive", params=SHAP_PARAMS + (TOLERANCE_PARAM,) + BASELINE_PARAMS, attribute=deep_lift_shap,
        prepare=prepare_baseline_distribution, captum="DeepLiftShap", trust=deep_lift_trust,
        description="DeepLift (dispatcher-level rescale rules) averaged over a distribution of baselines",
    ),
    MethodSpec(
        name="GradientShap", family="gradient", signed=True, needs_baseline=True, needs_layer=False, cost=16.0,
        patching="additive",
        params=(ParamSpec("n_samples", "int", 16, minimum=1, maximum=1024, help="random path samples"),
                ParamSpec("seed", "int", 0, minimum=0, maximum=2 ** 31 - 1, help="seed of the path samples"),)
        + SHAP_PARAMS + BASELINE_PARAMS,
        attribute=gradient_shap, prepare=prepare_baseline_distribution, captum="GradientShap",
        description="expected gradients over random baselines and path positions",
    ),
]
