"""The trust report's checks that belong to the model and the run rather than to one method:
determinism of the model, completeness of path methods, the layer a layer method used.

Each returns or records a `results.TrustCheck` (pass | warn | fail | not_run, the number behind it,
one sentence).  The engine calls them; methods add their own checks through `MethodResult.add_check`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .errors import EsegetaError
from .results import MethodResult

DETERMINISM_TOLERANCE = 1e-4  # relative max difference of two forwards of the same window
COMPLETENESS_TOLERANCE = 0.01  # default relative completeness error of path methods
ILL_CONDITIONED = 10.0  # path variation / |F(x) - F(b)| above which the detail says so


def forward_difference(logits_fn, window: torch.Tensor) -> float:
    """Max |out1 - out2| / max|out1| of two forward passes of the same window (no grad)."""
    with torch.no_grad():
        first = logits_fn(window).double()
        second = logits_fn(window).double()
    scale = float(first.abs().max())
    return float((first - second).abs().max()) / max(scale, 1e-30)


def require_determinism(logits_fn, window: torch.Tensor, tolerance: float = DETERMINISM_TOLERANCE) -> float:
    """The relative difference of two forwards of `window`; an EsegetaError when it exceeds
    `tolerance`: every attribution assumes the same input gives the same output (a TorchScript model
    traced in training mode keeps its Dropout on whatever `.eval()` is called later)."""
    difference = forward_difference(logits_fn, window)
    if not difference <= tolerance:  # NaN too
        raise EsegetaError(
            f"The model gives different outputs for the same input (relative difference {difference:.3g}): "
            "it was probably exported in training mode (Dropout/BatchNorm active); re-export it after "
            "model.eval(), e.g. torch.jit.trace(model.eval(), example) or torch.export.export(model.eval(), (example,)).")
    return difference


def add_determinism_check(result: MethodResult, difference: Optional[float]) -> None:
    if difference is None:
        result.add_check("determinism", "not_run", None, "the model's determinism was not checked in this run")
        return
    result.add_check("determinism", "pass", difference,
                     f"two forward passes of the same window agree (relative difference {difference:.2g} "
                     f"<= {DETERMINISM_TOLERANCE:g})")


def add_completeness_check(result: MethodResult, diagnostics: Dict[str, Any],
                           tolerance: Optional[float] = None) -> None:
    """'completeness' from the diagnostics' relative convergence delta (path methods, DeepLift):
    pass when |sum(attr) - (F(x) - F(b))| / |F(x) - F(b)| <= tolerance (default 1 %), warn above."""
    undefined = diagnostics.get("completeness_undefined")
    if undefined:  # a path method whose sum has no reference here (InternalInfluence; conductance off a cut)
        share = diagnostics.get("layer_bypass_share_max")
        detail = str(undefined)
        if diagnostics.get("steps_final_max") is not None:
            change = diagnostics.get("refinement_change_max")
            detail += (f"; {diagnostics['steps_final_max']} steps" + (
                f", the map changed {change:.2%} at the last doubling" if change is not None else " (fixed)") +
                (": not converged within tolerance, raise max_steps" if diagnostics.get("refinement_unconverged") else ""))
        result.add_check("completeness", "not_run", share if share else None, detail)
        return
    value = diagnostics.get("relative_convergence_delta")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    tolerance = COMPLETENESS_TOLERANCE if tolerance is None else float(tolerance)
    steps = diagnostics.get("steps_used_mean")
    detail = f"sum of attributions vs F(x) - F(baseline): relative error {value:.2%} (tolerance {tolerance:.2%})"
    if steps is not None:
        detail += f", {steps:.0f} steps per window on average (max {diagnostics.get('steps_used_max', steps):.0f})"
    if diagnostics.get("step_cap_hit"):
        detail += f"; the step cap was reached in {diagnostics['step_cap_hit']} window(s)" + (
            "" if value <= tolerance else ": raise max_steps")
    variation, change = diagnostics.get("path_variation"), diagnostics.get("score_change")
    if isinstance(variation, (int, float)) and isinstance(change, (int, float)) and \
            variation > ILL_CONDITIONED * max(abs(change), 1e-30):
        detail += (f"; the score moves {variation:.3g} along the path but only {change:.3g} from baseline to "
                   "input, so the relative error is ill-conditioned: try another baseline ('constant_low' or 'mean')")
    if value <= tolerance:
        result.add_check("completeness", "pass", value, detail)
    else:
        result.add_check("completeness", "warn", value,
                         detail + "; the map does not add up to the score change: raise n_steps/max_steps "
                         "or choose another baseline")


def add_layer_check(result: MethodResult, diagnostics: Dict[str, Any]) -> None:
    """'layer_gradient' of layer methods: the layer used and the norm of the target's gradient at it
    (probed on the first window in the region).  warn when Grad-CAM's channel weights vanish there."""
    norm = diagnostics.get("layer_gradient_norm")
    if norm is None:
        return
    from .methods.layers import CAM_WEIGHT_MIN

    ratio = float(diagnostics.get("layer_cam_weight_ratio", 1.0))
    detail = (f"{diagnostics.get('layer_note', diagnostics.get('layer'))}: gradient norm {norm:.3g} at the layer, "
              f"channel-mean gradient {ratio:.2g} of its RMS")
    if ratio < CAM_WEIGHT_MIN:
        result.add_check("layer_gradient", "warn", norm, detail + "; Grad-CAM-type channel weights are ~0 at this "
                         "layer (a per-channel normalisation follows it): choose another layer")
    else:
        result.add_check("layer_gradient", "pass", norm, detail)


# --- path methods: baseline fallback and refusal ---------------------------------------------------
# The order in which an adaptive path method tries baselines when the requested one cannot meet the
# completeness tolerance (#11): the blurred input first (the default); a constant volume at the 1st
# percentile next (DESIGN.md section 3: 0.5-2 % at fixed steps on InstanceNorm nets, and 0.1 % where
# the blur's path swung 400x its score change on a random DynUNet point target); the volume's mean;
# Gaussian noise with the volume's own mean and spread last.  zero and user baselines are never
# substituted in (zero fails on normalising networks; a user baseline is not ours to choose).
BASELINE_FALLBACK = ("blur", "constant_low", "mean", "noise")
PATH_GUARD_PARAMS = ("allow_incomplete", "baseline_fallback")


def baseline_candidates(requested: str, fallback: bool = True):
    """Baselines to try in order: the requested one, then (fallback on, requested not 'user') the
    rest of BASELINE_FALLBACK."""
    if not fallback or requested == "user":
        return [requested]
    return [requested] + [b for b in BASELINE_FALLBACK if b != requested]


def _tried_text(tried) -> str:
    return ", ".join(f"{b} {100 * v:.3g} %" if v is not None else f"{b} n/a" for b, v in tried)


def add_baseline_check(result: MethodResult, requested: str, used: str, tried) -> None:
    """'baseline' of an adaptive path method: which baseline the map integrates from, and the
    completeness error of every baseline tried (`tried`: [(baseline, relative error)])."""
    result.diagnostics["baseline_used"] = used
    result.diagnostics["baselines_tried"] = [[b, v] for b, v in tried]
    if used == requested and len(tried) == 1:
        result.add_check("baseline", "pass", None, f"integrated from the {used} baseline as requested")
        return
    value = dict(tried).get(used)
    # another reference input than the one asked for answers another question: warn, so that it is
    # said on the terminal and in every table (the map itself meets its completeness guarantee)
    result.add_check(
        "baseline", "pass" if used == requested else "warn", value,
        f"the {requested} baseline could not meet the completeness tolerance; baselines tried in the order "
        f"{', '.join(BASELINE_FALLBACK)}: {_tried_text(tried)}; this map integrates from the {used} baseline "
        "(a different reference input: read the map as 'why this output rather than that of the "
        f"{used} volume')")


def refuse_incomplete(name: str, tried, tolerance: float, max_steps: int) -> None:
    """EsegetaError (one line) for an adaptive path method that met its tolerance with no baseline."""
    best = min((v for _, v in tried if v is not None), default=None)
    raise EsegetaError(
        f"{name} cannot meet completeness within {100 * tolerance:.3g} % on this model and target at "
        f"max_steps={max_steps} (baselines tried: {_tried_text(tried)}); explain a larger region (e.g. "
        "--region predicted, or component:I,J,K[:MM] instead of a single point), give another baseline, raise max_steps, or set "
        f"allow_incomplete=true to get the map with a warning" + (f" (best {100 * best:.3g} %)." if best is not None else "."))
