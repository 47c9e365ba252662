"""Max- and average sensitivity (Yeh et al. 2019; Captum `captum.metrics.sensitivity_max`).

sensitivity_i = ||e(x + u_i) - e(x)|| / ||e(x)||, u_i uniform in the L-infinity ball of radius
`radius` x intensity spread: how much the explanation moves when the input barely does. Max over
samples is Captum's `sensitivity_max`; the mean (with its standard error) is the average
sensitivity.

Speed: with `explain_many` (the engine's `ExplainSession.attribute_many`) the perturbed volumes go
through the method's own window batches together, in one session (its segmentation, region and
cached unperturbed window scores reused), instead of one method call per sample; without it they
are explained one at a time by `explain_fn`. The draws u_i are seeded per sample index, so every
method of a run sees the same perturbations; they are kept in the metric context (shared, not
redrawn) while they fit in `SHARED_DRAWS_BYTES`. Cancel is checked between chunks.

e(x) is the attribution given (computed by the same, seeded method on the unperturbed input), which
saves one attribution; Captum recomputes it, which is the same number for a deterministic method.
The test checks the maximum against Captum's own function on the same perturbations, and the
batched values against the one-by-one values for the same draws.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch

from .context import ExplainFn, MetricContext, attribution_tensor, batch_ranges

# (n, C, *S) perturbations, x -> (n, C, *S) maps; `progress(fraction, message)` within the call.
ExplainManyFn = Callable[..., torch.Tensor]
SHARED_DRAWS_BYTES = 512 * 2**20  # perturbations kept for the next method up to this size
CHUNK_BYTES = 256 * 2**20  # perturbed volumes handed to explain_many at once


def uniform_perturbation(ctx: MetricContext, index: int, radius: float) -> torch.Tensor:
    """u_index ~ U(-radius, radius) per voxel (Captum's default perturbation), seeded per sample."""
    u = torch.empty(tuple(ctx.inputs.shape), device=ctx.device, dtype=ctx.inputs.dtype)
    return u.uniform_(-radius, radius, generator=ctx.generator(0x5E, index))


def perturbations(ctx: MetricContext, start: int, stop: int, radius: float, n_samples: int) -> torch.Tensor:
    """u_start..u_{stop-1} (stop - start, C, *S): drawn once per run and shared by every method
    while all n_samples of them fit in SHARED_DRAWS_BYTES, else drawn again (the same values)."""
    key = ("sensitivity draws", int(n_samples), float(radius))
    shared = ctx.cache.get(key)
    if shared is None and n_samples * ctx.inputs.numel() * ctx.inputs.element_size() <= SHARED_DRAWS_BYTES:
        shared = torch.stack([uniform_perturbation(ctx, i, radius) for i in range(n_samples)])
        ctx.cache[key] = shared
    if shared is not None:
        return shared[start:stop]
    return torch.stack([uniform_perturbation(ctx, i, radius) for i in range(start, stop)])


def sensitivity(attribution, ctx: MetricContext, explain_fn: Optional[ExplainFn] = None, n_samples: int = 10,
                radius: float = 0.02, explain_many: Optional[ExplainManyFn] = None) -> Dict[str, float]:
    """Max and average sensitivity of `attribution` (see the module docstring). Give `explain_many`
    (batched) or `explain_fn` (one perturbed volume at a time)."""
    if explain_fn is None and explain_many is None:
        raise ValueError("sensitivity needs explain_fn or explain_many")
    a = attribution_tensor(attribution, ctx).double()
    norm = float(torch.linalg.vector_norm(a))
    if norm == 0.0:
        norm = 1.0  # as Captum: an all-zero map is compared in absolute terms
    r = float(radius) * ctx.spread
    n = int(n_samples)
    values = torch.empty(n, dtype=torch.float64)
    per_copy = ctx.inputs.numel() * ctx.inputs.element_size()
    chunk = max(1, CHUNK_BYTES // max(1, per_copy)) if explain_many is not None else 1
    for start, stop in batch_ranges(n, chunk):
        ctx.check_cancel()
        x = ctx.inputs.unsqueeze(0) + perturbations(ctx, start, stop, r, n)
        if explain_many is not None:
            def progress(fraction, message, start=start, stop=stop):
                ctx.report((start + fraction * (stop - start)) / n, f"sample {start + 1}-{stop}/{n}: {message}")

            maps = explain_many(x, progress=progress)
        else:
            ctx.report(start / n, f"sample {start + 1}/{n}")
            maps = explain_fn(x[0])[None]
        for k in range(stop - start):
            e_k = attribution_tensor(maps[k], ctx).double()
            values[start + k] = float(torch.linalg.vector_norm(e_k - a)) / norm
        del x, maps
    ctx.report(1.0, f"{n} samples")
    se = float(values.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return {"sensitivity_max": float(values.max()), "sensitivity_avg": float(values.mean()),
            "sensitivity_avg_se": se}
