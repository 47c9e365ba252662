"""Reference inputs ("baselines") for Integrated Gradients, DeepLift, occlusion and friends.

Why not zero: InstanceNorm/GroupNorm networks are nearly invariant to intensity scale, so the
straight path from a zero volume to x crosses a region where the network output barely changes and
then jumps near alpha = 0 (normalising a near-constant volume); IG's completeness error is 80-96 %
there (DESIGN.md section 3).  A blurred copy of the input keeps the intensity distribution's range
and removes the fine structure that the segmentation depends on, and the path stays on normal-looking
volumes; this is the default.

`prepare_baselines(x_full, stats, params, generator)` is a `MethodSpec.prepare`: it receives the
whole volume (1, C, *S) once and returns {"baselines": tensor like x_full} (plus `baselines_1`, ...
for methods that average over a distribution of baselines), which the engine slices per patch.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EsegetaError
from .base import ParamSpec, VolumeStats
from .common import randn_like_on

BASELINE_CHOICES = ("blur", "constant_low", "zero", "mean", "noise", "user")
DEFAULT_BASELINE = "blur"

BASELINE_PARAMS = (
    ParamSpec("baseline", "choice", DEFAULT_BASELINE, choices=BASELINE_CHOICES,
              help="reference input: blur (Gaussian-blurred input, default: works on InstanceNorm/GroupNorm "
                   "networks), constant_low (1st-percentile intensity), zero, mean, noise, user"),
    ParamSpec("blur_sigma_mm", "float", 0.0, minimum=0.0, maximum=1000.0,
              help="Gaussian sigma of the blur baseline in mm; 0 = automatic (8 voxels of the coarsest spacing)", auto=True),
    ParamSpec("baseline_volume", "str", "",
              help="for baseline=user: path to a .npy or NIfTI volume (or an array) on the input grid"),
)

AUTO_BLUR_VOXELS = 8.0


def _gaussian_kernel(sigma_vox: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma_vox)))
    grid = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (grid / sigma_vox) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(x: torch.Tensor, sigma_mm: float, spacing: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, *S) with a sigma in millimetres (per-axis voxel sigma from
    the spacing), reflect-padded so the volume's edges keep their intensity."""
    out = x
    spatial_dims = x.dim() - 2
    for axis in range(spatial_dims):
        sigma_vox = float(sigma_mm) / float(spacing[axis])
        if sigma_vox <= 0.0:
            continue
        kernel = _gaussian_kernel(sigma_vox).to(device=x.device, dtype=x.dtype)
        size = out.shape[2 + axis]
        radius = (kernel.numel() - 1) // 2
        moved = out.movedim(2 + axis, -1)
        lead = moved.shape[:-1]
        flat = moved.reshape(-1, 1, size)
        mode = "reflect" if size > radius else "replicate"
        flat = F.pad(flat, (radius, radius), mode=mode)
        flat = F.conv1d(flat, kernel.view(1, 1, -1))
        out = flat.reshape(*lead, size).movedim(-1, 2 + axis)
    return out


def _load_user_volume(value: Any, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu().numpy()
    elif isinstance(value, np.ndarray):
        array = value
    elif isinstance(value, (str, Path)) and str(value):
        path = Path(value)
        if not path.exists():
            raise EsegetaError(f"baseline volume '{path}' does not exist; give a .npy or NIfTI file on the input grid.")
        if path.suffix == ".npy":
            array = np.load(path)
        else:
            try:
                import nibabel
            except ImportError:  # pragma: no cover - nibabel is a core dependency
                raise EsegetaError("reading a NIfTI baseline needs nibabel: pip install nibabel") from None
            array = np.asarray(nibabel.load(str(path)).dataobj)
            if array.ndim == 4:  # NIfTI keeps channels last
                array = np.moveaxis(array, -1, 0)
    else:
        raise EsegetaError("baseline=user needs 'baseline_volume': a .npy/NIfTI path or an array on the input grid.")
    tensor = torch.as_tensor(np.asarray(array, dtype=np.float32), device=like.device, dtype=like.dtype)
    spatial = tuple(like.shape[2:])
    if tuple(tensor.shape) == spatial:
        tensor = tensor.expand(like.shape[1], *spatial)
    if tuple(tensor.shape) != tuple(like.shape[1:]):
        raise EsegetaError(
            f"user baseline has shape {tuple(tensor.shape)} but the input is {tuple(like.shape[1:])}; "
            "resample it to the input grid first."
        )
    return tensor.unsqueeze(0).expand_as(like).clone()


def blur_sigma_used(params: Dict[str, Any], stats: VolumeStats) -> float:
    """The blur baseline's Gaussian sigma in mm: `blur_sigma_mm`, or when it is 0 (automatic)
    AUTO_BLUR_VOXELS voxels of the coarsest spacing."""
    sigma = float(params.get("blur_sigma_mm") or 0.0)
    return sigma if sigma > 0.0 else AUTO_BLUR_VOXELS * max(float(s) for s in stats.spacing)


def make_baseline(x: torch.Tensor, stats: VolumeStats, params: Dict[str, Any],
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One baseline volume shaped like x (B, C, *S) for the choice in params['baseline']."""
    choice = params.get("baseline", DEFAULT_BASELINE)
    if choice == "zero":
        return torch.zeros_like(x)
    if choice == "constant_low":
        return torch.full_like(x, float(stats.low))
    if choice == "mean":
        return torch.full_like(x, float(stats.mean))
    if choice == "noise":
        # Gaussian noise with the volume's own mean and spread: no structure, same intensities.
        return randn_like_on(x, x.shape, generator) * float(stats.std) + float(stats.mean)
    if choice == "blur":
        return gaussian_blur(x, blur_sigma_used(params, stats), stats.spacing)
    if choice == "user":
        return _load_user_volume(params.get("baseline_volume"), x)
    raise EsegetaError(f"unknown baseline '{choice}'; choose one of {', '.join(BASELINE_CHOICES)}.")


def prepare_baselines(x_full: torch.Tensor, stats: VolumeStats, params: Dict[str, Any],
                      generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """`MethodSpec.prepare` for single-baseline methods."""
    with torch.no_grad():
        return {"baselines": make_baseline(x_full, stats, params, generator)}


def prepare_baseline_distribution(x_full: torch.Tensor, stats: VolumeStats, params: Dict[str, Any],
                                  generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """`MethodSpec.prepare` for DeepLiftShap/GradientShap: `n_baselines` references, the chosen
    baseline plus Gaussian perturbations of it (stdev `baseline_noise` x intensity spread), drawn
    once for the whole volume so that every patch sees the same distribution (additive exactness)."""
    with torch.no_grad():
        base = make_baseline(x_full, stats, params, generator)
        count = int(params.get("n_baselines", 1))
        spread = float(params.get("baseline_noise", 0.0)) * max(float(stats.high - stats.low), 1e-12)
        out = {"baselines": base}
        for k in range(1, count):
            out[f"baselines_{k}"] = base + randn_like_on(x_full, x_full.shape, generator) * spread
        return out
