"""Top activating windows: where on this input a layer channel is most active, as a list of boxes.

An activation-based view (Zeiler & Fergus 2014 show the input patches that most excite a unit; here
the boxes are found on the input volume itself): not an attribution of the target's score.

1. The channel's activation on the input grid: the layer's output of every sliding window, brought
   to the window's input grid with the layer's sampling geometry (methods/layers.layer_geometry) and
   blended with the window weights (`ExplainSession.layer_activation`, as Score-CAM reads it).  This
   map is the method's attribution-like output (`MethodResult.map`).
2. The k strongest peaks, greedily: the largest value, then the largest outside the boxes already
   taken (each suppresses a half-size box around its peak, at least one layer stride per axis).
3. Each peak's box is the effective receptive field (Luo et al. 2016) of the layer unit at the peak:
   the voxels of a window around the peak whose gradient magnitude d A_c(unit) / d x is at least
   `rf_fraction` of the largest, clipped to the volume.  A unit whose gradient is zero everywhere
   gets its stride footprint.

The boxes are returned in IJK voxel indices (`outputs["rois"]`); `EsegetaLib.method_outputs` adds
RAS millimetres through the input's affine and writes them as JSON and as Slicer markups ROIs.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import EsegetaError
from .base import MethodContext, MethodSpec, ParamSpec
from .common import LAYER_PARAM
from .featurevis import CHANNEL_PARAM, centre_window, channel_activation, check_channel, layer_name_of, relabel_layer_check


def region_channel(activation: torch.Tensor, region: Optional[torch.Tensor]) -> int:
    """The channel of a (1, K, *S) activation with the largest mean inside the region (everywhere
    when the region is empty or None)."""
    a = activation[0].double()
    if region is not None and bool(region.any()):
        mask = region[0, 0].to(a.device, a.dtype)
        return int((a * mask).flatten(1).sum(dim=1).div(mask.sum()).argmax())
    return int(a.flatten(1).mean(dim=1).argmax())


def receptive_box(network: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, channel: int,
                  peak: Sequence[int], window: Sequence[int], geometry, rf_fraction: float
                  ) -> Tuple[Tuple[int, ...], Tuple[int, ...], bool]:
    """(start, stop, measured) in x's voxel indices of the effective receptive field of the layer unit
    nearest `peak` (see the module docstring); x (1, C, *S).  measured is False when the unit's
    gradient was zero everywhere (the box is then the unit's stride footprint)."""
    spatial = tuple(int(v) for v in x.shape[2:])
    crop, start = centre_window(x, window, peak)
    crop = crop.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = channel_activation(network, layer, crop, grad=True)
        unit = []
        for a, (scale, offset) in enumerate(geometry):
            o = round((peak[a] - start[a] - offset) / scale)
            unit.append(int(min(max(o, 0), out.shape[2 + a] - 1)))
        grad = torch.autograd.grad(out[(0, channel) + tuple(unit)], crop, allow_unused=True)[0]
    footprint = [max(1, int(math.ceil(abs(scale)))) for scale, _ in geometry]
    if grad is not None:
        magnitude = grad.detach().abs().sum(dim=1)[0]
        top = float(magnitude.max())
        if top > 0:
            idx = torch.nonzero(magnitude >= rf_fraction * top)
            lo = (idx.min(dim=0).values + torch.tensor(start)).tolist()
            hi = (idx.max(dim=0).values + 1 + torch.tensor(start)).tolist()
            lo = tuple(int(min(max(v, 0), n - 1)) for v, n in zip(lo, spatial))
            hi = tuple(int(min(max(v, l + 1), n)) for v, l, n in zip(hi, lo, spatial))
            return lo, hi, True
    lo = tuple(int(max(0, p - f // 2)) for p, f in zip(peak, footprint))
    hi = tuple(int(min(n, l + f)) for l, f, n in zip(lo, footprint, spatial))
    return lo, hi, False


def top_peaks(amap: torch.Tensor, k: int, box_of, min_radius: Sequence[int]) -> List[Dict[str, Any]]:
    """Greedy peaks of a (*S) map: the largest value, its box (box_of(peak) -> (start, stop, measured)),
    then values within half the box's size (at least min_radius) of the peak are excluded."""
    work = amap.detach().double().clone()
    rois: List[Dict[str, Any]] = []
    for rank in range(1, int(k) + 1):
        value = float(work.max())
        if not math.isfinite(value):
            break
        peak = tuple(int(v) for v in np.unravel_index(int(torch.argmax(work)), tuple(work.shape)))
        lo, hi, measured = box_of(peak)
        size = [h - l for l, h in zip(lo, hi)]
        rois.append({"rank": rank, "activation": float(amap[peak]), "peak_ijk": list(peak),
                     "start_ijk": list(lo), "stop_ijk": list(hi), "size_voxels": size,
                     "centre_ijk": [(l + h - 1) / 2.0 for l, h in zip(lo, hi)],
                     "receptive_field": "measured" if measured else "stride footprint (zero gradient)"})
        cut = tuple(slice(max(0, p - max(r, s // 4)), p + max(r, s // 4) + 1)
                    for p, s, r in zip(peak, size, min_radius))
        work[cut] = -math.inf
    return rois


def top_activating_windows(ctx: MethodContext):
    activation = ctx.prepared.get("layer_activation")
    if activation is None or ctx.layer is None:
        raise EsegetaError("TopActivatingWindows needs a layer's activation; name one with the 'layer' parameter.")
    name = layer_name_of(ctx.network, ctx.layer)
    channels = int(activation.shape[1])
    channel = int(ctx.params["channel"])
    if channel < 0:
        channel = region_channel(activation, ctx.region)
    check_channel(channel, channels, "TopActivatingWindows", name)
    amap = activation[0, channel]
    geometry = ctx.layer_geometry or tuple((1.0, 0.0) for _ in amap.shape)
    window = tuple(ctx.patch or ctx.inputs.shape[2:])
    rf_fraction = float(ctx.params["rf_fraction"])
    stride = [max(1, int(math.ceil(abs(scale)))) for scale, _ in geometry]
    rois = top_peaks(amap, int(ctx.params["k"]),
                     lambda peak: receptive_box(ctx.network, ctx.layer, ctx.inputs, channel, peak, window, geometry,
                                                rf_fraction), stride)
    c = ctx.inputs.shape[1]
    attribution = (amap[None, None] / c).expand(1, c, *amap.shape).to(ctx.inputs.dtype).contiguous()
    diag = {"layer": name, "channel": channel, "channels_total": channels, "rois_found": len(rois),
            "top_activation": rois[0]["activation"] if rois else None,
            "outputs": {"rois": rois, "layer": name, "channel": channel, "rf_fraction": rf_fraction}}
    return attribution, diag


def add_activation_check(result) -> None:
    """"target_attribution" (not_run): the map is the channel's activation on this input, not an
    attribution of the target's score; the engine's layer check keeps only its gradient-reach part."""
    d = result.diagnostics
    result.add_check("target_attribution", "not_run", None,
                     f"activation-based: where channel {d.get('channel')} of '{d.get('layer')}' is active on this "
                     f"input ({d.get('rois_found')} boxes); it does not say what the target's score depends on.")
    relabel_layer_check(result)


SPECS = [
    MethodSpec(
        name="TopActivatingWindows", family="layer", signed=True, needs_baseline=False, needs_layer=True,
        cost=1.0, patching="global",
        params=(LAYER_PARAM, CHANNEL_PARAM,
                ParamSpec("k", "int", 5, minimum=1, maximum=100, help="how many boxes (strongest first)"),
                ParamSpec("rf_fraction", "float", 0.01, minimum=1e-6, maximum=1.0,
                          help="a box holds the voxels whose gradient magnitude is at least this fraction of "
                               "the unit's largest (effective receptive field)")),
        attribute=top_activating_windows, trust=add_activation_check, captum=None, explains_target=False,
        approximation="the layer's activation is each window's, blended with the window weights",
        description="activation-based: one layer channel's activation on the input grid and its k strongest "
                    "boxes (receptive fields) as a ROI list and Slicer markups; not an attribution of the target",
    ),
]
