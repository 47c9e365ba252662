"""nnU-Net v2 trained-model folders, explained as nnU-Net runs them.

A folder such as `Dataset001_X/nnUNetTrainer__nnUNetPlans__3d_fullres` holds `plans.json`,
`dataset.json` and `fold_N/checkpoint_final.pth` (or `checkpoint_best.pth`).  The network is built
by nnU-Net's own trainer class (`build_network_architecture`, i.e. `dynamic_network_architectures`),
weights are read with `torch.load(weights_only=True)` allowing only the plain NumPy scalar types
that nnU-Net's training log stores, and class names come from `dataset.json`.

The explained function (`NnUNetFunction`) is nnU-Net's inference (`nnUNetPredictor`) written as one
differentiable torch function of the user's volume, on the user's grid:
  axes as nnU-Net reads them (SimpleITK order) and the plans' `transpose_forward`
  -> crop to the non-zero bounding box (nnU-Net's `crop_to_nonzero`, box held fixed)
  -> per-channel normalisation of the plans (z-score with or without the non-zero mask, CT clipping
     to the dataset's 0.5/99.5 percentiles with its mean and std, rescale to [0, 1], RGB / 255;
     constants from the volume or the plans, held fixed)
  -> resampling to the plans' spacing (nnU-Net's `resampling_fn_data`, default cubic spline with
     nearest along an anisotropic axis, as exact separable matrices: `resampling.py`)
  -> padding to the patch size and nnU-Net's sliding window (its step positions, Gaussian weights,
     tile step 0.5, optional mirroring), mean of the folds' logits (nnU-Net's ensemble)
  -> logits resampled back (`resampling_fn_probabilities`, default linear) and un-cropped (outside
     the box: background), axes restored.
Every step is linear or elementwise in the voxels, so gradients are exact with respect to the
user's own voxels and the maps land on the input grid.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import EsegetaError
from .base import LoadedModel, ModelCard, ModelDescription, first_line, load_tensors
from .resampling import SeparableResample, axis_matrices, model_window_text

CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth")
READERS_SITK_ORDER = ("SimpleITKIO", "NibabelIO", "SimpleITKWithOverwriteIO")  # arrays in (K, J, I) order
NORMALIZATIONS = ("ZScoreNormalization", "CTNormalization", "NoNormalization", "RescaleTo01Normalization",
                  "RGBTo01Normalization")
OUTSIDE_LOGIT = 30.0  # outside the non-zero box nnU-Net writes background: logits (0, -30, ...)
REFUSAL = ("refused on nnU-Net models: {what} runs once per nnU-Net patch (and fold) on the resampled grid "
           "inside the explained function, so {why}; use gradient or perturbation methods, which are exact "
           "through nnU-Net's resampling and sliding window")


def _require_nnunet():
    try:
        import nnunetv2  # noqa: F401
    except ImportError as exc:
        raise EsegetaError("nnU-Net models need nnunetv2: pip install 'esegeta[nnunet]'") from exc


def checkpoint_types() -> List[Any]:
    """Types beyond tensors that nnU-Net checkpoints hold: NumPy scalars (np.float64 dice values in
    the training log) and their dtypes. Nothing that runs code on unpickling."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import scalar
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)]
    return [scalar, np.dtype, *dtypes]


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise EsegetaError(f"cannot read {path}: {first_line(exc)}") from exc


def find_folds(folder: str, fold: Optional[Union[int, str]], checkpoint: Optional[str]) -> List[Dict[str, str]]:
    """[{fold, path}] of the checkpoints to use: one fold, or every fold_N (ensemble) when None."""
    names = (checkpoint,) if checkpoint else CHECKPOINTS

    def checkpoint_in(fold_dir: str) -> Optional[str]:
        for name in names:
            if os.path.isfile(os.path.join(fold_dir, name)):
                return os.path.join(fold_dir, name)
        return None

    available = sorted((os.path.basename(d)[len("fold_"):] for d in glob.glob(os.path.join(folder, "fold_*"))
                        if os.path.isdir(d) and checkpoint_in(d)), key=lambda f: (not f.isdigit(), f.zfill(4)))
    listing = ", ".join(available) or "none"
    if fold is not None:
        fold = str(fold).strip().lower()
        if not (fold == "all" or fold.isdigit()):
            raise EsegetaError(f"--fold must be a fold number or 'all'; got {fold!r}")
        path = checkpoint_in(os.path.join(folder, f"fold_{fold}"))
        if path is None:
            raise EsegetaError(f"fold {fold} of {folder} has no {' or '.join(names)} (folds with a checkpoint: "
                               f"{listing}); choose one of them with --fold")
        return [{"fold": fold, "path": path}]
    numbered = [f for f in available if f.isdigit()] or available
    if not numbered:
        raise EsegetaError(f"{folder} has plans.json and dataset.json but no fold_N/{' or '.join(names)}: "
                           "copy the trained folds into it")
    return [{"fold": f, "path": checkpoint_in(os.path.join(folder, f"fold_{f}"))} for f in numbered]


def _read_checkpoint(path: str) -> dict:
    state = load_tensors(path, "an nnU-Net checkpoint", allowed=checkpoint_types())
    if not isinstance(state, dict) or not isinstance(state.get("network_weights"), dict):
        raise EsegetaError(f"{path} is not an nnU-Net v2 checkpoint (no 'network_weights')")
    return state


def _class_names(dataset_json: dict, label_manager) -> List[str]:
    labels = dataset_json.get("labels", {})
    if label_manager.has_regions:
        regions = [name for name, value in labels.items() if name != "background" and name != "ignore"]
        return regions[:label_manager.num_segmentation_heads]
    by_value = {}
    for name, value in labels.items():
        if isinstance(value, int) and name != "ignore":
            by_value[value] = name
    return [str(by_value.get(v, f"label {v}")) for v in range(label_manager.num_segmentation_heads)]


def load(path: str, fold=None, checkpoint: Optional[str] = None) -> "NnUNetModel":
    """An nnU-Net v2 trained-model folder (see the module docstring); EsegetaError with one line
    for a missing fold, a checkpoint that would need code to unpickle, an unsupported setting."""
    _require_nnunet()
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = os.path.abspath(path)
    plans = _read_json(os.path.join(folder, "plans.json"))
    dataset_json = _read_json(os.path.join(folder, "dataset.json"))
    folds = find_folds(folder, fold, checkpoint)
    states = [_read_checkpoint(f["path"]) for f in folds]
    first = states[0]
    trainer_name = str(first.get("trainer_name") or os.path.basename(folder).split("__")[0])
    configuration = (first.get("init_args") or {}).get("configuration") or os.path.basename(folder).split("__")[-1]
    plans_manager = PlansManager(plans)
    try:
        configuration_manager = plans_manager.get_configuration(configuration)
    except Exception as exc:  # noqa: BLE001 - nnU-Net raises plain errors for unknown configurations
        raise EsegetaError(f"{folder}: configuration '{configuration}' is not in plans.json "
                           f"({first_line(exc)})") from exc
    if len(configuration_manager.patch_size) != 3:
        raise EsegetaError(f"{folder}: the '{configuration}' configuration is 2D; Esegeta explains 3D "
                           "configurations (3d_fullres, 3d_lowres)")
    if configuration_manager.previous_stage_name if hasattr(configuration_manager, "previous_stage_name") else None:
        raise EsegetaError(f"{folder}: '{configuration}' is a cascade stage that needs the previous stage's "
                           "segmentation as input; explain the 3d_fullres or 3d_lowres model instead")
    reader = plans.get("image_reader_writer", "SimpleITKIO")
    if reader not in READERS_SITK_ORDER:
        raise EsegetaError(f"{folder}: the plans read images with {reader}, whose axis order Esegeta does not "
                           f"reproduce (supported: {', '.join(READERS_SITK_ORDER)})")
    schemes = list(configuration_manager.normalization_schemes)
    unknown = [s for s in schemes if s not in NORMALIZATIONS]
    if unknown:
        raise EsegetaError(f"{folder}: normalisation {', '.join(unknown)} is not reproduced by Esegeta "
                           f"(supported: {', '.join(NORMALIZATIONS)})")
    trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    if trainer_class is None:
        raise EsegetaError(f"{folder}: trainer '{trainer_name}' is not part of the installed nnunetv2; install "
                           "the package that defines it")
    label_manager = plans_manager.get_label_manager(dataset_json)
    n_in = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    n_out = label_manager.num_segmentation_heads
    networks = []
    for spec, state in zip(folds, states):
        try:
            network = trainer_class.build_network_architecture(plans_manager, configuration_manager, n_in, n_out,
                                                               enable_deep_supervision=False)
        except TypeError:  # trainers with the older signature (architecture name and kwargs)
            network = trainer_class.build_network_architecture(
                configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
                configuration_manager.network_arch_init_kwargs_req_import, n_in, n_out,
                enable_deep_supervision=False)
        try:
            network.load_state_dict(state["network_weights"])
        except RuntimeError as exc:
            raise EsegetaError(f"{spec['path']}: the weights do not fit the network the plans describe "
                               f"({first_line(exc)})") from exc
        network.eval()
        networks.append(network)
    transpose = [int(t) for t in plans_manager.transpose_forward]
    order = [[2, 1, 0][t] for t in transpose]  # nnU-Net axis a is the input's I/J/K axis order[a]
    spacing_ijk = [0.0, 0.0, 0.0]
    for a, o in enumerate(order):
        spacing_ijk[o] = float(configuration_manager.spacing[a])
    patch_ijk = [0, 0, 0]
    for a, o in enumerate(order):
        patch_ijk[o] = int(configuration_manager.patch_size[a])
    card = ModelCard(name=os.path.basename(os.path.dirname(folder)) + "/" + os.path.basename(folder),
                     architecture="nnunet", weights=", ".join(os.path.relpath(f["path"], folder) for f in folds),
                     in_channels=n_in, classes=_class_names(dataset_json, label_manager),
                     activation="sigmoid" if label_manager.has_regions else "softmax",
                     normalization={"type": "none"}, patch_size=patch_ijk, spacing=spacing_ijk, divisor=1)
    mirror = first.get("inference_allowed_mirroring_axes")
    return NnUNetModel(card=card, network=networks[0], path=folder, format="nnunet",
                       activation_source="nnU-Net label manager (regions: sigmoid, labels: softmax)",
                       out_channels=n_out, networks=networks, folds=[f["fold"] for f in folds],
                       checkpoints=[f["path"] for f in folds],
                       trainer=trainer_name, configuration=configuration, plans_manager=plans_manager,
                       configuration_manager=configuration_manager, label_manager=label_manager,
                       mirror_axes=None if mirror is None else [int(m) for m in mirror], order=order)


@dataclass
class NnUNetModel(LoadedModel):
    """A loaded nnU-Net folder; `network_for(array, spacing)` gives the explained `NnUNetFunction`."""

    networks: List[torch.nn.Module] = field(default_factory=list)
    folds: List[str] = field(default_factory=list)
    checkpoints: List[str] = field(default_factory=list)
    trainer: str = ""
    configuration: str = ""
    plans_manager: Any = None
    configuration_manager: Any = None
    label_manager: Any = None
    mirror_axes: Optional[List[int]] = None
    order: List[int] = field(default_factory=lambda: [2, 1, 0])
    use_mirroring: bool = False
    tile_step_size: float = 0.5

    def network_for(self, array: np.ndarray, spacing: Optional[Sequence[float]] = None, affine=None):
        self.check_channels(array)
        if spacing is None:
            raise EsegetaError("an nnU-Net model needs the volume's voxel spacing (mm) to resample to its plans; "
                               "pass spacing=(si, sj, sk)")
        array = np.asarray(array, dtype=np.float32)
        if array.ndim == 3:
            array = array[None]
        return NnUNetFunction(self, array, [float(s) for s in spacing]).eval()

    def engine_hints(self, spacing=None) -> Dict[str, Any]:
        return {"whole_volume": True, "divisor": 1, "activation": self.card.activation, "head": 0}

    def probe_out_channels(self) -> Optional[int]:
        return self.out_channels

    def refusal(self, spec) -> Optional[str]:
        """Why a registered method cannot run on this model (None: it can)."""
        if spec.needs_layer:
            return REFUSAL.format(what="the layer", why="one layer map on the input grid does not exist")
        return None

    def source_files(self) -> List[tuple]:
        """(role, path) of every file the model was built from (checksummed in run.json)."""
        files = [("nnU-Net plans", os.path.join(self.path, "plans.json")),
                 ("nnU-Net dataset", os.path.join(self.path, "dataset.json"))]
        return files + [(f"nnU-Net checkpoint fold {fold}", path) for fold, path in zip(self.folds, self.checkpoints)]

    @property
    def description(self) -> ModelDescription:
        cm = self.configuration_manager
        schemes = ", ".join(f"{s}{' (non-zero mask)' if m else ''}" for s, m in
                            zip(cm.normalization_schemes, cm.use_mask_for_norm))
        data_kwargs = cm.configuration.get("resampling_fn_data_kwargs", {})
        prob_kwargs = cm.configuration.get("resampling_fn_probabilities_kwargs", {})
        steps = [f"axes: nnU-Net array axes = input axes {['IJK'[o] for o in self.order]} "
                 f"(reader {self.plans_manager.plans.get('image_reader_writer', 'SimpleITKIO')}, "
                 f"transpose_forward {list(self.plans_manager.transpose_forward)})",
                 "crop to the non-zero bounding box (fixed from the volume; outside: background)",
                 f"normalisation: {schemes}",
                 f"resample to the plans' spacing with {cm.configuration.get('resampling_fn_data')} "
                 f"{data_kwargs} (exact separable linear map, differentiable)",
                 f"sliding window: patch {list(cm.patch_size)}, tile step {self.tile_step_size}, Gaussian "
                 f"weights, mirroring {'on ' + str(self.mirror_axes) if self.use_mirroring else 'off'}",
                 f"logits resampled back with {cm.configuration.get('resampling_fn_probabilities')} {prob_kwargs}"]
        card = self.card
        return ModelDescription(
            format="nnunet", name=card.name, path=self.path, classes=card.classes, activation=card.activation,
            activation_source=self.activation_source, in_channels=card.in_channels, out_channels=self.out_channels,
            spacing=card.spacing, patch_size=card.patch_size, normalization=schemes, preprocessing=steps,
            details={"trainer": self.trainer, "configuration": self.configuration,
                     "network": type(self.network).__name__, "folds": ", ".join(self.folds) +
                     (" (ensemble: mean of the folds' logits)" if len(self.folds) > 1 else "")})


class NnUNetFunction(torch.nn.Module):
    """(B, C, I, J, K) volume on the input grid -> (B, n_classes, I, J, K) logits, as nnU-Net
    computes them (module docstring). Constants come from the unperturbed `array` and are fixed."""

    whole_volume = True  # the engine gives it the whole volume in one window

    def __init__(self, model: NnUNetModel, array: np.ndarray, spacing_ijk: Sequence[float]):
        super().__init__()
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
        from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
        from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

        cm = model.configuration_manager
        self.networks = torch.nn.ModuleList(model.networks)
        self.order = list(model.order)
        self.inverse = [int(i) for i in np.argsort(self.order)]
        self.mirror_axes = model.mirror_axes if model.use_mirroring else None
        data = np.ascontiguousarray(array.transpose([0] + [1 + o for o in self.order]))
        spacing = [float(spacing_ijk[o]) for o in self.order]
        self.shape_nn = list(data.shape[1:])
        cropped, seg, bbox = crop_to_nonzero(data.copy())
        self.bbox = [[int(lo), int(hi)] for lo, hi in bbox]
        shape_cropped = list(cropped.shape[1:])
        target = [float(s) for s in cm.spacing]
        new_shape = [int(s) for s in compute_new_shape(shape_cropped, spacing, target)]
        self._set_normalization(cm, model.plans_manager, cropped, seg[0] >= 0)
        self.resample_in = self._data_resampler(cm, cropped, shape_cropped, new_shape, spacing, target)
        self.resample_out = SeparableResample(axis_matrices(
            lambda d, s: cm.resampling_fn_probabilities(d, s, target, spacing), new_shape, shape_cropped))
        patch = [int(p) for p in cm.patch_size]
        # nnU-Net's pad_nd_image: constant 0 up to the patch size, half below, the rest above.
        diff = [max(p - s, 0) for p, s in zip(patch, new_shape)]
        self.pad_below = [d // 2 for d in diff]
        self.padded = [s + d for s, d in zip(new_shape, diff)]
        self.new_shape = new_shape
        steps = compute_steps_for_sliding_window(self.padded, patch, model.tile_step_size)
        self.windows = [tuple(slice(s, s + p) for s, p in zip((sx, sy, sz), patch))
                        for sx in steps[0] for sy in steps[1] for sz in steps[2]]
        gaussian = compute_gaussian(tuple(patch), sigma_scale=1. / 8, value_scaling_factor=10,
                                    dtype=torch.float64, device=torch.device("cpu"))
        weight_sum = torch.zeros(self.padded, dtype=torch.float64)
        for w in self.windows:
            weight_sum[w] += gaussian
        self.register_buffer("gaussian", gaussian)
        self.register_buffer("weight_sum", weight_sum)
        n_out = int(model.out_channels)
        outside = torch.full((n_out,), -OUTSIDE_LOGIT, dtype=torch.float64)
        if not model.label_manager.has_regions:
            outside[0] = 0.0
        self.register_buffer("outside", outside)
        self.record = {
            "what": "nnU-Net inference as one differentiable function of the input voxels",
            "input_shape_ijk": list(array.shape[1:]), "input_spacing_ijk": [float(s) for s in spacing_ijk],
            "axis_order": ["IJK"[o] for o in self.order], "crop_bbox_nnunet_axes": self.bbox,
            "resampled_from": {"shape": shape_cropped, "spacing": spacing},
            "resampled_to": {"shape": new_shape, "spacing": target},
            "resampling_data": f"{cm.configuration.get('resampling_fn_data')} "
                               f"{cm.configuration.get('resampling_fn_data_kwargs', {})}",
            "resampling_back": f"{cm.configuration.get('resampling_fn_probabilities')} "
                               f"{cm.configuration.get('resampling_fn_probabilities_kwargs', {})}",
            "resampling_operator": "exact separable matrices read off nnU-Net's function (torch matmul)",
            "patch_size": patch, "padded_shape": self.padded, "n_patches": len(self.windows),
            "tile_step_size": model.tile_step_size, "mirroring": self.mirror_axes, "folds": list(model.folds),
            "normalization": self.norm_record,
        }
        self.window_text = model_window_text(patch, target, new_shape, spacing_ijk, input_axes=self.order,
                                             n_windows=len(self.windows))

    def _data_resampler(self, cm, cropped: np.ndarray, shape_in, shape_out, spacing, target) -> SeparableResample:
        """nnU-Net's data resampling as matrices. Its default (`resample_data_or_seg_to_shape`) calls
        scikit-image `resize`, which clips its output to the input's range (per channel, or per
        slice when the anisotropic axis is resampled separately): the matrices are read off with
        that clipping turned off, and the clipping is applied with bounds from this volume."""
        from unittest import mock

        from nnunetv2.preprocessing.resampling import default_resampling as nn_resampling

        name = str(cm.configuration.get("resampling_fn_data", ""))
        kwargs = dict(cm.configuration.get("resampling_fn_data_kwargs", {}) or {})

        def unclipped(data, shape):
            with mock.patch.object(nn_resampling, "resize", partial(nn_resampling.resize, clip=False)):
                return cm.resampling_fn_data(data, shape, spacing, target)

        matrices = axis_matrices(unclipped, shape_in, shape_out)
        if name != "resample_data_or_seg_to_shape" or int(kwargs.get("order", 3)) <= 1 or all(m is None for m in matrices):
            return SeparableResample(matrices)  # linear interpolation never leaves the input's range
        separate, axis = nn_resampling.determine_do_sep_z_and_axis(kwargs.get("force_separate_z"), spacing, target)
        with torch.no_grad():
            normalized = self._normalize(torch.from_numpy(cropped[None].astype(np.float64)))[0].numpy()
        if separate:
            other = tuple(a + 1 for a in range(3) if a != axis)
            shape = [normalized.shape[0], 1, 1, 1]
            shape[1 + axis] = normalized.shape[1 + axis]
            lower = normalized.min(axis=other).reshape(shape)
            upper = normalized.max(axis=other).reshape(shape)
            return SeparableResample(matrices, lower, upper, last_axis=int(axis))
        lower = normalized.reshape(normalized.shape[0], -1).min(axis=1).reshape(-1, 1, 1, 1)
        upper = normalized.reshape(normalized.shape[0], -1).max(axis=1).reshape(-1, 1, 1, 1)
        return SeparableResample(matrices, lower, upper)

    def _set_normalization(self, cm, plans_manager, cropped: np.ndarray, mask: np.ndarray) -> None:
        """Per channel: y = (clip(x, lo, hi) - offset) * scale, inside `mask` only where the plans
        say use_mask_for_norm (outside it nnU-Net leaves the voxels as they are)."""
        props = plans_manager.foreground_intensity_properties_per_channel
        rows, records = [], []
        for c, scheme in enumerate(cm.normalization_schemes):
            x = cropped[c].astype(np.float32)
            use_mask = bool(cm.use_mask_for_norm[c]) and scheme == "ZScoreNormalization"
            lo, hi, offset, scale = -np.inf, np.inf, 0.0, 1.0
            if scheme == "ZScoreNormalization":
                values = x[mask] if use_mask else x
                offset, scale = float(values.mean()), 1.0 / max(float(values.std()), 1e-8)
            elif scheme == "CTNormalization":
                p = props[str(c)]
                lo, hi = float(p["percentile_00_5"]), float(p["percentile_99_5"])
                offset, scale = float(p["mean"]), 1.0 / max(float(p["std"]), 1e-8)
            elif scheme == "RescaleTo01Normalization":
                offset = float(x.min())
                scale = 1.0 / max(float(x.max() - x.min()), 1e-8)
            elif scheme == "RGBTo01Normalization":
                scale = 1.0 / 255.0
            rows.append((lo, hi, offset, scale, use_mask))
            records.append({"channel": c, "scheme": scheme, "offset": offset, "scale": scale,
                            "clip": None if lo == -np.inf else [lo, hi], "non_zero_mask": use_mask})
        self.norm_rows = rows
        self.norm_record = records
        self.register_buffer("norm_mask", torch.from_numpy(np.ascontiguousarray(mask)))

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        channels = []
        for c, (lo, hi, offset, scale, use_mask) in enumerate(self.norm_rows):
            xc = x[:, c]
            if np.isfinite(lo):
                xc = torch.clamp(xc, lo, hi)
            y = (xc - offset) * scale
            if use_mask:
                y = torch.where(self.norm_mask, y, x[:, c])
            channels.append(y)
        return torch.stack(channels, dim=1)

    def _predict(self, patch: torch.Tensor) -> torch.Tensor:
        """Mean over folds (and mirrorings) of the network's logits for one patch."""
        total = None
        for network in self.networks:
            out = network(patch)
            if self.mirror_axes:
                import itertools

                axes = [a + 2 for a in self.mirror_axes]
                combos = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
                for dims in combos:
                    out = out + torch.flip(network(torch.flip(patch, dims)), dims)
                out = out / (len(combos) + 1)
            total = out if total is None else total + out
        return total / len(self.networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        x = x.permute(0, 1, *[2 + o for o in self.order])
        box = tuple(slice(lo, hi) for lo, hi in self.bbox)
        x = x[(slice(None), slice(None)) + box]
        y = self.resample_in(self._normalize(x))
        pads = []
        for below, size, padded in zip(reversed(self.pad_below), reversed(self.new_shape), reversed(self.padded)):
            pads += [below, padded - size - below]
        y = torch.nn.functional.pad(y, pads, mode="constant", value=0.0)
        acc = None
        gaussian = self.gaussian.to(x.dtype)
        for w in self.windows:
            out = self._predict(y[(slice(None), slice(None)) + w]).to(x.dtype) * gaussian
            if acc is None:
                acc = torch.zeros((batch, out.shape[1], *self.padded), dtype=x.dtype, device=x.device)
            acc[(slice(None), slice(None)) + w] += out
        acc = acc / self.weight_sum.to(x.dtype)
        inner = tuple(slice(b, b + s) for b, s in zip(self.pad_below, self.new_shape))
        logits = self.resample_out(acc[(slice(None), slice(None)) + inner])
        full = self.outside.to(x.dtype).reshape(1, -1, 1, 1, 1).expand(batch, -1, *self.shape_nn).clone()
        full[(slice(None), slice(None)) + box] = logits
        return full.permute(0, 1, *[2 + i for i in self.inverse])
