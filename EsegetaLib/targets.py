"""Differentiable segmentation targets: one score per example from a (B, n_classes, *S) output.

The score is sum over voxels of weight * s_c, where s_c is class c's logit or probability and the
weight carries the target region (held fixed, never re-thresholded from a perturbed input) and, in
the sliding-window engine, the window's blending weight. Unlike a count of thresholded voxels
(TorchEsegeta's wrapper), it has a non-zero gradient.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence

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
    if n_classes == 1 and target.activation == "softmax" and target.class_index != 0:
        # A user who forced softmax on a one-channel model never named class 1: say what is wrong.
        raise EsegetaError("softmax needs at least 2 output channels; this model has 1 (a sigmoid model, class 0 = "
                           "the foreground): leave out --activation softmax, or use --activation sigmoid.")
    listed = target.classes if target.classes is not None and not isinstance(target.classes, str) else []
    for c in [target.class_index] + list(listed):
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= int(c) < n_classes:
            raise EsegetaError(
                f"Class index {c!r} is out of range: the model outputs {n_classes} class"
                f"{'es' if n_classes != 1 else ''} (0 to {n_classes - 1})."
            )
    if n_classes == 1 and target.activation == "softmax" and (
            target.score == "probability" or target.region in ("predicted", "boundary", "component", "components")):
        raise EsegetaError(
            "The model has one output channel, where softmax is constant; use activation 'sigmoid'."
        )


def probabilities(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """(B, n_classes, *S) logits -> probabilities (softmax over classes or sigmoid per channel)."""
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)


def class_score_map(logits: torch.Tensor, target: Target, class_index: Optional[int] = None) -> torch.Tensor:
    """(B, n_classes, *S) -> (B, *S): the target class's (or `class_index`'s) logit or probability per voxel."""
    c = int(target.class_index if class_index is None else class_index)
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


def class_mask(probs: np.ndarray, target: Target, c: int) -> np.ndarray:
    """The model's segmentation of class `c` from blended probabilities (n_classes, *S)."""
    if target.activation == "sigmoid":
        return probs[c] > target.threshold
    return probs.argmax(axis=0) == c


def _empty_prediction(probs: np.ndarray, target: Target, c: int, region: str) -> EsegetaError:
    present = sorted(set(np.unique(probs.argmax(axis=0)).tolist())) if target.activation != "sigmoid" \
        else [k for k in range(probs.shape[0]) if (probs[k] > target.threshold).any()]
    return EsegetaError(
        f"The '{region}' region is empty: the model assigns no voxel to class {c} on this volume; "
        f"use region 'whole', 'roi' or 'point', or another class (predicted: {present or 'none'})."
    )


def region_mask(target: Target, shape: Sequence[int], probs: Optional[np.ndarray] = None,
                spacing: Optional[Sequence[float]] = None) -> np.ndarray:
    """The fixed boolean region (I, J, K) of a single target on the input grid (for several targets
    or a boundary band: the union of `resolve_targets`' regions); one-line errors for unusable regions."""
    targets = resolve_targets(target, shape, probs, spacing)
    if len(targets) == 1:
        return targets[0].region
    return np.logical_or.reduce([t.region for t in targets])


def _basic_region(target: Target, shape, probs, c: int) -> np.ndarray:
    if target.region == "whole":
        return np.ones(shape, dtype=bool)
    if target.region in ("predicted", "boundary"):
        mask = class_mask(probs, target, c)
        if not mask.any():
            raise _empty_prediction(probs, target, c, target.region)
        return mask
    if target.region == "roi":
        if target.mask is None:
            raise EsegetaError("Region 'roi' needs a mask: pass Target(mask=boolean array on the volume's grid).")
        mask = np.asarray(target.mask)
        if mask.shape != shape:
            raise EsegetaError(
                f"The ROI mask has shape {mask.shape} but the volume's grid is {shape}; resample the mask onto the volume."
            )
        if not mask.astype(bool).any():
            raise EsegetaError("The ROI mask is empty; draw a region, or use region 'whole' or 'point'.")
        return mask.astype(bool)
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


@dataclass
class ResolvedTarget:
    """One explained score: class `class_index`, weights on the input grid (I, J, K).

    `sign` is +1 on the region (the inside band for a boundary target), -1 on the outside band of a
    boundary target, 0 elsewhere; the weight of a voxel is sign * scale_pos (sign > 0) or
    sign * scale_neg (sign < 0): 1 for reduction 'sum', 1 / count of that side for 'mean'."""

    name: str
    class_index: int
    sign: np.ndarray  # int8 (I, J, K)
    scale_pos: float = 1.0
    scale_neg: float = 1.0
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def region(self) -> np.ndarray:
        return self.sign != 0

    def weights(self, dtype=np.float64) -> np.ndarray:
        w = np.where(self.sign > 0, self.scale_pos, 0.0) - np.where(self.sign < 0, self.scale_neg, 0.0)
        return w.astype(dtype)


def safe_name(text: str) -> str:
    """A target name usable as a file and folder name (letters, digits, '-', '_', '.')."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("._")
    return name or "target"


def _class_name(target: Target, c: int) -> str:
    names = list(target.class_names or [])
    return safe_name(names[c]) if 0 <= c < len(names) and str(names[c]).strip() else f"class_{c}"


def resolve_targets(target: Target, shape: Sequence[int], probs: Optional[np.ndarray] = None,
                    spacing: Optional[Sequence[float]] = None) -> List[ResolvedTarget]:
    """Every score the target asks for: one per class in `target.classes` (or `class_index`), and
    for region 'components' one per connected component of each class; regions held fixed.

    Raises EsegetaError (one line) for unusable regions: empty prediction, a click outside the
    segmentation (naming the nearest segmented voxel), an empty boundary band, no component large
    enough."""
    from . import regions

    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in (spacing if spacing is not None else (1.0, 1.0, 1.0)))
    skipped: List[int] = []
    if isinstance(target.classes, str):
        if target.classes.lower() != "all":
            raise EsegetaError(f"classes must be 'all' or a list of class indices; got {target.classes!r}.")
        n = int(probs.shape[0])
        classes = list(range(n)) if target.activation == "sigmoid" else list(range(1, n))
        if target.region not in ("whole", "roi", "point", "rois"):  # regions from the prediction
            skipped = [c for c in classes if not class_mask(probs, target, c).any()]
            classes = [c for c in classes if c not in skipped]
            if not classes:
                raise EsegetaError("The model predicts no foreground class on this volume; use region 'whole'.")
    else:
        classes = [int(target.class_index)] if target.classes is None else [int(c) for c in target.classes]
    if not classes:
        raise EsegetaError("No class to explain: give at least one class.")
    band = target.boundary_mm
    if target.region == "boundary" and band is None:
        band = max(spacing)
    if band is not None and target.region in ("whole", "point", "rois"):
        raise EsegetaError(f"A boundary band needs a region with a boundary (predicted, component, components or "
                           f"roi); region '{target.region}' has none.")
    if target.geodesic_mm is not None and target.region != "component":
        raise EsegetaError("A geodesic limit (mm) applies to region 'component' only (component:I,J,K:MM).")
    several = len(classes) > 1 or isinstance(target.classes, str)
    out: List[ResolvedTarget] = []
    for c in classes:
        base = _class_name(target, c)
        pieces: List[tuple] = []  # (name, region, within, info)
        if target.region == "component":
            seg = class_mask(probs, target, c)
            what = f"the segmentation of {base}"
            component = regions.component_at(seg, target.point, spacing, what=what)
            point = regions.check_point(target.point, shape)
            info = {"point": list(point), "component_voxels": int(component.sum())}
            within = None
            if target.geodesic_mm is not None:
                within = regions.geodesic_limit(component, point, target.geodesic_mm, spacing)
                info["geodesic_mm"] = float(target.geodesic_mm)
            region = component if within is None else component & within
            pieces.append((f"{base}_component" if several else base, region, within, info, component))
        elif target.region == "components":
            seg = class_mask(probs, target, c)
            if not seg.any():
                raise _empty_prediction(probs, target, c, "components")
            parts = regions.components_by_size(seg, int(target.min_component_voxels))
            if target.max_components is not None:
                parts = parts[:max(1, int(target.max_components))]
            if not parts:
                raise EsegetaError(
                    f"No component of {base} has {target.min_component_voxels} voxels or more; "
                    "lower the minimum size (components:N).")
            for n, part in enumerate(parts, start=1):
                name = f"{base}_component_{n}" if several else f"component_{n}"
                pieces.append((name, part, None, {"component": n, "component_voxels": int(part.sum())}, part))
        elif target.region == "rois":
            if not target.masks:
                raise EsegetaError("Region 'rois' needs masks: pass Target(masks=[boolean arrays on the volume's grid]).")
            labels = list(target.mask_names or [])
            for n, mask in enumerate(target.masks, start=1):
                region = _basic_region(Target(region="roi", mask=mask), shape, probs, c)
                name = safe_name(labels[n - 1]) if n <= len(labels) else f"roi_{n}"
                pieces.append((f"{base}_{name}" if several else name, region, None, {"roi": n}, region))
        else:
            region = _basic_region(target, shape, probs, c)
            pieces.append((base, region, None, {}, region))
        for name, region, within, info, full in pieces:
            sign = region.astype(np.int8)
            if target.region == "roi" and np.asarray(target.mask).min() < 0:
                sign = np.sign(np.asarray(target.mask)).astype(np.int8)  # a signed ROI: a band given as a mask
            if band is not None:
                allowed = None if target.region == "roi" else ~class_mask(probs, target, c)
                inside, outside = regions.boundary_band(full, float(band), spacing, outside_allowed=allowed,
                                                        within=within)
                sign = inside.astype(np.int8) - outside.astype(np.int8)
                info = dict(info, boundary_mm=float(band), inside_voxels=int(inside.sum()),
                            outside_voxels=int(outside.sum()))
            n_pos, n_neg = int((sign > 0).sum()), int((sign < 0).sum())
            mean = target.reduction == "mean"
            info = dict(info, voxels=n_pos + n_neg)
            out.append(ResolvedTarget(name=name, class_index=c, sign=sign,
                                      scale_pos=1.0 / max(n_pos, 1) if mean else 1.0,
                                      scale_neg=1.0 / max(n_neg, 1) if mean else 1.0, info=info))
    if skipped:
        out[0].info["classes_without_prediction"] = skipped
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        for k, t in enumerate(out):
            t.name = f"{t.name}_{k + 1}"
    return out


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
        self.class_index = int(target.class_index)  # the engine switches it between targets

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
        scores = class_score_map(self.logits(x), self.target, self.class_index)
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
