"""Options shared by the engine, the CLI and the Slicer module (one definition, no copies)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import numpy as np

REGIONS = ("predicted", "whole", "roi", "point")
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
      roi       - `mask`, a boolean array on the input's spatial grid;
      point     - the voxel `point` (index on the input grid), or a ball of `radius` voxels.
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
    extra: dict = field(default_factory=dict)


BUNDLED_MODEL_NAMES = ("bundled", "default")  # what `--model`, study files and Slicer accept for it


def is_bundled_model(model) -> bool:
    """True for no model (None) or the names `bundled`/`default`: the bundled vessel UNet."""
    return model is None or str(model).strip().lower() in BUNDLED_MODEL_NAMES
