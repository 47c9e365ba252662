"""Max- and average sensitivity (Yeh et al. 2019; Captum `captum.metrics.sensitivity_max`).

sensitivity_i = ||e(x + u_i) - e(x)|| / ||e(x)||, u_i uniform in the L-infinity ball of radius
`radius` x intensity spread: how much the explanation moves when the input barely does. Max over
samples is Captum's `sensitivity_max`; the mean (with its standard error) is the average
sensitivity. Each sample is one call of the method on a perturbed volume, so the perturbations are
drawn and explained one at a time, with cancel checked between them.

e(x) is the attribution given (computed by the same, seeded method on the unperturbed input), which
saves one attribution; Captum recomputes it, which is the same number for a deterministic method.
The test checks the maximum against Captum's own function on the same perturbations.
"""
from __future__ import annotations

import math
from typing import Dict

import torch

from .context import ExplainFn, MetricContext, attribution_tensor


def uniform_perturbation(ctx: MetricContext, index: int, radius: float) -> torch.Tensor:
    """u_index ~ U(-radius, radius) per voxel (Captum's default perturbation), seeded per sample."""
    u = torch.empty(tuple(ctx.inputs.shape), device=ctx.device, dtype=ctx.inputs.dtype)
    return u.uniform_(-radius, radius, generator=ctx.generator(0x5E, index))


def sensitivity(attribution, ctx: MetricContext, explain_fn: ExplainFn, n_samples: int = 10,
                radius: float = 0.02) -> Dict[str, float]:
    a = attribution_tensor(attribution, ctx).double()
    norm = float(torch.linalg.vector_norm(a))
    if norm == 0.0:
        norm = 1.0  # as Captum: an all-zero map is compared in absolute terms
    r = float(radius) * ctx.spread
    values = torch.empty(int(n_samples), dtype=torch.float64)
    for i in range(int(n_samples)):
        ctx.check_cancel()
        x_i = ctx.inputs + uniform_perturbation(ctx, i, r)
        e_i = attribution_tensor(explain_fn(x_i), ctx).double()
        values[i] = float(torch.linalg.vector_norm(e_i - a)) / norm
    se = float(values.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return {"sensitivity_max": float(values.max()), "sensitivity_avg": float(values.mean()),
            "sensitivity_avg_se": se}
