"""Differentiable segmentation targets: one score per example from a (B, n_classes, *S) output.

The score is sum over voxels of weight * s_c, where s_c is class c's logit or probability and the
weight carries the target region (held fixed, never re-thresholded from a perturbed input) and, in
the sliding-window engine, the window's blending weight. Unlike a count of thresholded voxels
(TorchEsegeta's wrapper), it has a non-zero gradient.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .device import autocast
from .errors import EsegetaError
from .options import ACTIVATIONS, REDUCTIONS, REGIONS, SCORES, Target


def select_head(output: Any, head: Any = 0) -> torch.Tensor:
    """The output used for the target: list/tuple by index, dict by key (first value by default)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        if head in output:
            return output[head]
        if isinstance(head, int) and 0 <= head < len(output) and head not in output:
            return list(output.values())[head]
        raise EsegetaError(
            f"The model returns a dict without head {head!r}; choose one of {', '.join(map(str, output))}."
        )
    if isinstance(output, (list, tuple)):
        if not isinstance(head, int) or not -len(output) <= head < len(output):
            raise EsegetaError(
                f"The model returns {len(output)} outputs; head must be an index 0..{len(output) - 1}, got {head!r}."
            )
        return output[head]
    raise EsegetaError(f"The model returned a {type(output).__name__}; expected a tensor, list, tuple or dict.")


def check_target(target: Target) -> None:
    """Reject option values that are not understood (one line each)."""
    for name, value, allowed in (("region", target.region, REGIONS), ("score", target.score, SCORES),
                                 ("activation", target.activation, ACTIVATIONS),
                                 ("reduction", target.reduction, REDUCTIONS)):
        if value not in allowed:
            raise EsegetaError(f"Target {name} must be one of {', '.join(allowed)}; got {value!r}.")


def check_class(target: Target, n_classes: int) -> None:
    c = target.class_index
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= int(c) < n_classes:
        raise EsegetaError(
            f"Class index {c!r} is out of range: the model outputs {n_classes} class"
            f"{'es' if n_classes != 1 else ''} (0 to {n_classes - 1})."
        )
    if n_classes == 1 and target.activation == "softmax" and (
            target.score == "probability" or target.region == "predicted"):
        raise EsegetaError(
            "The model has one output channel, where softmax is constant; use activation 'sigmoid'."
        )


def probabilities(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """(B, n_classes, *S) logits -> probabilities (softmax over classes or sigmoid per channel)."""
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)


def class_score_map(logits: torch.Tensor, target: Target) -> torch.Tensor:
    """(B, n_classes, *S) -> (B, *S): the target class's logit or probability per voxel."""
    c = int(target.class_index)
    if target.score == "logit":
        return logits[:, c]
    if target.activation == "sigmoid":
        return torch.sigmoid(logits[:, c])
    return torch.softmax(logits, dim=1)[:, c]


def labels_from(probs: np.ndarray, target: Target) -> np.ndarray:
    """Label map from blended probabilities (n_classes, *S).

    softmax: argmax class index. sigmoid: channel index + 1 of the most probable channel above
    the threshold, 0 elsewhere (sigmoid channels have no background channel).
    """
    if target.activation == "sigmoid":
        best = probs.argmax(axis=0)
        above = probs.max(axis=0) > target.threshold
        labels = np.where(above, best + 1, 0)
    else:
        labels = probs.argmax(axis=0)
    return labels.astype(np.uint8 if probs.shape[0] < 255 else np.int16)


def region_mask(target: Target, shape: Sequence[int], probs: Optional[np.ndarray] = None) -> np.ndarray:
    """The fixed boolean region (I, J, K) on the input grid; one-line errors for unusable regions."""
    shape = tuple(int(s) for s in shape)
    c = int(target.class_index)
    if target.region == "whole":
        return np.ones(shape, dtype=bool)
    if target.region == "predicted":
        if target.activation == "sigmoid":
            mask = probs[c] > target.threshold
        else:
            mask = probs.argmax(axis=0) == c
        if not mask.any():
            present = sorted(set(np.unique(probs.argmax(axis=0)).tolist())) if target.activation != "sigmoid" \
                else [k for k in range(probs.shape[0]) if (probs[k] > target.threshold).any()]
            raise EsegetaError(
                f"The 'predicted' region is empty: the model assigns no voxel to class {c} on this volume; "
                f"use region 'whole', 'roi' or 'point', or another class (predicted: {present or 'none'})."
            )
        return mask
    if target.region == "roi":
        if target.mask is None:
            raise EsegetaError("Region 'roi' needs a mask: pass Target(mask=boolean array on the volume's grid).")
        mask = np.asarray(target.mask)
        if mask.shape != shape:
            raise EsegetaError(
                f"The ROI mask has shape {mask.shape} but the volume's grid is {shape}; resample the mask onto the volume."
            )
        mask = mask.astype(bool)
        if not mask.any():
            raise EsegetaError("The ROI mask is empty; draw a region, or use region 'whole' or 'point'.")
        return mask
    # point
    if target.point is None or len(target.point) != 3:
        raise EsegetaError("Region 'point' needs a voxel index: pass Target(point=(i, j, k)).")
    point = tuple(int(round(float(p))) for p in target.point)
    if any(not 0 <= p < s for p, s in zip(point, shape)):
        raise EsegetaError(f"Point {point} is outside the volume of shape {shape}; pick a voxel inside it.")
    if target.radius < 0:
        raise EsegetaError(f"Point radius must be >= 0 voxels; got {target.radius}.")
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    dist2 = sum((g - p) ** 2 for g, p in zip(grids, point))
    return dist2 <= float(target.radius) ** 2


class TargetScore(nn.Module):
    """(B, C, *S) patch, (B, 1, *S) weights -> (B,) score = sum(weights * class score map).

    An `nn.Module` holding the network as a child, so that Captum's hook-based methods find its
    layers. The network runs under the engine's autocast; the weighted sum is in full precision.
    """

    def __init__(self, network: nn.Module, target: Target, device: torch.device,
                 amp_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.network = network
        self.target = target
        self.device = device
        self.amp_dtype = amp_dtype

    @contextlib.contextmanager
    def full_precision(self) -> Iterator[None]:
        """Autocast off within the block: scores of the function being explained (the full-precision
        model), e.g. the endpoints F(x), F(b) of a completeness check of a map computed in bf16."""
        saved, self.amp_dtype = self.amp_dtype, None
        try:
            yield
        finally:
            self.amp_dtype = saved

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.amp_dtype):
            out = select_head(self.network(x), self.target.head)
        check_output(out, x)
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        scores = class_score_map(self.logits(x), self.target)
        return (scores * weights[:, 0]).flatten(1).sum(dim=1)


def check_output(out: Any, x: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor) or out.dim() != x.dim():
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EsegetaError(
            f"The model's output {shape} is not (batch, classes, *spatial) for input {tuple(x.shape)}; "
            "Esegeta explains voxel-wise segmentation outputs."
        )
    if out.shape[2:] != x.shape[2:] or out.shape[0] != x.shape[0]:
        raise EsegetaError(
            f"The model's output grid {tuple(out.shape[2:])} differs from its input grid {tuple(x.shape[2:])}; "
            "resample the output to the input grid inside the model (or pick the full-resolution head)."
        )
