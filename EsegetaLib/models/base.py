"""What every model format shares: the model card, the description of what was loaded, the
intensity normalisation as a differentiable first layer, and tensor-only loading.

Why the normalisation is a layer: attribution methods differentiate the function they are given.
With the normalisation as the network's first (differentiable) layer, whose constants are computed
once from the volume and then held fixed, every map is on the original intensity grid, and
perturbing the input does not silently re-normalise it.  Formats whose model works on another grid
(nnU-Net plans, a MONAI bundle's Spacingd) put their resampling inside that function as well
(`models.resampling`), so maps stay gradients with respect to the user's own voxels.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import EsegetaError

NORMALIZATIONS = ("zscore", "percentile", "minmax", "none")
DEFAULT_CARD = "default_model.json"
ACTIVATIONS = ("softmax", "sigmoid")
_ARBITRARY_PICKLE = ("refused to unpickle {path}: it holds Python objects beyond tensors, and loading "
                     "a pickle can run arbitrary code; export the model with torch.jit.script/trace "
                     "or torch.export, or save its state_dict and describe it in a model card "
                     "(docs/readme/models.md)")


@dataclass
class ModelCard:
    """What a model is and what it expects; stored as JSON next to its weights.

    architecture: a class in `monai.networks.nets` (e.g. "UNet"), or "torchscript" / "export" when
    `weights` is a TorchScript / `.pt2` file. `weights` is relative to the card's folder.
    normalization: {"type": "zscore"|"percentile"|"minmax"|"none", ...}: percentile takes "lower"
    and "upper" percentiles mapped to 0 and 1 and "clip" (clipping zeroes the gradient of clipped
    voxels); zscore takes "nonzero" (statistics over non-zero voxels only). Constants are per channel.
    head: which output of a deep-supervision network (list/tuple index or dict key) is the result.
    """

    name: str
    architecture: str
    weights: Optional[str] = None
    arguments: Dict[str, Any] = field(default_factory=dict)
    in_channels: Optional[int] = None
    classes: Optional[List[str]] = None
    activation: str = "softmax"
    head: Union[int, str] = 0
    normalization: Dict[str, Any] = field(default_factory=lambda: {"type": "none"})
    patch_size: Optional[List[int]] = None
    divisor: Optional[int] = None
    spacing: Optional[List[float]] = None
    description: str = ""
    metrics: Dict[str, Any] = field(default_factory=dict)
    training: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict, source: str = "model card") -> "ModelCard":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise EsegetaError(f"{source}: unknown field(s) {', '.join(unknown)}; known: "
                               f"{', '.join(sorted(known))}")
        for required in ("name", "architecture"):
            if required not in data:
                raise EsegetaError(f"{source}: the field '{required}' is missing")
        card = cls(**data)
        card.normalization = _normalization_spec(card.normalization, source)
        if card.activation not in ("softmax", "sigmoid"):
            raise EsegetaError(f"{source}: activation '{card.activation}' must be softmax or sigmoid")
        if card.classes is not None and len(card.classes) < 1:
            raise EsegetaError(f"{source}: 'classes' must name at least one class")
        return card

    @classmethod
    def read(cls, path) -> "ModelCard":
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise EsegetaError(f"{path} is not a valid model card (JSON error: {exc.msg} at line "
                               f"{exc.lineno})") from exc
        if not isinstance(data, dict):
            raise EsegetaError(f"{path} is not a model card: expected a JSON object")
        return cls.from_dict(data, source=str(path))

    def write(self, path) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(asdict(self), fh, indent=2)
            fh.write("\n")


def _normalization_spec(spec, source: str) -> Dict[str, Any]:
    """Accept "zscore" or {"type": "zscore", ...}; fill defaults; reject unknown kinds."""
    if spec is None:
        spec = "none"
    if isinstance(spec, str):
        spec = {"type": spec}
    spec = dict(spec)
    kind = spec.get("type", "none")
    if kind not in NORMALIZATIONS:
        raise EsegetaError(f"{source}: normalization '{kind}' must be one of {', '.join(NORMALIZATIONS)}")
    if kind == "percentile":
        spec.setdefault("lower", 0.5)
        spec.setdefault("upper", 99.5)
        spec.setdefault("clip", True)
        if not 0 <= spec["lower"] < spec["upper"] <= 100:
            raise EsegetaError(f"{source}: percentile normalization needs 0 <= lower < upper <= 100")
    if kind == "zscore":
        spec.setdefault("nonzero", False)
    if kind == "minmax":
        spec.setdefault("clip", False)
    return spec


def make_normalization(array: np.ndarray, spec) -> "Any":
    """An `IntensityNormalization` layer whose constants come from `array` (C, I, J, K), per channel."""
    spec = _normalization_spec(spec, "normalization")
    array = np.asarray(array)
    if array.ndim == 3:
        array = array[None]
    offsets, scales = [], []
    for channel in array.astype(np.float64):
        kind = spec["type"]
        if kind == "none":
            lo, width = 0.0, 1.0
        elif kind == "zscore":
            values = channel[channel != 0] if spec["nonzero"] and np.any(channel != 0) else channel
            lo, width = float(values.mean()), float(values.std())
        elif kind == "minmax":
            lo, width = float(channel.min()), float(channel.max() - channel.min())
        else:
            lo, hi = np.percentile(channel, [spec["lower"], spec["upper"]])
            lo, width = float(lo), float(hi - lo)
        # A constant channel would divide by zero: map it to 0 instead of NaN.
        offsets.append(lo)
        scales.append(1.0 / width if width > 1e-12 else 1.0)
    clip = (0.0, 1.0) if spec["type"] in ("percentile", "minmax") and spec.get("clip") else None
    return IntensityNormalization(offsets, scales, clip)


class IntensityNormalization(torch.nn.Module):
    """y = (x - offset) * scale per channel, optionally clamped: fixed constants, differentiable."""

    def __init__(self, offsets: Sequence[float], scales: Sequence[float], clip=None):
        super().__init__()
        shape = (1, len(offsets), 1, 1, 1)
        self.register_buffer("offset", torch.tensor(offsets, dtype=torch.float32).reshape(shape))
        self.register_buffer("scale", torch.tensor(scales, dtype=torch.float32).reshape(shape))
        self.clip = clip

    def forward(self, x):
        y = (x - self.offset.to(x.dtype)) * self.scale.to(x.dtype)
        if self.clip is not None:
            y = torch.clamp(y, *self.clip)
        return y

    def extra_repr(self) -> str:
        return (f"offset={self.offset.flatten().tolist()}, scale={self.scale.flatten().tolist()}, "
                f"clip={self.clip}")


class NormalizedNetwork(torch.nn.Module):
    """normalize -> network: the function attributions are computed for."""

    def __init__(self, normalize, network):
        super().__init__()
        self.normalize = normalize
        self.network = network

    def forward(self, x):
        return self.network(self.normalize(x))

    def train(self, mode: bool = True):
        # torch.export programs refuse train()/eval() (their mode is fixed at export): skip them.
        self.training = mode
        self.normalize.train(mode)
        _set_mode(self.network, mode)
        return self


def _set_mode(network, training: bool) -> None:
    try:
        network.train(training)
    except NotImplementedError:  # an exported program's module: already in its exported mode
        pass


@dataclass
class ModelDescription:
    """What was loaded, in one record shown by the CLI, the Slicer panel, study reports and run.json.

    format: torchscript | export | card | nnunet | monai_bundle. spacing: the model's voxel size in
    mm on the input's (I, J, K) axes (None: the model runs on the volume's own grid). patch_size: the
    model's window in its own grid. preprocessing: one line per step of the explained function, in
    order (normalisation, resampling, ...). details: format-specific facts (trainer, folds, ...).
    """

    format: str
    name: str
    path: Optional[str] = None
    classes: Optional[List[str]] = None
    activation: str = "softmax"
    activation_source: str = "model card"
    in_channels: Optional[int] = None
    out_channels: Optional[int] = None
    spacing: Optional[List[float]] = None
    patch_size: Optional[List[int]] = None
    normalization: str = "none"
    preprocessing: List[str] = field(default_factory=list)
    details: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def lines(self) -> List[str]:
        """Human-readable summary, one fact per line (CLI notes, Slicer panel)."""
        classes = ", ".join(f"{i}={n}" for i, n in enumerate(self.classes or [])) or "not named"
        out = [f"model: {self.name} ({FORMAT_NAMES.get(self.format, self.format)})",
               f"classes: {classes}; activation: {self.activation} ({self.activation_source})"]
        if self.spacing is not None or self.patch_size is not None:
            out.append(f"model grid: spacing {_fmt(self.spacing)} mm, patch {_fmt(self.patch_size)}")
        out.append(f"normalisation: {self.normalization}")
        out.extend(f"preprocessing: {step}" for step in self.preprocessing)
        for key, value in self.details.items():
            out.append(f"{key}: {value}")
        return out


FORMAT_NAMES = {"torchscript": "TorchScript", "export": "torch.export program", "card": "model card",
                "nnunet": "nnU-Net v2 trained-model folder", "monai_bundle": "MONAI bundle"}


def _fmt(values) -> str:
    if values is None:
        return "any"
    return " x ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def describe_normalization(spec: Dict[str, Any]) -> str:
    kind = spec.get("type", "none")
    extra = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "type")
    return f"{kind} per channel, constants from the volume, held fixed" + (f" ({extra})" if extra else "") \
        if kind != "none" else "none"


@dataclass
class LoadedModel:
    """A network ready to run, with its card. `network` is the raw model (eval mode, CPU).

    `format` names the loader; `activation_source` says where the activation came from (the card,
    detection of a one-channel output, or an override)."""

    card: ModelCard
    network: Any
    path: Optional[str] = None
    format: str = "card"
    activation_source: str = "model card"
    out_channels: Optional[int] = None

    def check_channels(self, array: np.ndarray) -> None:
        """One-line error when the volume's channel count differs from what the model expects."""
        channels = 1 if np.ndim(array) == 3 else int(np.shape(array)[0])
        expected = self.card.in_channels
        if expected is not None and channels != expected:
            raise EsegetaError(f"model '{self.card.name}' expects {expected} input channel(s) but the "
                               f"volume has {channels}: give a volume with {expected} channel(s) "
                               "(e.g. a multi-component NRRD) or another model")

    def network_for(self, array: np.ndarray, spacing: Optional[Sequence[float]] = None,
                    affine: Optional[np.ndarray] = None):
        """The explained function for this volume: normalisation (constants from `array`
        (C,I,J,K), held fixed) followed by the network. `spacing` (mm per I,J,K axis) and `affine`
        (4x4 ijk_to_ras) are used by formats that resample (nnU-Net, MONAI bundles); ignored here."""
        self.check_channels(array)
        normalize = make_normalization(array, self.card.normalization)
        network = NormalizedNetwork(normalize, self.network).eval()
        if self.resamples(spacing):
            from .resampling import ResampledNetwork

            shape = np.shape(array)[-3:]
            return ResampledNetwork(network, shape, spacing, self.card.spacing, self.card.patch_size,
                                    self.card.divisor, self.card.head).eval()
        return network

    def resamples(self, spacing: Optional[Sequence[float]]) -> bool:
        """Whether a card's model runs on another grid than a volume of this spacing: the card
        gives a spacing that differs from the volume's by more than 5 % on some axis."""
        if spacing is None or not self.card.spacing or len(self.card.spacing) != 3:
            return False
        return any(abs(float(s) / float(c) - 1.0) > 0.05 for s, c in zip(spacing, self.card.spacing))

    def engine_hints(self, spacing: Optional[Sequence[float]] = None) -> Dict[str, Any]:
        """What the card says about running it: for `EngineOptions`/`Target` defaults.
        `whole_volume`: the explained function must see the whole volume in one window (it
        resamples and runs its own sliding window inside), as for a volume of `spacing` when the
        card's spacing differs (`resamples`)."""
        if self.resamples(spacing):
            return {"whole_volume": True, "divisor": 1, "activation": self.card.activation, "head": 0}
        return {key: value for key, value in (
            ("patch_size", self.card.patch_size), ("divisor", self.card.divisor),
            ("activation", self.card.activation), ("head", self.card.head)) if value is not None}

    def set_activation(self, activation: Optional[str] = None) -> str:
        """Settle the activation: an explicit `activation` wins; else a model with one output
        channel is a sigmoid model (softmax over one channel is constant), class 0 = foreground.
        Returns the activation now in the card."""
        if activation is not None:
            if activation not in ACTIVATIONS:
                raise EsegetaError(f"--activation must be softmax or sigmoid; got {activation!r}")
            self.card.activation = activation
            self.activation_source = "given"
            return activation
        channels = self.probe_out_channels()
        if channels == 1 and self.card.activation != "sigmoid":
            self.card.activation = "sigmoid"
            self.activation_source = "detected: one output channel (class 0 = foreground; sigmoid > 0.5)"
            if not self.card.classes:
                self.card.classes = ["foreground"]
        return self.card.activation

    def probe_out_channels(self) -> Optional[int]:
        """Output channels, known from the format or found with one small forward pass of zeros
        (None when the network refuses the probe size: nothing is decided then)."""
        if self.out_channels is not None:
            return self.out_channels
        if self.card.classes and self.card.activation == "softmax" and len(self.card.classes) > 1:
            return len(self.card.classes)
        from ..targets import select_head

        size = int(self.card.patch_size[0]) if self.card.patch_size else max(16, int(self.card.divisor or 16))
        size = min(size, 32 if not self.card.divisor else max(int(self.card.divisor), 32))
        x = torch.zeros((1, int(self.card.in_channels or 1), size, size, size))
        try:
            with torch.no_grad():
                out = select_head(self.network(x), self.card.head)
        except Exception:  # noqa: BLE001 - a network that needs other sizes: leave the card as it is
            return None
        if isinstance(out, torch.Tensor) and out.dim() == 5:
            self.out_channels = int(out.shape[1])
        return self.out_channels

    @property
    def description(self) -> ModelDescription:
        card = self.card
        return ModelDescription(
            format=self.format, name=card.name, path=self.path, classes=card.classes,
            activation=card.activation, activation_source=self.activation_source,
            in_channels=card.in_channels, out_channels=self.out_channels, spacing=card.spacing,
            patch_size=card.patch_size, normalization=describe_normalization(card.normalization),
            preprocessing=[], details={})


# ------------------------------------------------------------------------------ safe loading
def load_tensors(path, what: str, allowed: Sequence[Any] = ()):
    """torch.load with weights_only=True: pickled code is refused with an explanation. `allowed`:
    extra types the format's checkpoints need (torch.serialization.safe_globals), nothing else."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise EsegetaError(_ARBITRARY_PICKLE.format(path=path)) from exc
    except Exception as exc:
        raise EsegetaError(f"{path} is not {what}: {first_line(exc)}") from exc


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def infer_in_channels(network) -> Optional[int]:
    """Input channels of the first convolution (its weight is (out, in, k, k, k)), if any."""
    for _, tensor in network.named_parameters():
        if tensor.ndim == 5:
            return int(tensor.shape[1])
    return None
