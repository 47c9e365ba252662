"""RISE (Petsiuk et al. 2018), written here because Captum lacks it, in 3D.

Random low-resolution binary grids (each cell kept with probability p), upsampled trilinearly and
randomly shifted by up to one cell so that masks are smooth and unaligned; the map is the
score-weighted mean of the masks:  S = sum_i F(x * M_i + b * (1 - M_i)) * M_i / (N * p).
Removed parts are filled with the baseline b (the blurred input by default) instead of zero, which
an InstanceNorm network would simply normalise away.  Runs "global" on the engine's patched score.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .base import MethodContext, MethodSpec, ParamSpec
from .baselines import BASELINE_PARAMS, prepare_baselines
from .features import REGION_PARAMS, crop_problem, uncrop


def make_masks(n: int, spatial: Sequence[int], cells: Sequence[int], p_keep: float,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(n, 1, *spatial) smooth masks in [0, 1] (CPU float32)."""
    spatial = tuple(int(s) for s in spatial)
    cells = tuple(max(1, int(c)) for c in cells)
    cell_size = [math.ceil(s / c) for s, c in zip(spatial, cells)]
    device = generator.device if generator is not None else torch.device("cpu")
    grid = (torch.rand((n, 1) + cells, generator=generator, device=device) < p_keep).float().cpu()
    up_size = tuple((c + 1) * cs for c, cs in zip(cells, cell_size))
    up = F.interpolate(grid, size=up_size, mode="trilinear", align_corners=False) if len(spatial) == 3 else \
        F.interpolate(grid, size=up_size, mode="bilinear", align_corners=False)
    masks = torch.empty((n, 1) + spatial)
    shifts = torch.stack([torch.randint(0, cs, (n,), generator=generator, device=device).cpu()
                          for cs in cell_size], dim=1)
    for i in range(n):
        index = tuple(slice(int(o), int(o) + s) for o, s in zip(shifts[i], spatial))
        masks[i] = up[(i, slice(None)) + index]
    return masks


def rise_saliency(forward, x: torch.Tensor, baseline: torch.Tensor, masks: torch.Tensor, p_keep: float,
                  forward_args: tuple = (), batch: int = 1) -> torch.Tensor:
    """S = sum_i F(x M_i + b (1 - M_i)) M_i / (N p), shared equally over x's channels: (1, C, *S)."""
    total = torch.zeros((1, 1) + tuple(x.shape[2:]), dtype=torch.float64, device=x.device)
    n = masks.shape[0]
    with torch.no_grad():
        for start in range(0, n, batch):
            m = masks[start:start + batch].to(device=x.device, dtype=x.dtype)
            perturbed = x * m + baseline * (1.0 - m)
            args = tuple(a.expand(m.shape[0], *a.shape[1:]) if isinstance(a, torch.Tensor) and a.dim() > 0
                         and a.shape[0] == 1 else a for a in forward_args)
            scores = forward(perturbed, *args).reshape(-1).to(torch.float64)
            total += (scores.view(-1, *([1] * (m.dim() - 1))) * m.to(torch.float64)).sum(dim=0, keepdim=True)
    sal = total / (n * p_keep)
    return (sal / x.shape[1]).expand(-1, x.shape[1], *x.shape[2:]).to(x.dtype).contiguous()


def rise(ctx: MethodContext):
    forward, crop, base, box, cropped = crop_problem(ctx)
    spatial = tuple(crop.shape[2:])
    # cells sized relative to the whole volume, so a restricted box keeps the same feature scale
    cell_vox = [max(1, math.ceil(ctx.params["cell_fraction"] * n)) for n in ctx.stats.shape]
    cells = [max(1, math.ceil(s / c)) for s, c in zip(spatial, cell_vox)]
    generator = torch.Generator().manual_seed(int(ctx.params["seed"]))
    masks = make_masks(ctx.params["n_masks"], spatial, cells, ctx.params["p_keep"], generator)
    sal = rise_saliency(forward, crop, base, masks, ctx.params["p_keep"], tuple(ctx.forward_args or ()),
                        max(1, int(ctx.internal_batch_size or 1)))
    return uncrop(sal, ctx.inputs, box) if cropped else sal


SPECS = [
    MethodSpec(
        name="RISE", family="perturbation", signed=True, needs_baseline=True, needs_layer=False, cost=171.0,
        patching="global",
        params=(ParamSpec("n_masks", "int", 512, minimum=1, maximum=100000, help="random masks"),
                ParamSpec("cell_fraction", "float", 0.125, minimum=0.01, maximum=1.0,
                          help="mask cell edge as a fraction of each volume axis"),
                ParamSpec("p_keep", "float", 0.5, minimum=0.01, maximum=0.99, help="probability a cell is kept"),
                ParamSpec("seed", "int", 0, minimum=0, maximum=2 ** 31 - 1, help="seed of the masks"),)
        + REGION_PARAMS + BASELINE_PARAMS,
        attribute=rise, prepare=prepare_baselines, captum=None,
        description="randomized input sampling: score-weighted average of random smooth masks",
    ),
]
