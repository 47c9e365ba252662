"""Score-CAM (Wang et al. 2020, "Score-CAM: Score-Weighted Visual Explanations for CNNs") for
segmentation targets, written here: Captum has no Score-CAM, and pytorch-grad-cam's moves every map
to NumPy and rescales it to [0, 1] per image (DESIGN.md section 3), which would lose the patched score.

For the chosen layer with activation A (K channels), brought to the input grid with the layer's
sampling geometry (methods/layers.layer_geometry) and blended over the sliding windows with their
weights (ExplainSession.layer_activation):

    M_k   = (A_k - min A_k) / (max A_k - min A_k)          each channel normalised to [0, 1]
    w_k   = F(b + M_k (x - b)) - F(b)                     the paper's "increase of confidence", with
                                                          the input masked towards the baseline b
    map   = ReLU(sum_k w_k A_k)                           (relu=False keeps the sign)

F is the engine's patched score (the sliding-window model's target score): every masked volume is
scored in batches, rerunning only windows whose voxels the mask changed.  The paper's masks multiply
by zero; an InstanceNorm network normalises a scaled input away, so the removed part is filled with
the baseline (the blurred input by default), as RISE and the perturbation methods do.  A channel
that is constant over the volume gives no mask and weight 0.  `max_channels` keeps only the channels
with the largest activation variance (the channel selection of Faster Score-CAM, Wang et al. 2020).
"""
from __future__ import annotations

import torch

from .base import MethodContext, MethodSpec, ParamSpec
from .baselines import BASELINE_PARAMS, prepare_baselines
from .common import LAYER_PARAM

APPROXIMATION = ("the layer's activation is each window's, blended with the window weights; the channel "
                 "weights are exact scores of the sliding-window model")


def normalised_masks(activation: torch.Tensor) -> torch.Tensor:
    """(1, K, *S) activation -> (K, 1, *S) masks in [0, 1]; a constant channel gives an all-zero mask."""
    a = activation[0].double()
    flat = a.reshape(a.shape[0], -1)
    low = flat.min(dim=1).values.view(-1, *([1] * (a.dim() - 1)))
    span = (flat.max(dim=1).values.view_as(low) - low)
    masks = torch.where(span > 0, (a - low) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(a))
    return masks[:, None]


def select_channels(activation: torch.Tensor, max_channels: int) -> torch.Tensor:
    """Indices of the channels kept: all, or the `max_channels` of largest variance over the volume."""
    k = activation.shape[1]
    if max_channels <= 0 or max_channels >= k:
        return torch.arange(k)
    var = activation[0].double().reshape(k, -1).var(dim=1)
    return torch.sort(torch.topk(var, max_channels).indices).values.cpu()


def channel_weights(forward, x: torch.Tensor, baseline: torch.Tensor, masks: torch.Tensor,
                    batch: int = 1, forward_args: tuple = ()) -> torch.Tensor:
    """(K,) float64: F(b + M_k (x - b)) - F(b) for (K, 1, *S) masks, `batch` masked volumes per call."""
    with torch.no_grad():
        f_base = forward(baseline, *forward_args).double().reshape(-1)[0]
        out = []
        for start in range(0, masks.shape[0], max(1, batch)):
            m = masks[start:start + batch].to(device=x.device, dtype=x.dtype)
            masked = baseline + m * (x - baseline)
            out.append(forward(masked, *forward_args).double().reshape(-1) - f_base)
    return torch.cat(out).cpu()


def score_cam_map(activation: torch.Tensor, weights: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """(1, 1, *S): sum_k w_k A_k (rectified when `relu`), for (1, K, *S) activations and (K,) weights."""
    cam = (weights.to(activation.device, torch.float64).view(1, -1, *([1] * (activation.dim() - 2)))
           * activation.double()).sum(dim=1, keepdim=True)
    return torch.clamp(cam, min=0) if relu else cam


def score_cam(ctx: MethodContext):
    activation = ctx.prepared["layer_activation"]  # (1, K, *S), from the engine ("global" layer method)
    keep = select_channels(activation, int(ctx.params["max_channels"]))
    activation = activation[:, keep.to(activation.device)]
    base = ctx.prepared.get("baselines")
    base = torch.zeros_like(ctx.inputs) if base is None else base.to(ctx.inputs)
    masks = normalised_masks(activation)
    weights = channel_weights(ctx.forward, ctx.inputs, base, masks, int(ctx.internal_batch_size or 1))
    cam = score_cam_map(activation, weights, bool(ctx.params["relu"]))
    channels = ctx.inputs.shape[1]
    attribution = (cam / channels).expand(-1, channels, *cam.shape[2:]).to(ctx.inputs.dtype).contiguous()
    return attribution, {"channels_scored": int(keep.numel()), "channels_total": int(ctx.prepared["layer_activation"].shape[1]),
                         "channel_weight_max": float(weights.max()) if weights.numel() else 0.0,
                         "channel_weight_min": float(weights.min()) if weights.numel() else 0.0}


def add_weight_check(result) -> None:
    """Trust check "channel_weights": warn when no channel raises the score (every w_k <= 0), so the
    rectified map is empty or made of channels that only lower the target's score."""
    diag = result.diagnostics
    w_max = diag.get("channel_weight_max")
    if w_max is None:
        return
    scored = diag.get("channels_scored", 0)
    if w_max > 0:
        result.add_check("channel_weights", "pass", w_max,
                         f"the largest channel weight raises the score by {w_max:.3g} ({scored} channels scored).")
    else:
        result.add_check("channel_weights", "warn", w_max,
                         f"none of the {scored} channels raises the score when it alone keeps the input (largest "
                         f"weight {w_max:.3g}): the rectified map has no positive evidence; run with relu=False "
                         "to see the signed map, or choose another layer or baseline.")


SPECS = [
    MethodSpec(
        name="ScoreCAM", family="layer", signed=False, needs_baseline=True, needs_layer=True, cost=64.0,
        patching="global",
        params=(LAYER_PARAM,
                ParamSpec("relu", "bool", True, help="keep only positive evidence (the usual CAM rectification)"),
                ParamSpec("max_channels", "int", 0, minimum=0, maximum=4096,
                          help="score only this many channels of largest activation variance; 0 = all"))
        + BASELINE_PARAMS,
        attribute=score_cam, prepare=prepare_baselines, trust=add_weight_check, captum=None, approximation=APPROXIMATION,
        description="Score-CAM: each layer channel, upsampled and normalised, masks the input towards the "
                    "baseline; weight = the patched score's change",
    ),
]
