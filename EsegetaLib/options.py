"""Options shared by the engine, the CLI and the Slicer module (one definition, no copies)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import numpy as np

REGIONS = ("predicted", "whole", "roi", "point", "component", "components", "boundary", "rois")
SCORES = ("logit", "probability")
ACTIVATIONS = ("softmax", "sigmoid")
REDUCTIONS = ("sum", "mean")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class Target:
    """What is explained: one differentiable score for `class_index` over a region.

    region:
      predicted - voxels the model assigns to the class on the unperturbed input (mask held fixed);
      whole     - every voxel;
      roi       - `mask`, a boolean array on the input's spatial grid (or a signed one: +1 / -1, e.g.
                  a boundary band from an earlier run);
      point     - the voxel `point` (index on the input grid), or a ball of `radius` voxels;
      component - the connected component (26-connected) of the class's predicted segmentation that
                  contains `point`, held fixed like `predicted`; with `geodesic_mm`, only its voxels
                  within that distance of the point along the component ("this branch near here");
      components- every component of at least `min_component_voxels` voxels: one target each
                  (named component_1, component_2, ... largest first; at most
                  `max_components` of them when set);
      boundary  - `predicted` with a boundary band (`boundary_mm`, see below);
      rois      - `masks`, several boolean arrays: one target each (named by `mask_names`, else
                  roi_1, roi_2, ...), e.g. every segment of a segmentation.
    boundary_mm: when set (or region 'boundary'), the score contrasts the class's score just inside
      the region's boundary (+1, voxels within boundary_mm of the outside) with just outside it (-1,
      non-class voxels within boundary_mm of the region): "why is the wall here?". Works with
      predicted, component, components and roi. None with region 'boundary' = the largest spacing.
    classes: several classes at once (one target each, same region kind); None = `class_index` only.
    class_names: names for the targets (index -> name), else "class_<c>".
    score: `logit` or `probability` (softmax over classes, or sigmoid per channel: `activation`).
    head: which output to use when the network returns a list/tuple (index) or dict (key);
      default 0 = the first element, the full-resolution head of MONAI/nnU-Net deep supervision.
    """

    class_index: int = 1
    region: str = "predicted"
    score: str = "logit"
    activation: str = "softmax"
    reduction: str = "sum"
    mask: Optional[np.ndarray] = None
    point: Optional[Tuple[int, int, int]] = None
    radius: float = 0.0
    threshold: float = 0.5
    head: Union[int, str] = 0
    geodesic_mm: Optional[float] = None
    boundary_mm: Optional[float] = None
    min_component_voxels: int = 27
    max_components: Optional[int] = None
    masks: Optional[Sequence[np.ndarray]] = None
    mask_names: Optional[Sequence[str]] = None
    classes: Optional[Union[Sequence[int], str]] = None  # or "all": every foreground class predicted
    class_names: Optional[Sequence[str]] = None


@dataclass
class EngineOptions:
    """How the engine runs. `patch_size=None` means: the whole volume in one window if it has at
    most `max_window_voxels` voxels, else `default_patch`.  `batch_size='auto'` means the largest
    batch that fits, halved on out-of-memory.  `divisor`: spatial sizes are padded to a multiple of
    it (UNets with k poolings need 2**k)."""

    device: str = "auto"
    # "auto": bf16 autocast where the device computes bf16 natively (device.native_bf16) and the
    # method's completeness check still holds (else that method is rerun in fp32); fp32 elsewhere.
    precision: str = "auto"
    patch_size: Optional[Union[int, Sequence[int]]] = None
    overlap: float = 0.25
    batch_size: Union[int, str] = "auto"
    blend: str = "gaussian"
    divisor: int = 16
    seed: int = 0
    max_window_voxels: int = 128 ** 3
    default_patch: int = 96
    # Per axis, shrink a window the volume does not fill to the volume's size rounded up to the
    # divisor (windows.fit_patch). False keeps the patch as given: for networks that need a fixed
    # input size (e.g. MONAI UNETR's img_size).
    fit_patch: bool = True
    host_accumulator: Union[bool, str] = "auto"
    # Several targets: how many share one forward per window and one batched backward (memory
    # grows with it: the backward runs this many cotangents at once).
    target_batch: int = 8
    extra: dict = field(default_factory=dict)


BUNDLED_MODEL_NAMES = ("bundled", "default")  # what `--model`, study files and Slicer accept for it


def is_bundled_model(model) -> bool:
    """True for no model (None) or the names `bundled`/`default`: the bundled vessel UNet."""
    return model is None or str(model).strip().lower() in BUNDLED_MODEL_NAMES
