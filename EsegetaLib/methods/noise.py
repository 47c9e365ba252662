"""Noise tunnels (SmoothGrad, SmoothGradSquared, VarGrad) over any additive gradient method.

Patched exactly by the engine ("noise_tunnel"): for each sample it draws ONE global noise volume
(`draw`), runs the base method additively over the patches of x + noise, applies the base method's
`finalize` (e.g. Saliency's abs) to that sample's global map, and feeds it to an `Aggregator`.
The noise stdev is `stdev_fraction` x the volume's intensity range (99th - 1st percentile), not
Captum's absolute 1.0, which is far too large for z-scored images.

`attribute` below does the same on one window (the whole input), drawing the noise exactly as
Captum's NoiseTunnel does, so that it equals Captum's NoiseTunnel for a seeded generator.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import torch

from .base import MethodContext, MethodSpec, ParamSpec, VolumeStats

NT_TYPES = {"SmoothGrad": "smoothgrad", "SmoothGradSquared": "smoothgrad_sq", "VarGrad": "vargrad"}
BASE_METHODS = ("Saliency", "InputXGradient", "IntegratedGradients", "GuidedBackprop", "Deconvolution",
                "DeepLift", "DeepLiftShap", "GradientShap")


def stdev(stats: VolumeStats, params: Dict[str, Any]) -> float:
    spread = float(stats.high - stats.low)
    if spread <= 0:
        spread = float(stats.std) or 1.0
    return float(params["stdev_fraction"]) * spread


def draw(like: torch.Tensor, std: float, n_samples: int = 1, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Gaussian noise shaped (B * n_samples, C, *S), example-major like Captum's repeat_interleave:
    row b * n_samples + j is sample j of example b.  Drawn on the generator's device (CPU when none:
    reproducible on any accelerator), then moved to `like`'s device."""
    shape = (like.shape[0] * n_samples,) + tuple(like.shape[1:])
    device = generator.device if generator is not None else torch.device("cpu")
    # torch.normal with a std tensor: the same draws as Captum's NoiseTunnel for the same seed
    noise = torch.normal(0.0, torch.full(shape, float(std), dtype=torch.float32, device=device), generator=generator)
    return noise.to(device=like.device, dtype=like.dtype)


class Aggregator:
    """Streaming mean / mean of squares / variance of per-sample maps (Captum's NoiseTunnel formulas)."""

    def __init__(self, nt_type: str):
        self.nt_type = nt_type
        self.count = 0
        self.total: Optional[torch.Tensor] = None
        self.total_sq: Optional[torch.Tensor] = None

    def add(self, sample_map: torch.Tensor) -> None:
        sample_map = sample_map.detach()
        if self.total is None:
            self.total = torch.zeros_like(sample_map)
            self.total_sq = torch.zeros_like(sample_map)
        self.total += sample_map
        self.total_sq += sample_map * sample_map
        self.count += 1

    def result(self) -> torch.Tensor:
        mean = self.total / self.count
        mean_sq = self.total_sq / self.count
        if self.nt_type == "smoothgrad":
            return mean
        if self.nt_type == "smoothgrad_sq":
            return mean_sq
        return mean_sq - mean * mean


def aggregate(sample_maps, nt_type: str) -> torch.Tensor:
    """Aggregate an iterable of per-sample maps (already finalized by the base method)."""
    agg = Aggregator(nt_type)
    for m in sample_maps:
        agg.add(m)
    return agg.result()


def base_spec(params: Dict[str, Any]) -> MethodSpec:
    from .base import get_method
    return get_method(params["base_method"])


def base_params(params: Dict[str, Any]) -> Dict[str, Any]:
    """The base method's parameters: its defaults, overridden by any of ours with the same name."""
    spec = base_spec(params)
    given = {k: v for k, v in params.items() if k in {p.name for p in spec.params}}
    return spec.resolve_params(given)


def prepare(x_full, stats, params, generator=None):
    spec = base_spec(params)
    if spec.prepare is None:
        return {}
    return spec.prepare(x_full, stats, base_params(params), generator)


def _make_attribute(nt_type: str):
    def attribute(ctx: MethodContext):
        spec = base_spec(ctx.params)
        inner = base_params(ctx.params)
        n = int(ctx.params["nt_samples"])
        noise = draw(ctx.inputs, stdev(ctx.stats, ctx.params), n, ctx.generator)
        noise = noise.view(ctx.inputs.shape[0], n, *ctx.inputs.shape[1:])
        agg = Aggregator(nt_type)
        for j in range(n):
            sub = dataclasses.replace(ctx, inputs=ctx.inputs + noise[:, j], params=inner)
            out = spec.attribute(sub)
            sample_map = out[0] if isinstance(out, tuple) else out
            if spec.finalize is not None:
                sample_map = spec.finalize(sample_map, inner)
            agg.add(sample_map)
        return agg.result()
    return attribute


def _params():
    return (
        ParamSpec("base_method", "choice", "Saliency", choices=BASE_METHODS, help="gradient method to smooth"),
        ParamSpec("nt_samples", "int", 16, minimum=1, maximum=1024, help="noisy samples"),
        ParamSpec("stdev_fraction", "float", 0.15, minimum=0.0, maximum=2.0,
                  help="noise stdev as a fraction of the intensity range (99th - 1st percentile)"),
    )


SPECS = [
    MethodSpec(
        name=name, family="gradient", signed=False, needs_baseline=False,
        needs_layer=False, cost=16.0, patching="noise_tunnel", params=_params(),
        attribute=_make_attribute(nt_type), prepare=prepare, captum="NoiseTunnel",
        description={"smoothgrad": "mean of the base method's maps over noisy copies of the input (signed when the base method is)",
                     "smoothgrad_sq": "mean of squared maps over noisy copies",
                     "vargrad": "variance of the maps over noisy copies"}[nt_type],
    )
    for name, nt_type in NT_TYPES.items()
]
