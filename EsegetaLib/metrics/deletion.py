"""Deletion and insertion curves (Petsiuk et al. 2018, RISE; "pixel flipping" in Quantus).

Features (voxels, or cubes of `block` voxels) are ranked by attribution, most positive first.
Deletion replaces the top k features of the input by the baseline; insertion starts from the
baseline and puts the top k features of the input back. After each of `n_steps` equal steps the
target score F is computed (copies batched through score_fn). The curve is normalised to
(F - F(baseline)) / (F(x) - F(baseline)), 1 at the input and 0 at the baseline, and its area over
the fraction of features changed is reported: a faithful map has a small deletion area (the score
collapses when its top features go) and a large insertion area.

The steps run over a *domain*, the voxels that can matter, and the result says which: on a volume
whose background was removed (a brain TOF with 99 % zeros) equal steps over the whole volume delete
mostly empty air first, and every method scores alike. Domains: 'foreground' (default: voxels above
the volume's minimum in some channel when at least 5 % of the voxels sit at that minimum, i.e. a
removed background; every voxel of a dense MR volume), 'region' (the explained
region grown by `margin_mm`) and 'volume' (every voxel; Quantus' pixel flipping).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EsegetaError
from .context import MetricContext, attribution_tensor, batch_ranges

MODES = ("deletion", "insertion")
DOMAINS = ("foreground", "region", "volume")
BACKGROUND_SHARE = 0.05  # 'foreground' differs from 'volume' when >= 5 % of voxels sit at the minimum


def feature_ranks(spatial_map: torch.Tensor, block: int, domain: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rank (0 = first to change) of every voxel's feature; ties keep index order (stable).

    With a `domain` (bool, the map's shape) only its features are ranked (0..n-1, see
    `domain_features`); voxels outside it get ranks >= n, so no step ever changes them."""
    if block <= 1:
        values = spatial_map.flatten()
        if domain is not None:  # outside features last, after every domain feature
            values = torch.where(domain.flatten(), values, torch.full_like(values, -torch.inf))
        order = torch.argsort(values, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(order.numel(), device=order.device)
        return ranks.to(torch.int32).reshape(spatial_map.shape)  # half the memory of int64
    # Mean attribution per cube over its domain voxels (partial cubes at the far edges keep their own mean).
    weight = torch.ones_like(spatial_map, dtype=torch.float32) if domain is None else domain.float()
    pool = lambda v: F.avg_pool3d(v[None, None], block, stride=block, ceil_mode=True)[0, 0]  # noqa: E731
    share = pool(weight)
    pooled = pool(spatial_map.float() * weight) / share.clamp(min=1e-12)
    block_ranks = feature_ranks(pooled, 1, None if domain is None else share > 0)
    up = block_ranks
    for axis in range(3):
        up = up.repeat_interleave(block, dim=axis)
    return up[tuple(slice(0, s) for s in spatial_map.shape)]


def domain_features(domain: Optional[torch.Tensor], shape, block: int) -> int:
    """How many features (voxels, or cubes touching the domain) the steps run over."""
    if domain is None:
        return int(np.prod([-(-s // max(1, block)) for s in shape]))
    if block <= 1:
        return int(domain.sum())
    return int((F.max_pool3d(domain[None, None].float(), block, stride=block, ceil_mode=True) > 0).sum())


def deletion_domain(ctx: MetricContext, domain: str = "foreground", margin_mm: float = 2.0,
                    spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Optional[torch.Tensor]:
    """The voxels the steps run over, (*S) bool, or None for the whole volume."""
    if domain not in DOMAINS:
        raise EsegetaError(f"deletion domain must be one of {', '.join(DOMAINS)}; got {domain!r}.")
    if domain == "volume":
        return None
    if domain == "region":
        if ctx.region is None:
            raise EsegetaError("deletion domain 'region' needs an explained region; use 'foreground' or 'volume'.")
        from scipy import ndimage

        outside = ndimage.distance_transform_edt(~ctx.region.cpu().numpy().astype(bool), sampling=spacing)
        grown = torch.as_tensor(outside <= float(margin_mm), device=ctx.device)
        return None if bool(grown.all()) else grown
    x = ctx.inputs.reshape(ctx.inputs.shape[0], -1)
    low = x.min(dim=1).values[:, None]
    fg = (x > low + 1e-6 * ctx.spread).any(dim=0).reshape(ctx.inputs.shape[1:])
    if not bool(fg.any()):
        raise EsegetaError("the volume has no voxel above its minimum; deletion has nothing to delete.")
    # A removed background is a large constant floor; a dense MR volume's few darkest voxels are not.
    return None if float(fg.float().mean()) > 1.0 - BACKGROUND_SHARE else fg


def deletion_insertion(attribution, ctx: MetricContext, mode: str = "deletion", n_steps: int = 20,
                       block: int = 1, domain: str = "foreground", margin_mm: float = 2.0,
                       spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Dict[str, object]:
    """The normalised curve and its area for `mode` ('deletion' or 'insertion'), steps over `domain`."""
    if mode not in MODES:
        raise ValueError(mode)
    a = attribution_tensor(attribution, ctx).sum(0)
    where = deletion_domain(ctx, domain, margin_mm, spacing)
    ranks = feature_ranks(a, int(block), where)
    n_features = domain_features(where, tuple(a.shape), int(block))
    counts = np.unique(np.round(np.linspace(0, n_features, int(n_steps) + 1)).astype(np.int64))
    x, b = ctx.inputs, ctx.baseline
    raw = torch.empty(len(counts), dtype=torch.float64, device=ctx.device)
    # The all-baseline end of the curve (over the domain) is the same volume for every method and
    # both modes: F(b) is computed once per run (the all-input end reruns no window anyway).
    at_baseline = len(counts) - 1 if mode == "deletion" else 0
    todo = list(range(len(counts)))
    cache_key = ("F(baseline)", domain, float(margin_mm)) if where is not None else "F(baseline)"
    if cache_key in ctx.cache:
        raw[at_baseline] = ctx.cache[cache_key]
        todo.remove(at_baseline)
    for start, stop in batch_ranges(len(todo), ctx.batch_size):
        ctx.check_cancel()
        ctx.report(start / len(todo), f"steps {start + 1}-{stop}/{len(todo)}")
        rows = todo[start:stop]
        k = torch.as_tensor(counts[rows], device=ctx.device, dtype=torch.int32)
        changed = (ranks.unsqueeze(0) < k.view(-1, *([1] * ranks.dim()))).unsqueeze(1)  # (n,1,*S)
        if mode == "deletion":
            batch = torch.where(changed, b.unsqueeze(0), x.unsqueeze(0))
        else:  # voxels outside the domain keep the input at every step of either curve
            shown = changed if where is None else changed | ~where
            batch = torch.where(shown, x.unsqueeze(0), b.unsqueeze(0))
        raw[rows] = ctx.score(batch)
        del batch, changed
    ctx.cache[cache_key] = raw[at_baseline].clone()
    fractions = counts / n_features
    f_input = raw[0] if mode == "deletion" else raw[-1]
    f_base = raw[-1] if mode == "deletion" else raw[0]
    span = float(f_input - f_base)
    # If the baseline scores (almost) as high as the input, "removing" evidence means nothing.
    if abs(span) <= 1e-6 * max(1.0, abs(float(f_input))):
        normalised = torch.full_like(raw, float("nan"))
        auc = float("nan")
    else:
        normalised = (raw - f_base) / span
        auc = float(np.trapezoid(normalised.cpu().numpy(), fractions)) if hasattr(np, "trapezoid") \
            else float(np.trapz(normalised.cpu().numpy(), fractions))
    return {
        f"{mode}_auc": auc,
        "curve": {"fraction": fractions.tolist(), "score": raw.cpu().tolist(),
                  "normalised": normalised.cpu().tolist(), "block": int(block), "domain": domain,
                  "domain_voxels": int(a.numel() if where is None else where.sum())},
    }
