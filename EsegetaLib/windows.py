"""The sliding-window grid: patch size, padding, window positions and blending weights.

Padding is a pure copy map (every padded voxel copies one voxel of the volume, edge or reflect), so
its adjoint `fold` (sum each padded voxel's value back onto its source) turns a gradient-type map on
the padded grid into the exact map on the input grid: for maps of the form (x - x') * grad, copies
of a voxel share its value, so summing their attributions is the attribution through the padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .errors import EsegetaError

Slices = Tuple[slice, slice, slice]


def _round_up(value: int, divisor: int) -> int:
    return int(-(-int(value) // divisor) * divisor)


def _three(value: Union[int, Sequence[int]], what: str) -> Tuple[int, int, int]:
    if isinstance(value, (int, np.integer)):
        value = (int(value),) * 3
    value = tuple(int(v) for v in value)
    if len(value) != 3 or min(value) < 1:
        raise EsegetaError(f"{what} must be one positive integer or three; got {value!r}.")
    return value


def choose_patch(shape: Sequence[int], patch_size, divisor: int, max_window_voxels: int,
                 default_patch: int) -> Tuple[int, int, int]:
    """Patch size per axis, each a multiple of `divisor`.

    None: the whole (padded) volume in one window when it is small enough, else `default_patch`.
    """
    if divisor < 1:
        raise EsegetaError(f"divisor must be >= 1; got {divisor}.")
    if patch_size is None:
        whole = tuple(_round_up(s, divisor) for s in shape)
        if int(np.prod(whole)) <= max_window_voxels:
            return whole
        patch_size = default_patch
    patch = _three(patch_size, "patch_size")
    return tuple(_round_up(p, divisor) for p in patch)


def fit_patch(shape: Sequence[int], patch: Sequence[int], divisor: int) -> Tuple[int, int, int]:
    """Per axis, the window no larger than the volume needs: the volume's size rounded up to
    `divisor` where that is smaller than `patch` (a 34-slice volume gets 48-slice windows at
    divisor 16, not 64: the rest would only explain padding)."""
    return tuple(min(int(p), _round_up(s, divisor)) for s, p in zip(shape, patch))


def _source_index(size: int, padded: int, mode: str) -> np.ndarray:
    """For each position of a padded axis (padding at the end), the source voxel it copies."""
    idx = np.arange(padded)
    if padded == size:
        return idx
    if mode == "reflect" and size > 1:
        period = 2 * (size - 1)
        m = idx % period
        return np.where(m < size, m, period - m)
    return np.minimum(idx, size - 1)  # edge


@dataclass
class WindowGrid:
    """Windows over a volume padded at the end of each axis; weights blend to 1 at every voxel."""

    shape: Tuple[int, int, int]  # the input's spatial shape
    padded_shape: Tuple[int, int, int]
    patch: Tuple[int, int, int]
    overlap: float
    windows: List[Slices]
    importance: torch.Tensor  # (*patch) blending kernel, float64
    count: torch.Tensor  # (*padded_shape) sum of kernels, float64
    index: Tuple[np.ndarray, np.ndarray, np.ndarray]  # padded position -> source position per axis
    requested: Optional[Tuple[int, int, int]] = None  # the patch asked for, before `fit_patch`

    @classmethod
    def build(cls, shape, patch, overlap: float = 0.25, blend: str = "gaussian",
              pad_mode: str = "edge") -> "WindowGrid":
        from monai.inferers.utils import compute_importance_map, dense_patch_slices

        if not 0.0 <= overlap < 1.0:
            raise EsegetaError(f"overlap must be in [0, 1); got {overlap}.")
        if blend not in ("gaussian", "constant"):
            raise EsegetaError(f"blend must be 'gaussian' or 'constant'; got {blend!r}.")
        if pad_mode not in ("edge", "reflect"):
            raise EsegetaError(f"pad mode must be 'edge' or 'reflect'; got {pad_mode!r}.")
        shape = tuple(int(s) for s in shape)
        patch = tuple(int(p) for p in patch)
        padded = tuple(max(s, p) for s, p in zip(shape, patch))
        interval = tuple(max(1, int(p * (1.0 - overlap))) for p in patch)
        raw = dense_patch_slices(padded, patch, interval)
        windows = [tuple(slice(int(s.start), int(s.stop)) for s in w) for w in raw]
        # MONAI's Gaussian kernel (sigma = patch / 8) keeps a small positive floor, so every voxel
        # of the padded grid has a positive total weight.
        kernel = compute_importance_map(patch, mode=blend, sigma_scale=0.125).to(torch.float64)
        count = torch.zeros(padded, dtype=torch.float64)
        for w in windows:
            count[w] += kernel
        index = tuple(_source_index(s, p, pad_mode) for s, p in zip(shape, padded))
        return cls(shape, padded, patch, overlap, windows, kernel, count, index)

    @property
    def needs_padding(self) -> bool:
        return self.padded_shape != self.shape

    def weight(self, window: Slices) -> torch.Tensor:
        """Normalised blending weight of one window (sums to 1 over windows at every voxel)."""
        return self.importance / self.count[window]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(..., I, J, K) -> (..., padded) by copying voxels (edge or reflect)."""
        if not self.needs_padding:
            return x
        i, j, k = (torch.as_tensor(a, device=x.device) for a in self.index)
        return x[..., i[:, None, None], j[None, :, None], k[None, None, :]]

    def fold(self, a: torch.Tensor) -> torch.Tensor:
        """Adjoint of `pad`: sums each padded voxel's value onto the voxel it copies."""
        if not self.needs_padding:
            return a
        for axis, (size, idx) in enumerate(zip(self.shape, self.index)):
            dim = a.dim() - 3 + axis
            out_shape = list(a.shape)
            out_shape[dim] = size
            out = torch.zeros(out_shape, dtype=a.dtype, device=a.device)
            a = out.index_add_(dim, torch.as_tensor(idx, device=a.device), a)
        return a

    def crop(self, a: torch.Tensor) -> torch.Tensor:
        """Keep the input's grid (for maps that are not gradients, e.g. blended CAMs)."""
        i, j, k = self.shape
        return a[..., :i, :j, :k]

    def embed(self, region: torch.Tensor) -> torch.Tensor:
        """A mask on the input grid placed on the padded grid, zero in the padding."""
        out = torch.zeros(region.shape[:-3] + self.padded_shape, dtype=region.dtype)
        i, j, k = self.shape
        out[..., :i, :j, :k] = region
        return out


def describe(grid: WindowGrid, n_active: Optional[int] = None) -> dict:
    info = {
        "patch_size": list(grid.patch),
        "padded_shape": list(grid.padded_shape),
        "overlap": grid.overlap,
        "n_windows": len(grid.windows),
    }
    if n_active is not None:
        info["n_windows_in_region"] = n_active
    if grid.requested is not None and tuple(grid.requested) != tuple(grid.patch):
        info["patch_requested"] = list(grid.requested)
        axes = [f"{name} {size} voxels: window {p} instead of {r}" for name, size, p, r
                in zip("IJK", grid.shape, grid.patch, grid.requested) if p != r]
        info["patch_note"] = ("windows fitted per axis to the volume (its size rounded up to the divisor): "
                              + "; ".join(axes))
    return info
