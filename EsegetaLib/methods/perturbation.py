"""Perturbation methods (Captum): Occlusion, FeatureAblation, ShapleyValueSampling, Lime, KernelShap.

They run "global": called once with the whole volume and a forward that evaluates the patched
model's score (the engine reruns only the windows a perturbation touches), so they are exact for the
sliding-window model.  Windows, strides and feature blocks are sized in mm or as a fraction of the
volume (never Captum's stride 1), and by default the perturbations stay in the target region's
bounding box plus a margin.
"""
from __future__ import annotations

import math

import torch

from ..errors import EsegetaError
from .base import MethodContext, MethodSpec, ParamSpec
from .baselines import BASELINE_PARAMS, prepare_baselines
from .features import REGION_PARAMS, crop_problem, feature_mask, feature_params, uncrop


def _args(ctx):
    return ctx.forward_args if ctx.forward_args else None


def _per_eval(ctx) -> int:
    return max(1, int(ctx.internal_batch_size or 1))


def occlusion_window(ctx: MethodContext):
    """(window, stride) in voxels per spatial axis."""
    mm = float(ctx.params.get("window_mm") or 0.0)
    if mm > 0:
        window = [max(1, int(round(mm / float(s)))) for s in ctx.stats.spacing]
    else:
        window = [max(1, int(math.ceil(ctx.params["window_fraction"] * n))) for n in ctx.stats.shape]
    window = [min(w, n) for w, n in zip(window, ctx.inputs.shape[2:])]
    stride = [max(1, int(round(ctx.params["stride_fraction"] * w))) for w in window]
    return tuple(window), tuple(stride)


def occlusion(ctx: MethodContext):
    from captum.attr import Occlusion
    forward, crop, base, box, cropped = crop_problem(ctx)
    window, stride = occlusion_window(ctx)
    window = tuple(min(w, n) for w, n in zip(window, crop.shape[2:]))
    channels = crop.shape[1]
    attr = Occlusion(forward).attribute(
        crop, sliding_window_shapes=(channels,) + window, strides=(channels,) + stride, baselines=base,
        additional_forward_args=_args(ctx), perturbations_per_eval=_per_eval(ctx))
    return uncrop(attr, ctx.inputs, box) if cropped else attr


def _with_features(ctx: MethodContext, run):
    forward, crop, base, box, cropped = crop_problem(ctx)
    mask = feature_mask(crop, ctx.stats, ctx.params)
    attr = run(forward, crop, base, mask)
    return uncrop(attr, ctx.inputs, box) if cropped else attr


def feature_ablation(ctx):
    from captum.attr import FeatureAblation
    return _with_features(ctx, lambda f, x, b, m: FeatureAblation(f).attribute(
        x, baselines=b, feature_mask=m, additional_forward_args=_args(ctx), perturbations_per_eval=_per_eval(ctx)))


def shapley(ctx):
    from captum.attr import ShapleyValueSampling

    def run(f, x, b, m):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(ctx.params["seed"]))  # Captum permutes features with torch's RNG
            return ShapleyValueSampling(f).attribute(
                x, baselines=b, feature_mask=m, n_samples=ctx.params["n_samples"],
                additional_forward_args=_args(ctx), perturbations_per_eval=_per_eval(ctx))
    return _with_features(ctx, run)


def _need_sklearn(method):
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise EsegetaError(f"{method} fits its surrogate with scikit-learn: pip install scikit-learn") from None


def score_scale(forward, x, baseline, args) -> float:
    """|F(x) - F(baseline)|: the size of the total effect the features share (never 0)."""
    with torch.no_grad():
        fx = float(forward(x, *(args or ())).double().sum())
        fb = float(forward(baseline, *(args or ())).double().sum())
    return max(abs(fx - fb), 1e-6 * max(abs(fx), 1.0))


def lime(ctx):
    """Captum Lime with a Lasso penalty relative to the score's scale: Captum's fixed alpha=0.01 on
    raw scores zeroes every coefficient when a small region's score changes by less than that
    (alpha * s on the raw scores = alpha on scores divided by s = |F(x) - F(b)|)."""
    from captum._utils.models.linear_model import SkLearnLasso
    from captum.attr import Lime
    _need_sklearn("Lime")

    def run(f, x, b, m):
        alpha = float(ctx.params["lasso_alpha"]) * score_scale(f, x, b, _args(ctx))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(ctx.params["seed"]))
            return Lime(f, interpretable_model=SkLearnLasso(alpha=alpha)).attribute(
                x, baselines=b, feature_mask=m, n_samples=ctx.params["n_samples"],
                additional_forward_args=_args(ctx), perturbations_per_eval=_per_eval(ctx))
    return _with_features(ctx, run)


def kernel_shap(ctx):
    from captum.attr import KernelShap
    _need_sklearn("KernelShap")

    def run(f, x, b, m):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(ctx.params["seed"]))
            return KernelShap(f).attribute(x, baselines=b, feature_mask=m, n_samples=ctx.params["n_samples"],
                                           additional_forward_args=_args(ctx), perturbations_per_eval=_per_eval(ctx))
    return _with_features(ctx, run)


SEED = ParamSpec("seed", "int", 0, minimum=0, maximum=2 ** 31 - 1, help="random seed of the sampling")

SPECS = [
    MethodSpec(
        name="Occlusion", family="perturbation", signed=True, needs_baseline=True, needs_layer=False, cost=171.0,
        patching="global",
        params=(ParamSpec("window_mm", "float", 0.0, minimum=0.0, maximum=1000.0,
                          help="occluding cube edge in mm; 0 = window_fraction of each axis", auto=True),
                ParamSpec("window_fraction", "float", 0.125, minimum=0.01, maximum=1.0,
                          help="window edge as a fraction of each volume axis"),
                ParamSpec("stride_fraction", "float", 1.0, minimum=0.1, maximum=1.0,
                          help="stride as a fraction of the window (1 = non-overlapping)"),)
        + REGION_PARAMS + BASELINE_PARAMS,
        attribute=occlusion, prepare=prepare_baselines, captum="Occlusion",
        description="score drop when a sliding cube is replaced by the baseline (default 8x8x8 windows)",
    ),
    MethodSpec(
        name="FeatureAblation", family="perturbation", signed=True, needs_baseline=True, needs_layer=False,
        cost=171.0, patching="global", params=feature_params(0.125) + BASELINE_PARAMS,
        attribute=feature_ablation, prepare=prepare_baselines, captum="FeatureAblation",
        description="score drop when each block/supervoxel is replaced by the baseline",
    ),
    MethodSpec(
        name="ShapleyValueSampling", family="perturbation", signed=True, needs_baseline=True, needs_layer=False,
        cost=171.0, patching="global",
        params=(ParamSpec("n_samples", "int", 8, minimum=1, maximum=10000, help="feature permutations"), SEED)
        + feature_params(0.25) + BASELINE_PARAMS,
        attribute=shapley, prepare=prepare_baselines, captum="ShapleyValueSampling",
        description="Shapley values of blocks/supervoxels by permutation sampling (default 4x4x4 blocks)",
    ),
    MethodSpec(
        name="Lime", family="perturbation", signed=True, needs_baseline=True, needs_layer=False, cost=85.0,
        patching="global",
        params=(ParamSpec("n_samples", "int", 256, minimum=8, maximum=100000, help="random feature subsets"), SEED,
                ParamSpec("lasso_alpha", "float", 0.01, minimum=0.0, maximum=10.0,
                          help="Lasso penalty relative to |F(x) - F(baseline)| (scale-free)"))
        + feature_params(0.25) + BASELINE_PARAMS,
        attribute=lime, prepare=prepare_baselines, captum="Lime",
        description="sparse linear surrogate (Lasso) fitted on random on/off blocks (needs scikit-learn)",
    ),
    MethodSpec(
        name="KernelShap", family="perturbation", signed=True, needs_baseline=True, needs_layer=False, cost=85.0,
        patching="global",
        params=(ParamSpec("n_samples", "int", 256, minimum=8, maximum=100000, help="random feature subsets"), SEED)
        + feature_params(0.25) + BASELINE_PARAMS,
        attribute=kernel_shap, prepare=prepare_baselines, captum="KernelShap",
        description="Shapley kernel-weighted linear surrogate on random blocks (needs scikit-learn)",
    ),
]
