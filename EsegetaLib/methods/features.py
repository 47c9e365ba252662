"""Features for perturbation methods on volumes: a grid of blocks or SLIC supervoxels, sized in
millimetres (or as a fraction of the volume), optionally restricted to the target region plus a margin.

Perturbing single voxels is hopeless in 3D (millions of features); blocks of a few mm, or
supervoxels that follow intensity edges (scikit-image SLIC, using the voxel spacing), keep the
number of model evaluations in the hundreds.  Restricting to the region's bounding box plus a margin
spends those evaluations where the segmentation is.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

import numpy as np
import torch

from ..errors import EsegetaError
from .base import MethodContext, ParamSpec, VolumeStats

REGION_PARAMS = (
    ParamSpec("restrict_to_region", "bool", True,
              help="perturb only the target region's bounding box plus a margin (voxels outside get 0)"),
    ParamSpec("margin_mm", "float", 0.0, minimum=0.0, maximum=1000.0,
              help="margin around the region in mm; 0 = one feature block", auto=True),
)


def feature_params(block_fraction: float, kind_default: str = "grid"):
    return (
        ParamSpec("features", "choice", kind_default, choices=("grid", "slic"),
                  help="grid of blocks, or SLIC supervoxels (scikit-image)"),
        ParamSpec("block_mm", "float", 0.0, minimum=0.0, maximum=1000.0,
                  help="block edge in mm (SLIC: typical supervoxel size); 0 = block_fraction of the volume", auto=True),
        ParamSpec("block_fraction", "float", block_fraction, minimum=0.01, maximum=1.0,
                  help="block edge as a fraction of each volume axis (used when block_mm is 0)"),
        ParamSpec("slic_compactness", "float", 0.1, minimum=0.0001, maximum=100.0,
                  help="SLIC compactness on intensities scaled to [0, 1]"),
    ) + REGION_PARAMS


def block_voxels(stats: VolumeStats, params: Dict[str, Any]) -> Tuple[int, ...]:
    """Block edge per axis in voxels, from mm (via spacing) or a fraction of the full volume."""
    mm = float(params.get("block_mm") or 0.0)
    if mm > 0:
        return tuple(max(1, int(round(mm / float(s)))) for s in stats.spacing)
    frac = float(params.get("block_fraction", 0.125))
    return tuple(max(1, int(math.ceil(frac * n))) for n in stats.shape)


def region_box(ctx: MethodContext) -> Tuple[slice, ...]:
    """Spatial slices of the region's bounding box grown by the margin (whole volume if disabled)."""
    spatial = tuple(ctx.inputs.shape[2:])
    full = tuple(slice(0, n) for n in spatial)
    if not ctx.params.get("restrict_to_region", False) or ctx.region is None:
        return full
    mask = ctx.region.reshape(ctx.region.shape[-len(spatial):]) > 0
    if not bool(mask.any()):
        return full
    margin_mm = float(ctx.params.get("margin_mm") or 0.0)
    if margin_mm > 0:
        margin = [int(math.ceil(margin_mm / float(s))) for s in ctx.stats.spacing]
    else:
        margin = list(block_voxels(ctx.stats, ctx.params))
    coords = torch.nonzero(mask)
    lo = coords.min(dim=0).values.tolist()
    hi = coords.max(dim=0).values.tolist()
    return tuple(slice(max(0, l - m), min(n, h + 1 + m)) for l, h, m, n in zip(lo, hi, margin, spatial))


def grid_mask(shape: Sequence[int], block: Sequence[int]) -> torch.Tensor:
    """Integer feature ids (1, 1, *shape): consecutive ids for blocks of `block` voxels."""
    counts = [int(math.ceil(n / b)) for n, b in zip(shape, block)]
    ids = [torch.arange(n) // b for n, b in zip(shape, block)]
    i, j, k = torch.meshgrid(*ids, indexing="ij")
    return (i * counts[1] * counts[2] + j * counts[2] + k).view(1, 1, *shape)


def slic_mask(volume: torch.Tensor, stats: VolumeStats, params: Dict[str, Any]) -> torch.Tensor:
    """SLIC supervoxels of a (1, C, *S) volume, sized like the grid blocks, spacing-aware."""
    try:
        from skimage.segmentation import slic
    except ImportError:
        raise EsegetaError("features=slic needs scikit-image: pip install scikit-image (or use features=grid).") from None
    image = volume[0].detach().float().cpu().numpy()
    span = max(float(stats.high - stats.low), 1e-12)
    image = np.clip((image - float(stats.low)) / span, 0.0, 1.0)
    image = np.moveaxis(image, 0, -1)  # channels last
    block = block_voxels(stats, params)
    n_segments = max(2, int(np.prod([max(1, n / b) for n, b in zip(image.shape[:3], block)])))
    labels = slic(image, n_segments=n_segments, compactness=float(params.get("slic_compactness", 0.1)),
                  spacing=np.asarray(stats.spacing, dtype=float), channel_axis=-1, start_label=0,
                  enforce_connectivity=True)
    # relabel to consecutive ids 0..n-1 (Captum counts features by max id)
    _, consecutive = np.unique(labels, return_inverse=True)
    return torch.as_tensor(consecutive.reshape(labels.shape), dtype=torch.long).view(1, 1, *labels.shape)


def feature_mask(volume: torch.Tensor, stats: VolumeStats, params: Dict[str, Any]) -> torch.Tensor:
    """Feature ids for the (cropped) volume (1, C, *s), on its device."""
    if params.get("features", "grid") == "slic":
        mask = slic_mask(volume, stats, params)
    else:
        mask = grid_mask(tuple(volume.shape[2:]), block_voxels(stats, params))
    return mask.to(volume.device)


class CroppedForward(torch.nn.Module):
    """The score as a function of a crop only: the crop is pasted into the full (unperturbed) volume.

    Lets any Captum perturbation method work on the region's box while the model still sees the
    whole volume (the engine's forward then reruns only the windows the crop touches)."""

    def __init__(self, forward: torch.nn.Module, full: torch.Tensor, box: Tuple[slice, ...]):
        super().__init__()
        self.inner = forward
        self.full = full.detach()
        self.box = box

    def forward(self, crop: torch.Tensor, *args):
        full = self.full.expand(crop.shape[0], *self.full.shape[1:]).clone()
        full[(slice(None), slice(None)) + self.box] = crop
        return self.inner(full, *args)


def crop_problem(ctx: MethodContext):
    """(forward, crop, crop_baseline, box, is_cropped) for a perturbation method."""
    box = region_box(ctx)
    index = (slice(None), slice(None)) + box
    full_box = all(s.start == 0 and s.stop == n for s, n in zip(box, ctx.inputs.shape[2:]))
    base = ctx.prepared.get("baselines")
    base = torch.zeros_like(ctx.inputs) if base is None else base.to(ctx.inputs)
    if full_box:
        return ctx.forward, ctx.inputs, base, box, False
    return CroppedForward(ctx.forward, ctx.inputs, box), ctx.inputs[index], base[index], box, True


def uncrop(attr: torch.Tensor, like: torch.Tensor, box: Tuple[slice, ...]) -> torch.Tensor:
    out = torch.zeros_like(like, dtype=attr.dtype)
    out[(slice(None), slice(None)) + box] = attr
    return out
