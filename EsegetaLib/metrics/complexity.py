"""How concentrated a map is (Chalasani et al. 2020; Bhatt et al. 2020), on the spatial map.

- sparseness: Gini index of |a| over voxels, 0 = relevance spread evenly, 1 = all on one voxel;
- complexity: entropy (nats) of p = |a| / sum |a|, between 0 (one voxel) and log(#voxels) (even);
  `complexity_rel` divides by log(#voxels) so volumes of different sizes compare.
Explanations people can read are sparse and of low complexity; that says nothing about fidelity.
"""
from __future__ import annotations

import math
from typing import Dict

import torch

from .context import MetricContext, attribution_tensor


def sparseness(attribution, ctx: MetricContext) -> Dict[str, float]:
    a = attribution_tensor(attribution, ctx).sum(0).abs().flatten().double()
    n = a.numel()
    total = float(a.sum())
    if total == 0.0:
        return {"sparseness": float("nan")}
    a, _ = torch.sort(a)
    i = torch.arange(1, n + 1, device=a.device, dtype=torch.float64)
    return {"sparseness": float(((2 * i - n - 1) * a).sum()) / (n * total)}


def complexity(attribution, ctx: MetricContext) -> Dict[str, float]:
    a = attribution_tensor(attribution, ctx).sum(0).abs().flatten().double()
    total = float(a.sum())
    if total == 0.0:
        return {"complexity": float("nan"), "complexity_rel": float("nan")}
    p = a / total
    h = float(-torch.special.xlogy(p, p).sum())
    return {"complexity": h, "complexity_rel": h / math.log(a.numel()) if a.numel() > 1 else 0.0}
