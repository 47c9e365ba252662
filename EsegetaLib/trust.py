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
    value = diagnostics.get("relative_convergence_delta")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    tolerance = COMPLETENESS_TOLERANCE if tolerance is None else float(tolerance)
    steps = diagnostics.get("steps_used_mean")
    detail = f"sum of attributions vs F(x) - F(baseline): relative error {value:.2%} (tolerance {tolerance:.2%})"
    if steps is not None:
        detail += f", {steps:.0f} steps per window on average (max {diagnostics.get('steps_used_max', steps):.0f})"
    if diagnostics.get("step_cap_hit"):
        detail += f"; the step cap was reached in {diagnostics['step_cap_hit']} window(s): raise max_steps"
    variation, change = diagnostics.get("path_variation"), diagnostics.get("score_change")
    if isinstance(variation, (int, float)) and isinstance(change, (int, float)) and \
            variation > ILL_CONDITIONED * max(abs(change), 1e-30):
        detail += (f"; the score moves {variation:.3g} along the path but only {change:.3g} from baseline to "
                   "input, so the relative error is ill-conditioned: try another baseline ('mean' or 'min')")
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
