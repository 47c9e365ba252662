"""Deletion and insertion curves (Petsiuk et al. 2018, RISE; "pixel flipping" in Quantus).

Features (voxels, or cubes of `block` voxels) are ranked by attribution, most positive first.
Deletion replaces the top k features of the input by the baseline; insertion starts from the
baseline and puts the top k features of the input back. After each of `n_steps` equal steps the
target score F is computed (copies batched through score_fn). The curve is normalised to
(F - F(baseline)) / (F(x) - F(baseline)), 1 at the input and 0 at the baseline, and its area over
the fraction of features changed is reported: a faithful map has a small deletion area (the score
collapses when its top features go) and a large insertion area.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F

from .context import MetricContext, attribution_tensor, batch_ranges

MODES = ("deletion", "insertion")


def feature_ranks(spatial_map: torch.Tensor, block: int) -> torch.Tensor:
    """Rank (0 = first to change) of every voxel's feature; ties keep index order (stable)."""
    if block <= 1:
        order = torch.argsort(spatial_map.flatten(), descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(order.numel(), device=order.device)
        return ranks.to(torch.int32).reshape(spatial_map.shape)  # half the memory of int64
    # Mean attribution per cube (partial cubes at the far edges keep their own mean).
    pooled = F.avg_pool3d(spatial_map[None, None].float(), block, stride=block, ceil_mode=True)[0, 0]
    block_ranks = feature_ranks(pooled, 1)
    up = block_ranks
    for axis in range(3):
        up = up.repeat_interleave(block, dim=axis)
    return up[tuple(slice(0, s) for s in spatial_map.shape)]


def deletion_insertion(attribution, ctx: MetricContext, mode: str = "deletion", n_steps: int = 20,
                       block: int = 1) -> Dict[str, object]:
    """The normalised curve and its area for `mode` ('deletion' or 'insertion')."""
    if mode not in MODES:
        raise ValueError(mode)
    a = attribution_tensor(attribution, ctx).sum(0)
    ranks = feature_ranks(a, int(block))
    n_features = int(ranks.max()) + 1
    counts = np.unique(np.round(np.linspace(0, n_features, int(n_steps) + 1)).astype(np.int64))
    x, b = ctx.inputs, ctx.baseline
    raw = torch.empty(len(counts), dtype=torch.float64, device=ctx.device)
    # The all-baseline end of the curve is the same volume for every method and both modes: F(b)
    # is computed once per run (the all-input end reruns no window of the patched score anyway).
    at_baseline = len(counts) - 1 if mode == "deletion" else 0
    todo = list(range(len(counts)))
    if "F(baseline)" in ctx.cache:
        raw[at_baseline] = ctx.cache["F(baseline)"]
        todo.remove(at_baseline)
    for start, stop in batch_ranges(len(todo), ctx.batch_size):
        ctx.check_cancel()
        ctx.report(start / len(todo), f"steps {start + 1}-{stop}/{len(todo)}")
        rows = todo[start:stop]
        k = torch.as_tensor(counts[rows], device=ctx.device, dtype=torch.int32)
        changed = (ranks.unsqueeze(0) < k.view(-1, *([1] * ranks.dim()))).unsqueeze(1)  # (n,1,*S)
        if mode == "deletion":
            batch = torch.where(changed, b.unsqueeze(0), x.unsqueeze(0))
        else:
            batch = torch.where(changed, x.unsqueeze(0), b.unsqueeze(0))
        raw[rows] = ctx.score(batch)
        del batch, changed
    ctx.cache["F(baseline)"] = raw[at_baseline].clone()
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
                  "normalised": normalised.cpu().tolist(), "block": int(block)},
    }
