"""Class-activation maps for segmentation: Grad-CAM (Captum), Grad-CAM++ (written here: Captum lacks
it) and Guided Grad-CAM (our any-rectifier guided backprop x Grad-CAM).

The layer's map is upsampled trilinearly to the input grid and shared across input channels.  CAMs
rectify a gradient-weighted sum, which is not linear in the output, so the engine blends per-patch
maps ("blended"): an approximation of the whole-volume map, stated in `approximation`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EsegetaError
from .base import MethodContext, MethodSpec, ParamSpec
from .common import LAYER_PARAM, first_tensor, resample_layer_map, to_input_grid
from .guided import add_rule_check, rectified_gradients, rectified_trust
from .layers import layer_for

CAM_APPROX = ("computed per window and blended with the window weights; the rectified, layer-averaged "
              "weights are not additive over windows")
RELU_PARAM = ParamSpec("relu", "bool", True, help="keep only positive evidence (the usual CAM rectification)")


def _args(ctx):
    return ctx.forward_args if ctx.forward_args else None


def layer_gradcam(ctx: MethodContext, layer=None) -> torch.Tensor:
    """(B, 1, *s) Grad-CAM at the layer's resolution (Captum LayerGradCam)."""
    from captum.attr import LayerGradCam
    layer = layer if layer is not None else layer_for(ctx)
    return first_tensor(LayerGradCam(ctx.forward, layer).attribute(
        ctx.inputs, additional_forward_args=_args(ctx), relu_attributions=bool(ctx.params.get("relu", True))))


def gradcam(ctx: MethodContext):
    return to_input_grid(layer_gradcam(ctx), ctx.inputs, ctx.layer_geometry)


def _layer_activation_and_gradient(ctx: MethodContext, layer):
    """Activation A of `layer` and dScore/dA (summed over the batch's independent scores)."""
    store = {}

    def hook(module, args, output):
        # Keep A itself, send a copy downstream: an in-place op after the layer (functional
        # relu_, ...) must not overwrite the activation the map is computed from.
        out = first_tensor(output)
        store["A"] = out
        copy = out.clone()
        if isinstance(output, tuple):
            return (copy,) + tuple(output[1:])
        if isinstance(output, list):
            return [copy] + list(output[1:])
        return copy

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            x = ctx.inputs.detach().requires_grad_(True)
            scores = ctx.forward(x, *(ctx.forward_args or ()))
            activation = store["A"]
            grads = torch.autograd.grad(scores.sum(), activation)[0]
    finally:
        handle.remove()
    return activation.detach(), grads.detach()


def gradcam_pp_map(activation: torch.Tensor, grads: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018, eq. 19 with the exponential-score closed form):

    alpha_k = g^2 / (2 g^2 + sum_s(A_k) g^3)    (0 where the denominator is 0)
    w_k     = sum_s alpha_k * relu(g)
    CAM     = relu(sum_k w_k A_k)
    activation, grads: (B, K, *s) -> (B, 1, *s)."""
    spatial = tuple(range(2, activation.dim()))
    g2 = grads.pow(2)
    g3 = grads.pow(3)
    a_sum = activation.sum(dim=spatial, keepdim=True)
    denom = 2.0 * g2 + a_sum * g3
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    weights = (alpha * torch.clamp(grads, min=0)).sum(dim=spatial, keepdim=True)
    cam = (weights * activation).sum(dim=1, keepdim=True)
    return torch.clamp(cam, min=0) if relu else cam


def gradcam_pp(ctx: MethodContext):
    layer = layer_for(ctx)
    activation, grads = _layer_activation_and_gradient(ctx, layer)
    return to_input_grid(gradcam_pp_map(activation, grads, bool(ctx.params.get("relu", True))), ctx.inputs,
                         ctx.layer_geometry)


def guided_gradcam(ctx: MethodContext):
    """Guided backprop (any rectifier) x Grad-CAM upsampled to the input (trilinear), per channel,
    as Captum's GuidedGradCam computes it (its own guided part only sees nn.ReLU)."""
    guided, diag = rectified_gradients(ctx.forward, ctx.inputs, ctx.forward_args, "guided", "GuidedGradCam")
    cam = layer_gradcam(ctx)
    cam = resample_layer_map(cam, tuple(ctx.inputs.shape[2:]), ctx.layer_geometry)
    return guided * cam, diag


def refuse_zero_cam(result) -> None:
    """MethodSpec.trust of the Grad-CAM family: refuse a map that is zero at every voxel.

    With the usual rectification (relu=True) the map is relu(sum_k w_k A_k); when the weighted sum is
    <= 0 at every position of the layer (e.g. a model that reads the class out through negative
    weights from a rectified layer: the trained DynUNet of the ground-truth zoo) the map is all zero,
    which would say the volume holds no evidence at this layer while the negative evidence is there.
    """
    if bool(np.any(result.attribution)):
        return
    layer = (result.params or {}).get("layer") or "the automatic layer"
    if result.name == "GradCAM++":  # its channel weights use the positive gradients only (eq. 19)
        raise EsegetaError(
            f"GradCAM++'s map is zero at every voxel: it weights {layer}'s channels by their positive gradients "
            "only, and none is positive (the model reads the class out through negative weights there); use "
            "GradCAM with relu=false to see the negative evidence, choose another layer, or use a gradient method.")
    if (result.params or {}).get("relu", True):
        raise EsegetaError(
            f"{result.name}'s map is zero at every voxel: the gradient-weighted sum of {layer}'s channels is <= 0 "
            f"everywhere and the CAM's ReLU keeps positive evidence only; set {result.name}.relu=false to see "
            "the negative evidence, choose another layer, or use a gradient method (Saliency, IntegratedGradients).")
    raise EsegetaError(f"{result.name}'s map is zero at every voxel: the target's gradient does not reach {layer}'s "
                       "activations; choose another layer.")


def _guided_gradcam_trust(result) -> None:
    """Guided backprop x Grad-CAM: a zero map is refused with the factor that made it zero."""
    if int((getattr(result, "diagnostics", {}) or {}).get("rule_calls_zeroed", 0) or 0):
        rectified_trust(result)  # the guided factor lost its whole signal at a rectifier
    add_rule_check(result)
    refuse_zero_cam(result)


SPECS = [
    MethodSpec(
        name="GradCAM", family="layer", signed=False, needs_baseline=False, needs_layer=True, cost=1.0,
        patching="blended", params=(LAYER_PARAM, RELU_PARAM), attribute=gradcam, captum="LayerGradCam",
        trust=refuse_zero_cam, approximation=CAM_APPROX,
        description="Grad-CAM on a layer, upsampled to the input grid",
    ),
    MethodSpec(
        name="GradCAM++", family="layer", signed=False, needs_baseline=False, needs_layer=True, cost=1.0,
        patching="blended", params=(LAYER_PARAM, RELU_PARAM), attribute=gradcam_pp, captum=None,
        trust=refuse_zero_cam, approximation=CAM_APPROX,
        description="Grad-CAM++ (pixel-weighted gradients), upsampled to the input grid",
    ),
    MethodSpec(
        name="GuidedGradCam", family="layer", signed=True, needs_baseline=False, needs_layer=True, cost=2.0,
        patching="blended", params=(LAYER_PARAM, RELU_PARAM), attribute=guided_gradcam, captum="LayerGradCam",
        trust=_guided_gradcam_trust,
        approximation=CAM_APPROX, description="guided backprop (any rectifier) times upsampled Grad-CAM",
    ),
]
