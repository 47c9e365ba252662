"""Localisation: does the relevance fall inside a reference mask (Arras et al. 2022, CLEVR-XAI)?

The reference is the model's predicted region by default (what was explained), or a user mask.
Both metrics use the spatial map (channels summed).
- relevance mass accuracy: share of the positive relevance inside the mask (`relevance="positive"`,
  Arras et al.: negative relevance is evidence against the class and is not "mass"), or of the
  absolute relevance (`relevance="absolute"`, for unsigned reading of signed maps);
- relevance rank accuracy: with K voxels in the mask, the share of the K highest-ranked voxels
  (by signed value, or by magnitude for "absolute") that lie inside it.
A random map scores about |mask| / |volume| on both.  Where a metric is undefined (an empty mask, a
map without positive relevance) it is NaN and `<metric>_note` says why.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..errors import EsegetaError
from .context import MetricContext, attribution_tensor

RELEVANCE = ("positive", "absolute")


def _mask(ctx: MetricContext, mask: Optional[torch.Tensor]) -> torch.Tensor:
    m = ctx.region if mask is None else torch.as_tensor(mask, device=ctx.device)
    if m is None:
        raise EsegetaError("localisation metrics need a reference mask: give a mask or explain a region.")
    m = m.to(device=ctx.device).bool()
    if tuple(m.shape) != tuple(ctx.inputs.shape[1:]):
        raise EsegetaError(f"reference mask shape {tuple(m.shape)} differs from the volume's {tuple(ctx.inputs.shape[1:])}.")
    return m


def undefined_note(a: torch.Tensor, relevance: str) -> str:
    """Why a map gives no relevance to share out: zero everywhere, or (positive relevance) no
    voxel above zero."""
    if not bool(a.any()):
        return "the map is zero at every voxel"
    return (f"the map has no positive relevance (maximum {float(a.max()):.3g}); relevance='absolute' reads "
            "its magnitudes" if relevance == "positive" else "the map is zero at every voxel")


def relevance_mass(attribution, ctx: MetricContext, mask=None, relevance: str = "positive") -> Dict[str, float]:
    if relevance not in RELEVANCE:
        raise EsegetaError(f"relevance must be one of {', '.join(RELEVANCE)}; got {relevance!r}.")
    m = _mask(ctx, mask)
    a = attribution_tensor(attribution, ctx).sum(0).double()
    r = a.clamp(min=0) if relevance == "positive" else a.abs()
    total = float(r.sum())
    if not bool(m.any()):
        return {"relevance_mass": float("nan"), "relevance_mass_note": "the reference mask is empty"}
    if total == 0.0:
        return {"relevance_mass": float("nan"), "relevance_mass_note": undefined_note(a, relevance)}
    return {"relevance_mass": float(r[m].sum()) / total}


def relevance_rank(attribution, ctx: MetricContext, mask=None, relevance: str = "positive") -> Dict[str, float]:
    if relevance not in RELEVANCE:
        raise EsegetaError(f"relevance must be one of {', '.join(RELEVANCE)}; got {relevance!r}.")
    m = _mask(ctx, mask)
    k = int(m.sum())
    if k == 0:
        return {"relevance_rank": float("nan"), "relevance_rank_note": "the reference mask is empty"}
    a = attribution_tensor(attribution, ctx).sum(0)
    r = a if relevance == "positive" else a.abs()
    top = torch.topk(r.flatten(), k, sorted=False).indices
    return {"relevance_rank": float(m.flatten()[top].sum()) / k}
