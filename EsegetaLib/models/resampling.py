"""Differentiable spatial preprocessing: exact separable resampling as a torch layer.

A resampler that treats each axis on its own (spline or linear `resize`, nearest along one axis,
`torch.nn.functional.interpolate`) is a linear map out = M_0 (x) M_1 (x) M_2 applied to the volume,
one matrix (n_out, n_in) per axis.  `axis_matrices` reads those matrices off the library's own
resampling function by resampling unit vectors, so the torch layer reproduces that function (to
float rounding) while autograd differentiates it: maps are then gradients with respect to the
user's own voxels, on the input grid.  Written here because no library exposes its resampling as
a differentiable operator with the same numbers.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

# Other axes of the probe volumes keep this size with a zoom of exactly 1 (an identity for any
# interpolating resampler), so each probe sees only the axis being measured.
_PROBE_WIDTH = 4


def axis_matrices(resample: Callable[[np.ndarray, Sequence[int]], np.ndarray], shape_in: Sequence[int],
                  shape_out: Sequence[int]) -> List[Optional[np.ndarray]]:
    """Per spatial axis, the (n_out, n_in) matrix of `resample(data (C, X, Y, Z), new_shape)`, or
    None where the axis keeps its size.  Probes: channel j holds unit vector e_j along the axis."""
    matrices: List[Optional[np.ndarray]] = []
    for axis, (n_in, n_out) in enumerate(zip(shape_in, shape_out)):
        n_in, n_out = int(n_in), int(n_out)
        if n_in == n_out:
            matrices.append(None)
            continue
        probe_in = [_PROBE_WIDTH] * 3
        probe_in[axis] = n_in
        probe_out = list(probe_in)
        probe_out[axis] = n_out
        data = np.zeros((n_in, *probe_in), dtype=np.float64)
        for j in range(n_in):
            index = [j] + [slice(None)] * 3
            index[1 + axis] = j
            data[tuple(index)] = 1.0
        out = np.asarray(resample(data, probe_out), dtype=np.float64)
        middle = [_PROBE_WIDTH // 2] * 3
        middle[axis] = slice(None)
        matrices.append(np.stack([out[(j, *middle)] for j in range(n_in)], axis=1))  # (n_out, n_in)
    return matrices


class SeparableResample(torch.nn.Module):
    """(B, C, X, Y, Z) -> (B, C, X', Y', Z'): out = M_0 (x) M_1 (x) M_2 x, exact and differentiable.

    `lower`/`upper` (broadcastable to the output, e.g. (C, 1, 1, 1)): clamp after the matrices of
    every axis but `last_axis` (all axes when None), before that axis's matrix, reproducing
    resamplers that clip their output to the input's range (scikit-image `resize(clip=True)`;
    nnU-Net clips per channel, or per slice when it resamples the anisotropic axis separately).
    """

    def __init__(self, matrices: Sequence[Optional[np.ndarray]], lower: Optional[np.ndarray] = None,
                 upper: Optional[np.ndarray] = None, last_axis: Optional[int] = None):
        super().__init__()
        self.identity = [m is None for m in matrices]
        self.last_axis = last_axis
        self.clip = lower is not None and not all(self.identity)
        for axis, m in enumerate(matrices):
            self.register_buffer(f"m{axis}", torch.as_tensor(np.zeros((0, 0)) if m is None else m,
                                                             dtype=torch.float64))
        self.register_buffer("lower", torch.as_tensor(lower if lower is not None else np.zeros(0), dtype=torch.float64))
        self.register_buffer("upper", torch.as_tensor(upper if upper is not None else np.zeros(0), dtype=torch.float64))

    def _axis(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        if self.identity[axis]:
            return x
        m = getattr(self, f"m{axis}").to(x.dtype)
        return torch.movedim(torch.matmul(torch.movedim(x, 2 + axis, -1), m.T), -1, 2 + axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for axis in range(3):
            if axis != self.last_axis:
                x = self._axis(x, axis)
        if self.clip:
            x = torch.clamp(x, self.lower.to(x.dtype), self.upper.to(x.dtype))
        if self.last_axis is not None:
            x = self._axis(x, self.last_axis)
        return x

    def output_shape(self, shape: Sequence[int]) -> List[int]:
        return [int(s) if self.identity[a] else int(getattr(self, f"m{a}").shape[0]) for a, s in enumerate(shape)]


def _dims(values, digits: int = 3) -> str:
    return "x".join(f"{float(v):.{digits}g}" if not float(v).is_integer() else str(int(v)) for v in values)


def model_window_text(patch: Sequence[int], model_spacing: Sequence[float], model_shape: Sequence[int],
                      input_spacing: Sequence[float], input_axes: Optional[Sequence[int]] = None,
                      n_windows: Optional[int] = None) -> str:
    """The window a resampling model runs on its own grid, and what it covers on the input grid.

    patch, model_spacing (mm), model_shape: on the model's grid, in the model's axis order;
    input_spacing (mm): the input's, along I, J, K; input_axes[a]: the input axis that model axis a
    runs along (default: the same). Returns e.g. "16x16x16 voxels at 0.8x0.8x0.8 mm on the model's
    16x16x8 grid (1 window), = 32x32x32 input voxels (I x J x K at 0.4x0.4x0.4 mm)"."""
    axes = list(range(len(patch))) if input_axes is None else [int(a) for a in input_axes]
    on_input = [0.0] * len(patch)
    for a, (p, m) in enumerate(zip(patch, model_spacing)):
        on_input[axes[a]] = float(p) * float(m) / float(input_spacing[axes[a]])
    count = "" if n_windows is None else f" ({n_windows} window{'s' if n_windows != 1 else ''})"
    return (f"{_dims(patch)} voxels at {_dims(model_spacing)} mm on the model's {_dims(model_shape)} grid{count}, "
            f"= {_dims([round(v, 1) for v in on_input])} input voxels (I x J x K at {_dims(input_spacing)} mm)")


class ResampledNetwork(torch.nn.Module):
    """A model card's network on its own grid, explained on the volume's: (B, C, I, J, K) ->
    trilinear resampling to the card's spacing (`torch.nn.functional.interpolate`, align_corners
    False: voxel centres, the field of view kept) -> MONAI `sliding_window_inference` at the card's
    patch size (overlap 0.25, Gaussian blending) -> logits resampled back to (I, J, K), trilinear.
    Differentiable throughout, so maps are gradients with respect to the volume's own voxels."""

    whole_volume = True  # the engine gives it the whole volume in one window

    def __init__(self, network: torch.nn.Module, shape: Sequence[int], spacing: Sequence[float],
                 model_spacing: Sequence[float], patch_size: Optional[Sequence[int]], divisor: Optional[int],
                 head=0):
        super().__init__()
        self.network = network
        self.shape = [int(s) for s in shape]
        self.model_shape = [max(1, int(round(n * float(s) / float(m))))
                            for n, s, m in zip(shape, spacing, model_spacing)]
        divisor = int(divisor or 1)
        patch = list(patch_size or [96, 96, 96])
        self.roi = [max(divisor, int(np.ceil(min(p, n) / divisor)) * divisor) for p, n in zip(patch, self.model_shape)]
        self.head = head
        self.record = {"what": "model card spacing: the network runs on its own grid inside the explained function",
                       "resampled_from": {"shape": self.shape, "spacing": [float(s) for s in spacing]},
                       "resampled_to": {"shape": self.model_shape, "spacing": [float(m) for m in model_spacing]},
                       "resampling": "trilinear (torch.nn.functional.interpolate, align_corners=False), in and out",
                       "sliding_window": {"roi_size": self.roi, "overlap": 0.25, "blend": "gaussian",
                                          "implementation": "monai.inferers.sliding_window_inference"}}
        # what `explain` reports as the window: the model's, not the engine's one whole-volume pass
        self.window_text = model_window_text(self.roi, model_spacing, self.model_shape, spacing)

    def _predict(self, x):
        from ..targets import select_head

        return select_head(self.network(x), self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from monai.inferers import sliding_window_inference

        y = torch.nn.functional.interpolate(x, size=self.model_shape, mode="trilinear", align_corners=False)
        logits = sliding_window_inference(y, self.roi, 1, self._predict, overlap=0.25, mode="gaussian")
        return torch.nn.functional.interpolate(logits.to(x.dtype), size=self.shape, mode="trilinear",
                                               align_corners=False)
