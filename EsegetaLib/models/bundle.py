"""MONAI bundles (a folder, or a zip of one): `configs/inference.json|yaml`, `configs/metadata.json`,
`models/model.pt` (a state dict, read with weights_only=True) or `models/model.ts` (TorchScript).

The network is built from the bundle's `network_def` by MONAI's bundle parser (`ConfigParser`); its
`preprocessing` and `inferer` are instantiated the same way, and class names come from the
metadata's `network_data_format.outputs.pred.channel_def`.  Note that a bundle's config may hold
Python expressions (`$...`) that the parser evaluates, as MONAI itself does: load bundles you trust.

The explained function (`BundleFunction`) is the bundle's inference as one differentiable torch
function of the user's volume, on the user's grid:
  Orientationd -> an exact voxel permutation read off MONAI's transform (indices through it);
  Spacingd -> exact separable matrices read off MONAI's transform and its inverse (`resampling.py`);
  intensity transforms (ScaleIntensityRanged, NormalizeIntensityd, ScaleIntensityd,
    ScaleIntensityRangePercentilesd) -> fixed constants (from the volume where the transform
    computes them), differentiable;
  the bundle's inferer (MONAI's SlidingWindowInferer: its ROI, overlap and blending) -> logits;
  back to the input grid as the bundle's `Invertd` does (MONAI's inverse of each spatial step); when
    the postprocessing applies softmax/sigmoid before inverting, the probabilities are inverted and
    the function returns their log (softmax) or logit (sigmoid), so its labels are the bundle's.
Transforms that change the grid in other ways (crops, pads, resizes) are refused with their name.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..errors import EsegetaError
from ..model_formats import BUNDLE_CONFIGS
from .base import LoadedModel, ModelCard, ModelDescription, first_line
from .resampling import SeparableResample

NO_OPS = ("LoadImaged", "LoadImage", "EnsureChannelFirstd", "EnsureChannelFirst", "AddChanneld", "AddChannel",
          "EnsureTyped", "EnsureType", "ToTensord", "ToTensor", "CastToTyped", "CastToType", "ToDeviced",
          "Identityd", "Identity", "DeleteItemsd", "SelectItemsd")
INTENSITY = ("ScaleIntensityRanged", "NormalizeIntensityd", "ScaleIntensityd", "ScaleIntensityRangePercentilesd")
SPATIAL = ("Orientationd", "Spacingd")
_TOLERANCE = 1e-3  # our preprocessing vs MONAI's on the volume, relative to its range (float32 transforms)


def _bundle_root(path: str) -> str:
    """The bundle folder; a zip is extracted into a temporary folder removed at exit."""
    if os.path.isdir(path):
        return os.path.abspath(path)
    target = tempfile.mkdtemp(prefix="esegeta_bundle_")
    atexit.register(shutil.rmtree, target, True)
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():  # no absolute paths or '..' (zip slip)
            resolved = os.path.realpath(os.path.join(target, member))
            if not resolved.startswith(os.path.realpath(target) + os.sep):
                raise EsegetaError(f"{path}: refused to extract '{member}', which points outside the bundle")
        archive.extractall(target)
    for folder, dirs, files in os.walk(target):
        if os.path.basename(folder) == "configs" and any(n in files for n in BUNDLE_CONFIGS):
            return os.path.dirname(folder)
    raise EsegetaError(f"{path}: no configs/inference.json or .yaml inside the zip")


def _parser(root: str):
    try:
        from monai.bundle import ConfigParser
    except ImportError as exc:
        raise EsegetaError("MONAI bundles need monai: pip install monai") from exc
    config = next(os.path.join(root, "configs", n) for n in BUNDLE_CONFIGS
                  if os.path.isfile(os.path.join(root, "configs", n)))
    parser = ConfigParser()
    try:
        parser.read_config(config)
        meta = os.path.join(root, "configs", "metadata.json")
        if os.path.isfile(meta):
            parser.read_meta(meta)
    except Exception as exc:  # noqa: BLE001 - a broken JSON/YAML file
        raise EsegetaError(f"cannot read the bundle config {config}: {first_line(exc)}") from exc
    parser["bundle_root"] = root
    return parser, config


def _parsed(parser, key: str, what: str, source: str):
    try:
        return parser.get_parsed_content(key, instantiate=True)
    except Exception as exc:  # noqa: BLE001 - MONAI raises many kinds for a bad config entry
        raise EsegetaError(f"bundle {source}: {what} cannot be built from '{key}' ({type(exc).__name__}: "
                           f"{first_line(exc)}); check the config or the installed MONAI version") from exc


def _class_names(parser) -> Optional[List[str]]:
    try:
        channels = parser.get("_meta_#network_data_format#outputs#pred#channel_def")
    except Exception:  # noqa: BLE001 - metadata without it
        channels = None
    if not isinstance(channels, dict):
        return None
    return [str(channels[k]) for k in sorted(channels, key=lambda k: int(k))]


def _postprocessing(parser) -> Dict[str, Any]:
    """From the raw postprocessing list: the activation, and whether it comes before Invertd."""
    try:
        raw = parser.get("postprocessing")
    except Exception:  # noqa: BLE001
        raw = None
    transforms = raw.get("transforms", []) if isinstance(raw, dict) else (raw or [])
    activation, position, invert_at = None, None, None
    for i, t in enumerate(transforms if isinstance(transforms, list) else []):
        if not isinstance(t, dict):
            continue
        target = str(t.get("_target_", "")).split(".")[-1]
        if target == "Activationsd" and activation is None:
            if t.get("sigmoid") is True:
                activation, position = "sigmoid", i
            elif t.get("softmax") is True:
                activation, position = "softmax", i
        if target == "Invertd" and invert_at is None:
            invert_at = i
    before = activation is not None and invert_at is not None and position < invert_at
    return {"activation": activation, "probabilities_inverted": before}


def load(path: str) -> "BundleModel":
    """A MONAI bundle (see the module docstring); EsegetaError with one line when its network cannot
    be built, its weights do not fit, or a transform cannot be reproduced."""
    from .card import load_state_dict
    from .torchscript import load_archive

    root = _bundle_root(path)
    parser, config = _parser(root)
    source = os.path.basename(os.path.normpath(path))
    ts_file, pt_file = os.path.join(root, "models", "model.ts"), os.path.join(root, "models", "model.pt")
    if os.path.isfile(pt_file):
        key = "network_def" if "network_def" in parser.get() else "network"
        network = _parsed(parser, key, "its network", source)
        if not isinstance(network, torch.nn.Module):
            raise EsegetaError(f"bundle {source}: '{key}' is a {type(network).__name__}, not a torch network")
        state = load_state_dict(pt_file)
        try:
            network.load_state_dict(state)
        except RuntimeError as exc:
            raise EsegetaError(f"bundle {source}: models/model.pt does not fit its network_def "
                               f"({first_line(exc)})") from exc
        weights = "models/model.pt"
    elif os.path.isfile(ts_file):
        network, weights = load_archive(ts_file), "models/model.ts"
    else:
        raise EsegetaError(f"bundle {source} has no models/model.pt or models/model.ts")
    network.eval()
    preprocessing = _parsed(parser, "preprocessing", "its preprocessing", source)
    transforms = list(getattr(preprocessing, "transforms", [preprocessing]))
    names = [type(t).__name__ for t in transforms]
    unknown = [n for n in names if n not in NO_OPS + INTENSITY + SPATIAL]
    if unknown:
        raise EsegetaError(f"bundle {source}: preprocessing {', '.join(unknown)} is not reproduced by Esegeta "
                           f"(supported: {', '.join(SPATIAL + INTENSITY)} and type/channel conversions)")
    inferer = _parsed(parser, "inferer", "its inferer", source) if "inferer" in parser.get() else None
    post = _postprocessing(parser)
    classes = _class_names(parser)
    try:
        in_channels = int(parser.get("_meta_#network_data_format#inputs#image#num_channels"))
    except Exception:  # noqa: BLE001
        in_channels = None
    roi = getattr(inferer, "roi_size", None)
    spacing = next((list(map(float, t.spacing_transform.pixdim)) for t in transforms
                    if type(t).__name__ == "Spacingd"), None)
    activation = post["activation"] or "softmax"
    card = ModelCard(name=source, architecture="monai_bundle", weights=weights, in_channels=in_channels,
                     classes=classes, activation=activation, normalization={"type": "none"},
                     patch_size=list(roi) if roi is not None else None, spacing=spacing, divisor=1)
    return BundleModel(card=card, network=network, path=os.path.abspath(path), format="monai_bundle",
                       activation_source="bundle postprocessing" if post["activation"] else "default (softmax)",
                       out_channels=len(classes) if classes else None, root=root, config=config,
                       transforms=transforms, transform_names=names, inferer=inferer,
                       probabilities_inverted=post["probabilities_inverted"])


@dataclass
class BundleModel(LoadedModel):
    """A loaded MONAI bundle; `network_for(array, spacing, affine)` gives the `BundleFunction`."""

    root: str = ""
    config: str = ""
    transforms: List[Any] = field(default_factory=list)
    transform_names: List[str] = field(default_factory=list)
    inferer: Any = None
    probabilities_inverted: bool = False

    def network_for(self, array: np.ndarray, spacing: Optional[Sequence[float]] = None,
                    affine: Optional[np.ndarray] = None):
        self.check_channels(array)
        array = np.asarray(array, dtype=np.float32)
        if array.ndim == 3:
            array = array[None]
        if affine is None:
            if spacing is None:
                raise EsegetaError("a MONAI bundle needs the volume's geometry (ijk_to_ras affine, or at least its "
                                   "spacing) to reproduce its Orientationd/Spacingd")
            affine = np.diag([*map(float, spacing), 1.0])
        return BundleFunction(self, array, np.asarray(affine, dtype=np.float64)).eval()

    def engine_hints(self, spacing=None) -> Dict[str, Any]:
        return {"whole_volume": True, "divisor": 1, "activation": self.card.activation, "head": 0}

    def refusal(self, spec) -> Optional[str]:
        if spec.needs_layer and _has_several_windows(self.inferer):
            return ("refused on MONAI bundles with a sliding-window inferer: the layer runs once per window "
                    "on the resampled grid inside the explained function, so one layer map on the input grid "
                    "does not exist; use gradient or perturbation methods")
        return None

    def source_files(self) -> List[tuple]:
        if os.path.isfile(self.path):
            return [("MONAI bundle", self.path)]
        files = [("bundle config", self.config), ("bundle weights", os.path.join(self.root, self.card.weights))]
        meta = os.path.join(self.root, "configs", "metadata.json")
        return files + ([("bundle metadata", meta)] if os.path.isfile(meta) else [])

    @property
    def description(self) -> ModelDescription:
        card = self.card
        steps = [name for name in self.transform_names if name not in NO_OPS]
        inferer = type(self.inferer).__name__ if self.inferer is not None else "the network on the whole volume"
        details = {"inferer": inferer, "network": type(self.network).__name__}
        if self.inferer is not None and hasattr(self.inferer, "overlap"):
            details["inferer"] += f" (roi {list(self.inferer.roi_size)}, overlap {self.inferer.overlap})"
        back = ("probabilities resampled back (the bundle applies its activation before Invertd); the "
                "explained score is their log" if self.probabilities_inverted else "logits resampled back")
        return ModelDescription(
            format="monai_bundle", name=card.name, path=self.path, classes=card.classes, activation=card.activation,
            activation_source=self.activation_source, in_channels=card.in_channels, out_channels=self.out_channels,
            spacing=card.spacing, patch_size=card.patch_size,
            normalization=", ".join(s for s in steps if s in INTENSITY) or "none",
            preprocessing=[f"{', '.join(steps) or 'none'} (exact, differentiable, constants held fixed)",
                           f"inverse of {', '.join(s for s in steps if s in SPATIAL) or 'nothing'}: {back}"],
            details=details)


def _has_several_windows(inferer) -> bool:
    return inferer is not None and type(inferer).__name__ != "SimpleInferer"


def _image_key(transform) -> str:
    keys = list(getattr(transform, "keys", ()) or ())
    return "image" if "image" in keys or not keys else str(keys[0])


class _Gather(torch.nn.Module):
    """A voxel permutation (B, C, *in) -> (B, C, *out): out.flat[i] = x.flat[index[i]]."""

    def __init__(self, index: np.ndarray, shape_out: Sequence[int]):
        super().__init__()
        self.register_buffer("index", torch.as_tensor(np.asarray(index).reshape(-1), dtype=torch.long))
        self.shape_out = [int(s) for s in shape_out]

    def forward(self, x):
        return x.flatten(2)[:, :, self.index].reshape(*x.shape[:2], *self.shape_out)


class _Affine(torch.nn.Module):
    """Per channel y = (clamp(x, lo, hi) - offset) * scale + shift (lo/hi optional, clamp after when
    `clamp_after`), only inside `mask` when given: fixed constants, differentiable."""

    def __init__(self, offset, scale, shift=0.0, lo=None, hi=None, clamp_after=False, mask=None):
        super().__init__()
        as_channels = lambda v: torch.as_tensor(np.asarray(v, dtype=np.float64)).reshape(1, -1, 1, 1, 1)
        self.register_buffer("offset", as_channels(offset))
        self.register_buffer("scale", as_channels(scale))
        self.register_buffer("shift", as_channels(shift))
        self.bounds = (lo, hi)
        self.clamp_after = clamp_after
        self.register_buffer("mask", None if mask is None else torch.as_tensor(mask)[None])

    def forward(self, x):
        lo, hi = self.bounds
        y = x
        if lo is not None and not self.clamp_after:
            y = torch.clamp(y, lo, hi)
        y = (y - self.offset.to(x.dtype)) * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if lo is not None and self.clamp_after:
            y = torch.clamp(y, lo, hi)
        return y if self.mask is None else torch.where(self.mask, y, x)


def _window_text(roi_size, model_affine: np.ndarray, input_affine: np.ndarray, model_shape) -> str:
    """The bundle's window on its own grid (after Orientationd/Spacingd: `model_affine`) and on the
    input's (`input_affine`): each model axis is matched to the input axis it runs along."""
    from .resampling import model_window_text

    model_columns, input_columns = model_affine[:3, :3], input_affine[:3, :3]
    model_spacing = np.linalg.norm(model_columns, axis=0)
    input_spacing = np.linalg.norm(input_columns, axis=0)
    cosines = np.abs((model_columns / model_spacing).T @ (input_columns / input_spacing))  # (model, input)
    axes = [int(np.argmax(row)) for row in cosines]
    patch = list(roi_size) if roi_size else list(model_shape)  # no sliding window: the whole grid
    return model_window_text(patch, [float(v) for v in model_spacing], model_shape, [float(v) for v in input_spacing],
                             input_axes=axes if sorted(axes) == [0, 1, 2] else None)


class BundleFunction(torch.nn.Module):
    """(B, C, I, J, K) on the input grid -> (B, n_classes, I, J, K): the bundle's inference (module
    docstring). Built from the unperturbed `array` with `affine` (RAS, as MONAI's loaders give it)."""

    whole_volume = True  # the engine gives it the whole volume in one window

    def __init__(self, model: BundleModel, array: np.ndarray, affine: np.ndarray):
        super().__init__()
        from monai.data import MetaTensor

        self.network = model.network
        self.inferer = model.inferer
        self.activation = model.card.activation
        self.probabilities_inverted = model.probabilities_inverted
        steps, inverse, record = [], [], []
        current = MetaTensor(torch.from_numpy(array.copy()), affine=torch.as_tensor(affine))
        for transform in model.transforms:
            name = type(transform).__name__
            if name in NO_OPS:
                continue
            key = _image_key(transform)
            if name == "Orientationd":
                step, back = self._orientation(transform, key, current)
            elif name == "Spacingd":
                step, back = self._spacing(transform, key, current)
            else:
                step, back = self._intensity(transform, key, current), None
            monai_out = transform({key: current})[key]
            with torch.no_grad():
                ours = step(current.as_tensor()[None].to(torch.float64))[0]
            reference = monai_out.as_tensor().to(torch.float64)
            scale = float(reference.abs().max()) or 1.0
            if ours.shape != reference.shape or float((ours - reference).abs().max()) > _TOLERANCE * scale:
                raise EsegetaError(f"bundle {model.card.name}: Esegeta's {name} differs from MONAI's on this volume "
                                   "(an oblique or unusual grid); it cannot be explained exactly")
            steps.append(step)
            if back is not None:
                inverse.insert(0, back)
            record.append({"transform": name, "shape_after": list(reference.shape[1:])})
            current = monai_out
        self.steps = torch.nn.ModuleList(steps)
        self.inverse = torch.nn.ModuleList(inverse)
        self.record = {"what": "MONAI bundle inference as one differentiable function of the input voxels",
                       "input_shape_ijk": list(array.shape[1:]), "steps": record,
                       "inferer": type(self.inferer).__name__ if self.inferer is not None else None,
                       "roi_size": list(getattr(self.inferer, "roi_size", []) or []) or None,
                       "overlap": getattr(self.inferer, "overlap", None),
                       "resampled_back": [type(m).__name__ for m in inverse],
                       "back_resampled": "probabilities (then log)" if self.probabilities_inverted else "logits"}
        self.window_text = _window_text(self.record["roi_size"], np.asarray(current.affine, dtype=float),
                                        np.asarray(affine, dtype=float), list(current.shape[1:]))

    @staticmethod
    def _orientation(transform, key, current):
        """MONAI's Orientationd applied to voxel indices: the exact permutation and its inverse."""
        from monai.data import MetaTensor

        shape = list(current.shape[1:])
        index = MetaTensor(torch.arange(int(np.prod(shape)), dtype=torch.float64).reshape(1, *shape),
                           affine=current.affine)
        moved = transform({key: index})[key]
        forward_index = moved.as_tensor().reshape(-1).round().long().numpy()
        return _Gather(forward_index, moved.shape[1:]), _Gather(np.argsort(forward_index), shape)

    @staticmethod
    def _spacing(transform, key, current):
        """MONAI's Spacingd and its inverse as separable matrices: unit-vector probes (constant along
        the other axes, which every interpolating transform keeps constant) through both."""
        from monai.data import MetaTensor

        shape_in = list(current.shape[1:])

        def spaced(data: np.ndarray):
            return transform({key: MetaTensor(torch.from_numpy(data).float(), affine=current.affine)})[key]

        shape_out = list(spaced(np.zeros((1, *shape_in))).shape[1:])
        forward, inverse = [], []
        for axis in range(3):
            probe_in = [4, 4, 4]
            probe_in[axis] = shape_in[axis]
            seed = spaced(np.zeros((1, *probe_in)))  # its meta data carries what inverse() undoes

            def backward(data, seed=seed):
                meta = MetaTensor(torch.from_numpy(data).float(), affine=seed.affine,
                                  applied_operations=seed.applied_operations)
                return transform.inverse({key: meta})[key].as_tensor().double().numpy()

            forward.append(_probe_axis(lambda d: spaced(d).as_tensor().double().numpy(), axis, probe_in,
                                       shape_out[axis]))
            inverse.append(_probe_axis(backward, axis, list(seed.shape[1:]), shape_in[axis]))
        return SeparableResample(forward), SeparableResample(inverse)

    @staticmethod
    def _intensity(transform, key, current):
        name = type(transform).__name__
        x = current.as_tensor().double().numpy()
        if name == "ScaleIntensityRanged":
            s = transform.scaler
            width = (s.a_max - s.a_min) or 1.0
            lo_hi = (min(s.b_min, s.b_max), max(s.b_min, s.b_max)) if s.clip else (None, None)
            return _Affine(s.a_min, (s.b_max - s.b_min) / width, s.b_min, *lo_hi, clamp_after=True)
        if name == "ScaleIntensityRangePercentilesd":
            s = transform.scaler
            lo, hi = np.percentile(x, [s.lower, s.upper]) if not s.channel_wise else (None, None)
            if s.channel_wise:
                raise EsegetaError("ScaleIntensityRangePercentilesd with channel_wise is not reproduced yet")
            width = (hi - lo) or 1.0
            bounds = (min(s.b_min, s.b_max), max(s.b_min, s.b_max)) if s.clip else (None, None)
            return _Affine(lo, (s.b_max - s.b_min) / width, s.b_min, *bounds, clamp_after=True)
        if name == "ScaleIntensityd":
            s = transform.scaler
            if s.factor is not None or s.minv is None or s.maxv is None:
                raise EsegetaError("ScaleIntensityd without minv/maxv is not reproduced yet")
            axes = (1, 2, 3) if s.channel_wise else None
            mins = x.min(axis=axes) if axes else np.full(x.shape[0], x.min())
            maxs = x.max(axis=axes) if axes else np.full(x.shape[0], x.max())
            width = np.where(maxs - mins > 0, maxs - mins, 1.0)
            return _Affine(mins, (s.maxv - s.minv) / width, s.minv)
        # NormalizeIntensityd: mean/std (or the given subtrahend/divisor), over non-zero voxels if asked
        s = transform.normalizer
        if s.subtrahend is not None or s.divisor is not None:
            raise EsegetaError("NormalizeIntensityd with a fixed subtrahend/divisor is not reproduced yet")
        mask = x != 0 if s.nonzero else np.ones_like(x, dtype=bool)
        if s.channel_wise:
            means = [float(c[m].mean()) if m.any() else 0.0 for c, m in zip(x, mask)]
            stds = [float(c[m].std()) if m.any() else 1.0 for c, m in zip(x, mask)]
        else:
            means = [float(x[mask].mean())] * x.shape[0]
            stds = [float(x[mask].std())] * x.shape[0]
        scales = [1.0 / sd if sd > 0 else 1.0 for sd in stds]
        return _Affine(means, scales, 0.0, mask=mask if s.nonzero else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for step in self.steps:
            y = step(y)
        logits = self.inferer(y, self.network) if self.inferer is not None else self.network(y)
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        logits = logits.to(x.dtype)
        if not self.probabilities_inverted:
            for back in self.inverse:
                logits = back(logits)
            return logits
        p = torch.sigmoid(logits) if self.activation == "sigmoid" else torch.softmax(logits, dim=1)
        for back in self.inverse:
            p = back(p)
        p = torch.clamp(p, 1e-12, 1.0)
        return torch.logit(p.clamp(max=1 - 1e-12)) if self.activation == "sigmoid" else torch.log(p)


def _probe_axis(resample, axis: int, probe_shape: Sequence[int], n_out: int) -> Optional[np.ndarray]:
    """(n_out, n_in) matrix of `resample` (C, X, Y, Z) -> (C, X', Y', Z') along `axis`, from unit
    vectors along it (n_in = probe_shape[axis]) that are constant along the other axes; None for
    an identity."""
    n_in = int(probe_shape[axis])
    data = np.zeros((n_in, *probe_shape), dtype=np.float64)
    for j in range(n_in):
        index = [j, slice(None), slice(None), slice(None)]
        index[1 + axis] = j
        data[tuple(index)] = 1.0
    out = np.asarray(resample(data), dtype=np.float64)
    if out.shape[1 + axis] != n_out:
        raise EsegetaError(f"a bundle's Spacingd gave {out.shape[1 + axis]} voxels along axis {axis} for a probe, "
                           f"not {n_out}: its grid is not separable")
    middle = [min(1, s - 1) for s in out.shape[1:]]
    middle[axis] = slice(None)
    matrix = np.stack([out[(j, *middle)] for j in range(n_in)], axis=1)
    if n_in == n_out and np.allclose(matrix, np.eye(n_in), atol=1e-6):
        return None
    return matrix
