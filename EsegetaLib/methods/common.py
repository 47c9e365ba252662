"""Small helpers shared by the method modules: parameter specs used by many methods, map shaping."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from .base import MethodContext, ParamSpec

LAYER_PARAM = ParamSpec(
    "layer", "str", "",
    help="dotted module name inside the network (as in network.named_modules()); empty = automatic "
         "choice (last block at reduced resolution before the classifier)",
    auto=True,
)
CHANNEL_REDUCE_PARAM = ParamSpec(
    "channel_reduce", "choice", "sum", choices=("sum", "mean", "abs_sum"),
    help="how the layer's channels are combined into one spatial map",
)


def is_exported_program(network: torch.nn.Module) -> bool:
    """True for a torch.export program (`.pt2`), unflattened or inlined: its modules are graph
    interpreters, not the network's layers, so module-level rules have nothing to attach to."""
    return any(isinstance(m, torch.fx.GraphModule) or type(m).__module__.startswith("torch.export")
               for m in network.modules())


def resample_layer_map(layer_map: torch.Tensor, spatial, geometry=None) -> torch.Tensor:
    """(B, K, *s) at layer resolution -> (B, K, *spatial), linear interpolation between the layer's
    units placed where they sit on the input grid: unit o at scale * o + offset per axis
    (`geometry`, from methods/layers.layer_geometry: the centres of the units' receptive fields).
    A stride-2 convolution (kernel 3, padding 1) puts unit o at input voxel 2 o, half a voxel from
    where align_corners=False upsampling assumes it (2 o + 0.5).  Beyond the outermost units the map
    keeps their value (border).  geometry None: trilinear with align_corners=False."""
    spatial = tuple(int(v) for v in spatial)
    if geometry is None:
        if tuple(layer_map.shape[2:]) == spatial:
            return layer_map
        mode = "trilinear" if len(spatial) == 3 else ("bilinear" if len(spatial) == 2 else "linear")
        return F.interpolate(layer_map, size=spatial, mode=mode, align_corners=False)
    if tuple(layer_map.shape[2:]) == spatial and all(abs(sc - 1) < 1e-9 and abs(off) < 1e-9 for sc, off in geometry):
        return layer_map
    # grid_sample wants (x, y, z) = (last axis, ..., first axis), normalised with align_corners=True
    axes = []
    for a, (n_in, (scale, offset)) in enumerate(zip(spatial, geometry)):
        n_layer = layer_map.shape[2 + a]
        u = (torch.arange(n_in, dtype=torch.float64) - offset) / scale
        axes.append(torch.zeros_like(u) if n_layer == 1 else 2.0 * u / (n_layer - 1) - 1.0)
    mesh = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack(mesh[::-1], dim=-1).to(layer_map.device, layer_map.dtype)
    grid = grid.expand(layer_map.shape[0], *grid.shape)
    if len(spatial) == 1:
        out = F.grid_sample(layer_map[..., None], torch.stack([grid[..., 0], torch.zeros_like(grid[..., 0])], -1)[:, :, None],
                            mode="bilinear", padding_mode="border", align_corners=True)
        return out[..., 0]
    return F.grid_sample(layer_map, grid, mode="bilinear", padding_mode="border", align_corners=True)


def to_input_grid(layer_map: torch.Tensor, inputs: torch.Tensor, geometry=None) -> torch.Tensor:
    """A (B, 1, *s) layer map -> (B, C, *S) on the input grid.

    Resampled with the layer's sampling geometry when known (`resample_layer_map`), else trilinearly
    (align_corners=False), and shared equally across the input's C channels, so that the channel sum
    shown to the user (MethodResult.map) is the layer map itself.
    """
    spatial = tuple(inputs.shape[2:])
    layer_map = resample_layer_map(layer_map, spatial, geometry)
    channels = inputs.shape[1]
    return (layer_map / channels).expand(-1, channels, *spatial).contiguous()


def reduce_channels(layer_attr: torch.Tensor, how: str) -> torch.Tensor:
    """(B, K, *s) -> (B, 1, *s)."""
    if how == "mean":
        return layer_attr.mean(dim=1, keepdim=True)
    if how == "abs_sum":
        return layer_attr.abs().sum(dim=1, keepdim=True)
    return layer_attr.sum(dim=1, keepdim=True)


def randn_like_on(like: torch.Tensor, shape, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (CPU when none: reproducible on any
    accelerator), returned on `like`'s device and dtype."""
    device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device=device)
    return noise.to(device=like.device, dtype=like.dtype)


def first_tensor(value: Any) -> torch.Tensor:
    """Captum returns a tensor or a 1-tuple depending on the input; we always pass one tensor."""
    if isinstance(value, (tuple, list)):
        return value[0]
    return value


def baselines_of(ctx: MethodContext, inputs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The prepared baseline for this patch; zero when the engine had no `prepare` step (tests)."""
    inputs = ctx.inputs if inputs is None else inputs
    base = ctx.prepared.get("baselines")
    if base is None:
        return torch.zeros_like(inputs)
    return base.to(device=inputs.device, dtype=inputs.dtype)


def baseline_stack(ctx: MethodContext) -> torch.Tensor:
    """All prepared baselines of a distribution (`baselines`, `baselines_1`, ...), stacked as the
    sample dimension Captum's DeepLiftShap/GradientShap expect: (n, C, *S) for a batch of one."""
    keys = ["baselines"] + sorted(
        (k for k in ctx.prepared if k.startswith("baselines_")), key=lambda k: int(k.split("_")[1])
    )
    tensors = [ctx.prepared[k] for k in keys if k in ctx.prepared]
    if not tensors:
        tensors = [torch.zeros_like(ctx.inputs)]
    return torch.cat([t.to(device=ctx.inputs.device, dtype=ctx.inputs.dtype) for t in tensors], dim=0)


def steps_batch(ctx: MethodContext, batch: int, steps: int) -> int:
    """Captum's `internal_batch_size` (examples per forward) from the engine's per-example budget.

    `ctx.internal_batch_size` is how many interpolation steps (or perturbed copies) of ONE example the
    engine wants evaluated per forward pass."""
    per_example = max(1, min(int(ctx.internal_batch_size or 1), steps))
    return per_example * batch
