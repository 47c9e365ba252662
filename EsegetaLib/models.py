"""Load segmentation models safely and put their intensity normalisation in front of them.

Three ways in:
- a TorchScript file (`.pt`, `.pth`, `.ts`): architecture and weights in one file, no pickle;
- a `torch.export` program (`.pt2`);
- a model card (`.json`): a MONAI network class with its arguments plus a state dict loaded with
  `torch.load(weights_only=True)`, or a TorchScript/`.pt2` file, together with what the model
  expects (channels, class names, activation, normalisation, patch size, spacing).
A pickled whole model (`torch.save(model)`) is refused: unpickling runs arbitrary code.

Why the normalisation is a layer: attribution methods differentiate the function they are given.
With the normalisation as the network's first (differentiable) layer, whose constants are computed
once from the volume and then held fixed, every map is on the original intensity grid, and
perturbing the input does not silently re-normalise it.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .errors import EsegetaError

NORMALIZATIONS = ("zscore", "percentile", "minmax", "none")
DEFAULT_CARD = "default_model.json"
_TORCHSCRIPT_EXT = (".pt", ".pth", ".ts")
_EXPORT_EXT = (".pt2",)
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
class LoadedModel:
    """A network ready to run, with its card. `network` is the raw model (eval mode, CPU)."""

    card: ModelCard
    network: Any
    path: Optional[str] = None

    def check_channels(self, array: np.ndarray) -> None:
        """One-line error when the volume's channel count differs from what the model expects."""
        channels = 1 if np.ndim(array) == 3 else int(np.shape(array)[0])
        expected = self.card.in_channels
        if expected is not None and channels != expected:
            raise EsegetaError(f"model '{self.card.name}' expects {expected} input channel(s) but the "
                               f"volume has {channels}: give a volume with {expected} channel(s) "
                               "(e.g. a multi-component NRRD) or another model")

    def network_for(self, array: np.ndarray):
        """normalisation (constants from `array` (C,I,J,K), held fixed) followed by the network."""
        self.check_channels(array)
        normalize = make_normalization(array, self.card.normalization)
        return NormalizedNetwork(normalize, self.network).eval()

    def engine_hints(self) -> Dict[str, Any]:
        """What the card says about running it: for `EngineOptions`/`Target` defaults."""
        return {key: value for key, value in (
            ("patch_size", self.card.patch_size), ("divisor", self.card.divisor),
            ("activation", self.card.activation), ("head", self.card.head)) if value is not None}


# ------------------------------------------------------------------------------------------ loading
def load_model(path, normalization=None) -> LoadedModel:
    """Load a TorchScript file, a `.pt2` export or a model card `.json` (see the module docstring).

    `normalization` overrides the card's (or sets one for a bare TorchScript/export file, whose
    default is "none").
    """
    path = str(path)
    if not os.path.exists(path):
        raise EsegetaError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise EsegetaError(f"{path} is a folder; give a model file (.pt, .ts, .pt2 or a model card .json)")
    lower = path.lower()
    if lower.endswith(".json"):
        card = ModelCard.read(path)
        network = _network_from_card(card, os.path.dirname(os.path.abspath(path)), path)
    elif lower.endswith(_TORCHSCRIPT_EXT + _EXPORT_EXT):
        network = _load_archive(path)
        card = ModelCard(name=Path(path).name.split(".")[0], architecture="torchscript" if not
                         lower.endswith(".pt2") else "export", weights=Path(path).name,
                         in_channels=_infer_in_channels(network), divisor=None)
    else:
        raise EsegetaError(f"{path}: unknown model file type; use TorchScript (.pt/.ts), torch.export "
                           "(.pt2) or a model card (.json)")
    if normalization is not None:
        card.normalization = _normalization_spec(normalization, "normalization")
    _set_mode(network, False)
    return LoadedModel(card=card, network=network, path=path)


def load_default_model() -> LoadedModel:
    """The bundled vessel UNet trained on synthetic TOF-MRA (`scripts/train_default_model.py`)."""
    from .sample import resource_path

    path = resource_path(DEFAULT_CARD)
    if not path.is_file():
        raise EsegetaError(f"the bundled model card {path} is missing: reinstall esegeta or run "
                           "scripts/train_default_model.py")
    return load_model(str(path))


def build_network(card: ModelCard):
    """Instantiate the MONAI network the card names, with its arguments (no weights)."""
    try:
        from monai.networks import nets
    except ImportError as exc:
        raise EsegetaError(f"model card '{card.name}' names a MONAI network: pip install monai") from exc
    cls = getattr(nets, card.architecture, None)
    if cls is None or not isinstance(cls, type):
        raise EsegetaError(f"model card '{card.name}': '{card.architecture}' is not a network in "
                           "monai.networks.nets (e.g. UNet, DynUNet, SegResNet, SwinUNETR)")
    try:
        return cls(**card.arguments)
    except TypeError as exc:
        raise EsegetaError(f"model card '{card.name}': bad arguments for {card.architecture}: "
                           f"{exc}") from exc


def _network_from_card(card: ModelCard, folder: str, card_path: str):
    if card.architecture in ("torchscript", "export"):
        if not card.weights:
            raise EsegetaError(f"{card_path}: 'weights' must name the {card.architecture} file")
        network = _load_archive(os.path.join(folder, card.weights))
    else:
        network = build_network(card)
        if card.weights:
            state = load_state_dict(os.path.join(folder, card.weights))
            missing, unexpected = _match_state(network, state)
            if missing or unexpected:
                raise EsegetaError(
                    f"{card_path}: the weights do not fit {card.architecture}{tuple(card.arguments.items())}"
                    f": missing {missing[:3]}, unexpected {unexpected[:3]}; check the card's arguments")
    if card.in_channels is None:
        card.in_channels = _infer_in_channels(network)
    return network


def _match_state(network, state):
    try:
        result = network.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        first = str(exc).strip().splitlines()
        return [], [first[-1].strip() if first else "shape mismatch"]
    return list(result.missing_keys), list(result.unexpected_keys)


def load_state_dict(path) -> Dict[str, Any]:
    """Tensors only (`weights_only=True`); unwraps {"state_dict": ...} and DataParallel prefixes."""
    if not os.path.exists(path):
        raise EsegetaError(f"weights file not found: {path}")
    state = _load_tensors(path, "a PyTorch weights file")
    for key in ("state_dict", "model_state_dict", "model", "network_weights"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise EsegetaError(f"{path} does not hold a state dict (name -> tensor)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_tensors(path, what: str):
    """torch.load with weights_only=True: pickled code is refused with an explanation."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise EsegetaError(_ARBITRARY_PICKLE.format(path=path)) from exc
    except Exception as exc:
        raise EsegetaError(f"{path} is not {what}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _load_archive(path):
    """TorchScript or torch.export program; explain what to do with anything else."""
    if not os.path.exists(path):
        raise EsegetaError(f"model file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise EsegetaError(f"{path} is not a model file (TorchScript, torch.export or state dict "
                           "archives are zip files)")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if path.lower().endswith(_EXPORT_EXT) or any("/serialized_exported_program" in n or
                                                   n.endswith("models/model.json") for n in names):
        try:
            return torch.export.load(path).module()
        except Exception as exc:
            raise EsegetaError(f"cannot load {path} as a torch.export program: {_first_line(exc)}") from exc
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        try:
            return torch.jit.load(path, map_location="cpu")
        except Exception as exc:
            raise EsegetaError(f"cannot load {path} as TorchScript: {_first_line(exc)}") from exc
    # A plain torch.save archive: a state dict needs an architecture; a whole model is a pickle.
    state = _load_tensors(path, "a model file")
    raise EsegetaError(f"{path} holds weights only ({type(state).__name__}), no architecture: write a "
                       "model card .json naming the network and pointing at these weights "
                       "(docs/readme/models.md)")


def _infer_in_channels(network) -> Optional[int]:
    """Input channels of the first convolution (its weight is (out, in, k, k, k)), if any."""
    for _, tensor in network.named_parameters():
        if tensor.ndim == 5:
            return int(tensor.shape[1])
    return None
