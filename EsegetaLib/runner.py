"""Run one explanation into a result directory: what `esegeta explain` and `esegeta demo` do, and
what `esegeta study` does per case.

`ExplainRequest` holds plain values (the command line's strings already split); `prepare` checks
everything a user can get wrong and loads the inputs before any heavy work, raising `EsegetaError`
with one line; `execute` runs the engine and writes the outputs atomically (see outputs.py):

    DIR/attributions/<Method>.<ext>   float32 map on the input grid (channels summed), input's format
    DIR/features/, DIR/rois/          method-specific outputs (feature visualisation volumes and their
                                      projections, top activating windows as ROI lists and Slicer
                                      markups): EsegetaLib/method_outputs.py
    DIR/segmentation.<ext>            the sliding-window model's labels (uint8)
    DIR/metrics.csv, metrics.json     one row per method: metrics, runtime, device, peak memory
    DIR/run.json                      inputs with SHA-256, every parameter, versions, device, timings
    DIR/esegeta.mrb, DIR/previews/    when the scene bridge (EsegetaLib.slicer.scene) is available
"""
from __future__ import annotations

import contextlib
import csv
import difflib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import EsegetaCancelled, EsegetaError, is_cancelled
from .options import PRECISIONS, EngineOptions, Target, is_bundled_model

ProgressFn = Callable[[float, str], None]
MethodList = List[Tuple[str, Dict[str, Any]]]

# Gradient methods that finish in seconds to a minute on 2 CPU cores for the bundled sample
# (measured: see docs/readme/cli.md), each a different view: raw gradient, gradient x input, a
# path integral with a completeness check, and a class-activation map.
DEMO_METHODS = ("Saliency", "InputXGradient", "IntegratedGradients", "GradCAM")
DEMO_PARAMS: Dict[str, Dict[str, Any]] = {"IntegratedGradients": {"n_steps": 16}}
# Metrics that need no further model runs, and the deletion/insertion curves (curves.json and
# deletion_insertion.png: 2 x 20 forward passes per method). Infidelity and sensitivity are left to
# --metrics default|all: they would multiply the demo's time.
DEMO_METRICS = "deletion,insertion,relevance_mass,relevance_rank,sparseness,complexity"


@dataclass
class ExplainRequest:
    """One `explain` run, as plain values (command line, study file or Python)."""

    volume: Union[str, Path]
    model: Optional[Union[str, Path]] = None  # None: the bundled default model
    methods: Union[str, Sequence[str]] = "Saliency"  # names, or "all"
    params: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # method -> {param: value}
    class_index: Optional[Union[int, str]] = None  # index or class name; None: the card's default
    region: str = "predicted"  # predicted | whole | roi:MASKFILE | point:I,J,K | component:I,J,K[:MM] |
    #                            components[:N] | boundary[:MM]
    classes: Optional[Union[str, Sequence[Union[int, str]]]] = None  # "all" or names/indices: one target each
    boundary_mm: Optional[float] = None  # a boundary band of this many mm on the region (component, roi...)
    device: str = "auto"
    precision: str = "auto"
    patch_size: Optional[int] = None  # None: the model card's
    overlap: float = 0.25
    batch_size: Union[int, str] = "auto"
    metrics: Union[str, Sequence[str]] = "default"  # names | "all" | "none" | "default"
    seed: int = 0
    scene: bool = True  # esegeta.mrb + previews/ when slicer-core is installed
    activation: Optional[str] = None  # softmax | sigmoid; None: the model's (one output channel: sigmoid)
    fold: Optional[Union[int, str]] = None  # nnU-Net folders: a fold number or "all"; None: every fold
    mirroring: bool = False  # nnU-Net folders: test-time mirroring (nnUNetPredictor's default)
    # Ground-truth / reference mask (same grid) for localisation metrics: relevance_mass/rank, vxap,
    # pointing_game, relevance_shares. None: the explained region is the reference.
    reference_mask: Optional[Union[str, Path]] = None
    compress: bool = True  # gzip the written maps; False for exchange files read back at once (Slicer worker)
    metric_params: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # metric -> {param: value}
    # test-time augmentation: "flips" | "noise:N[:F]" -> stability/<method>_mean, _cv and the prediction's
    # entropy (stability.py); None: off
    stability: Optional[str] = None
    # A method refused on this model (it cannot run here, or its map misses its guarantee, e.g.
    # DeepLift's summation to delta): "fail" stops the run (esegeta explain: the user chose the method);
    # "record" goes on with the others and records the refusal (PreparedRun.refused, run.json
    # "refused"), as a study does per case.
    on_refusal: str = "fail"


ON_REFUSAL = ("fail", "record")


@dataclass
class PreparedRun:
    request: ExplainRequest
    image: Any  # io.Image
    model: Any  # models.LoadedModel
    target: Target
    options: EngineOptions
    methods: MethodList
    metrics: Union[str, List[str]]
    inputs: List[Tuple[str, Path]]  # (role, path) of every file read
    class_name: str
    device: str
    warnings: List[str] = field(default_factory=list)
    reference_mask: Optional[np.ndarray] = None  # bool (I, J, K) from request.reference_mask
    stability: Any = None  # stability.StabilitySpec from request.stability
    refused: Dict[str, str] = field(default_factory=dict)  # method -> why it was refused (on_refusal="record")

    @property
    def methods_run(self) -> MethodList:
        """The methods not refused (so far: a method may also be refused while it runs)."""
        return [(name, params) for name, params in self.methods if name not in self.refused]


# ----------------------------------------------------------------------------------- parsing
def split_list(text: Union[str, Sequence[str], None]) -> List[str]:
    if text is None:
        return []
    if isinstance(text, str):
        return [part.strip() for part in text.split(",") if part.strip()]
    return [str(part).strip() for part in text if str(part).strip()]


def _assignments(items: Sequence[str], flag: str, owner: str, pattern: str, example: str):
    """Yield (owner, name, value text) from `OWNER.NAME=VALUE` strings; one-line error otherwise."""
    for item in items or ():
        match = re.fullmatch(r"\s*(" + pattern + r")\.([A-Za-z0-9_]+)\s*=\s*(.*?)\s*", item)
        if not match:
            raise EsegetaError(f"{flag} '{item}' is not {owner}.NAME=VALUE (e.g. {example}).")
        yield match.groups()


def parse_param_assignments(items: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """`["IntegratedGradients.n_steps=32", ...]` -> {"IntegratedGradients": {"n_steps": "32"}}."""
    params: Dict[str, Dict[str, str]] = {}
    for method, name, value in _assignments(items, "--param", "METHOD", r"[A-Za-z0-9_+\-]+",
                                            "IntegratedGradients.n_steps=32"):
        params.setdefault(method, {})[name] = value
    return params


def parse_metric_params(items: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """`["sensitivity.n_samples=4", "randomisation.within=region"]` -> {"sensitivity": {"n_samples": 4}, ...}:
    values read as JSON where they parse (numbers, true/false, null), else kept as text; names are
    checked against the metrics' own parameters (one-line error)."""
    import json

    from .metrics.evaluate import resolve_params

    params: Dict[str, Dict[str, Any]] = {}
    for metric, name, text in _assignments(items, "--metric-param", "METRIC", r"[A-Za-z_]+",
                                           "sensitivity.n_samples=4"):
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        params.setdefault(metric.lower(), {})[name] = value
    resolve_params(params)  # unknown metric or parameter: one line naming it
    return params


def resolve_methods(names: Union[str, Sequence[str]], params: Dict[str, Dict[str, Any]]) -> MethodList:
    """Registered names (case-insensitive, closest suggested) with validated parameters."""
    from .methods import all_methods, get_method

    wanted = split_list(names)
    if [w.lower() for w in wanted] == ["all"]:
        specs = all_methods()
    else:
        if not wanted:
            raise EsegetaError("No method given; pass --methods NAME[,NAME...] or 'all' (see 'esegeta methods').")
        specs = [get_method(name) for name in wanted]
    seen, unique = set(), []
    for spec in specs:
        if spec.name not in seen:
            seen.add(spec.name)
            unique.append(spec)
    chosen = {spec.name.lower(): spec for spec in unique}
    for method in params:
        if method.lower() not in chosen:
            hint = difflib.get_close_matches(method.lower(), list(chosen), n=1)
            extra = f" Did you mean '{chosen[hint[0]].name}'?" if hint else ""
            raise EsegetaError(f"--param names method '{method}', which is not among the methods run "
                               f"({', '.join(s.name for s in unique)}).{extra}")
    resolved: MethodList = []
    for spec in unique:
        given = {}
        for method, values in params.items():
            if method.lower() == spec.name.lower():
                given.update(values)
        given = {key: _coerce_choice(spec, key, value) for key, value in given.items()}
        spec.resolve_params(given)  # validates names, types and ranges now, before any work
        resolved.append((spec.name, given))
    return resolved


def _coerce_choice(spec, key: str, value: Any) -> Any:
    """Command-line values are strings; match them to a 'choice' parameter's typed choices."""
    for p in spec.params:
        if p.name == key and p.kind == "choice" and p.choices and isinstance(value, str):
            for choice in p.choices:
                if str(choice).lower() == value.lower():
                    return choice
    return value


REGION_SYNTAX = ("predicted, whole, roi:MASKFILE, point:I,J,K, component:I,J,K[:MM], components[:N] "
                 "or boundary[:MM]")


@dataclass
class RegionRequest:
    """A parsed --region: its kind and the values that come with it."""

    kind: str
    mask: Optional[Path] = None
    point: Optional[Tuple[int, int, int]] = None
    geodesic_mm: Optional[float] = None  # component:I,J,K:MM
    boundary_mm: Optional[float] = None  # boundary:MM
    min_voxels: Optional[int] = None  # components:N


def _number(text: str, whole: bool, what: str, example: str) -> float:
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        raise EsegetaError(f"--region '{what}': {text.strip()!r} is not a {'whole ' if whole else ''}number; "
                           f"e.g. {example}.") from None
    if value <= 0:
        raise EsegetaError(f"--region '{what}': {value} must be positive; e.g. {example}.")
    return value


def parse_region_request(text: str) -> RegionRequest:
    """`--region` text -> RegionRequest; one-line EsegetaError naming the syntax otherwise."""
    text = str(text).strip()
    kind, _, rest = text.partition(":")
    kind = kind.lower().strip()
    if kind in ("predicted", "whole") and not rest:
        return RegionRequest(kind)
    if kind == "roi" and rest:
        return RegionRequest("roi", mask=Path(rest))
    if kind in ("point", "component") and rest:
        coords, _, limit = rest.partition(":")
        parts = [p.strip() for p in coords.split(",")]
        try:
            if len(parts) != 3 or (kind == "point" and limit):
                raise ValueError
            point = tuple(int(p) for p in parts)
        except ValueError:
            example = "point:40,52,30" if kind == "point" else "component:40,52,30 or component:40,52,30:10"
            raise EsegetaError(f"--region '{text}': {kind} takes three voxel indices, e.g. {example}.") from None
        geodesic = _number(limit, False, text, "component:40,52,30:10 (10 mm along the vessel)") if limit else None
        return RegionRequest(kind, point=point, geodesic_mm=geodesic)  # type: ignore[arg-type]
    if kind == "components":
        n = int(_number(rest, True, text, "components:50 (components of 50 voxels or more)")) if rest else None
        return RegionRequest("components", min_voxels=n)
    if kind == "boundary":
        band = _number(rest, False, text, "boundary:0.8 (0.8 mm each side of the wall)") if rest else None
        return RegionRequest("boundary", boundary_mm=band)
    raise EsegetaError(f"--region '{text}' is not understood; use {REGION_SYNTAX}.")


def parse_region(text: str) -> Tuple[str, Optional[Path], Optional[Tuple[int, int, int]]]:
    """`--region` text -> (region kind, mask path, point); see `parse_region_request` for the rest."""
    request = parse_region_request(text)
    return request.kind, request.mask, request.point


def resolve_classes(card, given) -> Optional[Union[str, List[int]]]:
    """--classes 'all' | 'A,B' (names or indices, checked against the model card) -> 'all' | indices."""
    names = split_list(given)
    if not names:
        return None
    if [n.lower() for n in names] == ["all"]:
        return "all"
    indices = [resolve_class(card, name)[0] for name in names]
    if len(set(indices)) != len(indices):
        raise EsegetaError(f"--classes names a class twice ({', '.join(names)}); give each class once.")
    return indices


# --------------------------------------------------------------------------------- checking
def check_readable(path: Union[str, Path], what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise EsegetaError(f"{what} '{path}' does not exist; check the path.")
    if path.is_dir() and what != "model":
        raise EsegetaError(f"{what} '{path}' is a folder; give a file.")
    try:
        if path.is_file():
            with open(path, "rb") as handle:
                handle.read(1)
    except OSError as exc:
        raise EsegetaError(f"{what} '{path}' cannot be read ({exc.strerror}); check its permissions.") from None
    return path


def read_volume(path: Path):
    """io.read_image, with what to do added when the file is not a readable image."""
    from .io import read_image

    try:
        return read_image(path)
    except EsegetaError as exc:
        if str(exc).startswith("cannot read"):
            raise EsegetaError(f"{exc}; give a NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage "
                               "(.mha, .mhd) volume.") from exc
        raise


def read_mask(path: Path, image) -> np.ndarray:
    """A region mask from a file on exactly the volume's grid (shape and geometry)."""
    check_readable(path, "mask")
    mask = read_volume(path)
    if mask.spatial_shape != image.spatial_shape or not np.allclose(mask.ijk_to_ras, image.ijk_to_ras, atol=1e-3):
        raise EsegetaError(
            f"Mask '{path}' is on another grid (shape {mask.spatial_shape}) than the volume (shape "
            f"{image.spatial_shape}) or has other geometry; resample it onto the volume (e.g. in Slicer) first."
        )
    values = mask.array.max(axis=0) if mask.channels > 1 else mask.array[0]
    region = values > 0.5
    if not region.any():
        raise EsegetaError(f"Mask '{path}' has no voxel set (all values <= 0.5); give a non-empty mask.")
    return region


def resolve_class(card, given: Optional[Union[int, str]]) -> Tuple[int, str]:
    """A class index (or name from the model card) -> (index, name).

    Default: the first foreground class, i.e. 1 under softmax (class 0 is the background; a softmax
    over one channel would be constant) and 0 under sigmoid (one channel per structure)."""
    names = [str(n) for n in (getattr(card, "classes", None) or [])]
    listing = ", ".join(f"{i}={n}" for i, n in enumerate(names))
    if given is None:
        index = 1 if getattr(card, "activation", "softmax") == "softmax" else 0
    elif isinstance(given, str) and not given.strip().lstrip("-").isdigit():
        lowered = [n.lower() for n in names]
        if given.lower() not in lowered:
            known = f"its classes are {listing}" if names else "its card names no classes, so give an index"
            raise EsegetaError(f"--class '{given}' is not a class of this model; {known}.")
        index = lowered.index(given.lower())
    else:
        index = int(given)
    if index < 0 or (names and index >= len(names)):
        raise EsegetaError(f"--class {index} is out of range: the model has classes {listing or '0, 1, ...'}.")
    return index, (names[index] if names else f"class {index}")


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def resolve_device_name(device: str, warnings: List[str]) -> str:
    """'auto' falls back to CPU (with a warning); an unavailable 'cuda' is a bad input."""
    device = str(device).lower()
    if device == "auto":
        if cuda_available():
            return "cuda"
        warnings.append("no CUDA GPU is available; running on the CPU (expect minutes for large volumes).")
        return "cpu"
    if device.startswith("cuda") and not cuda_available():
        import torch

        raise EsegetaError(f"--device {device}: no CUDA GPU is available to this torch ({torch.__version__}); "
                           "use --device cpu (or auto), or install a CUDA build of torch.")
    return device


# ---------------------------------------------------------------------------------- prepare
def prepare(request: ExplainRequest) -> PreparedRun:
    """Check and load everything; raise EsegetaError (one line) on anything the user can fix."""
    warnings: List[str] = []
    if request.precision not in PRECISIONS:
        raise EsegetaError(f"--precision must be one of {', '.join(PRECISIONS)}; got {request.precision!r}.")
    if not 0.0 <= float(request.overlap) < 1.0:
        raise EsegetaError(f"--overlap must be in [0, 1); got {request.overlap}.")
    if request.patch_size is not None and int(request.patch_size) < 8:
        raise EsegetaError(f"--patch-size must be at least 8 voxels; got {request.patch_size}.")
    if request.batch_size != "auto" and int(request.batch_size) < 1:
        raise EsegetaError(f"--batch-size must be a positive integer or 'auto'; got {request.batch_size}.")
    region_request = parse_region_request(request.region)
    region, mask_path, point = region_request.kind, region_request.mask, region_request.point
    boundary_mm = request.boundary_mm if request.boundary_mm is not None else region_request.boundary_mm
    if boundary_mm is not None and float(boundary_mm) <= 0:
        raise EsegetaError(f"--boundary must be a positive number of mm; got {boundary_mm}.")
    if request.boundary_mm is not None and region in ("whole", "point"):
        raise EsegetaError(f"--boundary needs a region with a boundary (predicted, component, components, roi); "
                           f"--region {region} has none.")
    methods = resolve_methods(request.methods, request.params)
    from .stability import parse_stability

    stability = parse_stability(request.stability)
    if stability is not None and (request.classes is not None or region in ("components",)):
        raise EsegetaError("--stability explains one target at a time; drop --classes / components, or run "
                           "each class or component separately.")
    metrics = resolve_metrics(request.metrics)
    for metric in sorted(set(request.metric_params or {}) - set(metrics if metrics != "none" else [])):
        warnings.append(f"--metric-param for '{metric}' is ignored: that metric is not computed (add it to --metrics).")

    volume_path = check_readable(request.volume, "volume")
    image = read_volume(volume_path)
    if not np.all(np.isfinite(image.array)):
        raise EsegetaError(f"Volume '{volume_path}' contains NaN or infinite voxels; fix or mask them first.")
    inputs: List[Tuple[str, Path]] = [("volume", volume_path)]

    model = _load_model(request.model, inputs, fold=request.fold, activation=request.activation,
                        mirroring=request.mirroring)
    card = model.card
    from .methods.base import check_network_support, get_method

    specs = [get_method(name) for name, _ in methods]
    refused: Dict[str, str] = {}
    if request.on_refusal not in ON_REFUSAL:
        raise EsegetaError(f"on_refusal must be one of {', '.join(ON_REFUSAL)}; got {request.on_refusal!r}.")
    if request.on_refusal == "record":  # each method on its own: the others still run
        for spec in specs:
            try:
                check_network_support([spec], model.network)
            except EsegetaError as exc:
                refused[spec.name] = str(exc)
        refused.update({s.name: f"{s.name} {model.refusal(s)}." for s in specs
                        if s.name not in refused and hasattr(model, "refusal") and model.refusal(s)})
        if len(refused) == len(specs):
            raise EsegetaError("every method was refused on this model: "
                               + " ".join(refused.values()))
    else:
        check_network_support(specs, model.network)
        refusals = {s.name: model.refusal(s) for s in specs if hasattr(model, "refusal") and model.refusal(s)}
        if refusals:
            raise EsegetaError(f"{', '.join(refusals)} {next(iter(refusals.values()))}.")
    in_channels = getattr(card, "in_channels", None)  # None: not known before the first forward
    if in_channels is not None and in_channels > image.channels:
        raise EsegetaError(f"The model expects {in_channels} input channels but '{volume_path}' has "
                           f"{image.channels}; give a volume with {in_channels} channels (or another model).")
    if in_channels is not None and in_channels < image.channels:
        raise EsegetaError(f"The model expects {in_channels} input channel(s) but '{volume_path}' has "
                           f"{image.channels}; pick the channels the model was trained on first.")

    mask = None
    if region == "roi":
        mask = read_mask(mask_path, image)
        inputs.append(("mask", mask_path))
    reference = None
    if request.reference_mask is not None:
        reference = read_mask(Path(request.reference_mask), image)
        inputs.append(("reference_mask", Path(request.reference_mask)))
    if region in ("point", "component"):
        shape = image.spatial_shape
        if any(not 0 <= p < s for p, s in zip(point, shape)):
            raise EsegetaError(f"--region {region}:{','.join(map(str, point))} is outside the volume "
                               f"(shape {shape}; indices start at 0); pick a voxel inside it.")

    class_index, class_name = resolve_class(card, request.class_index)
    classes = resolve_classes(card, request.classes)
    if classes is not None and region == "component":
        raise EsegetaError("--classes does not combine with --region component (the clicked voxel has one class); "
                           "use --class, or --region components for every component of each class.")
    device = resolve_device_name(request.device, warnings)
    # The model card's settings flow into the target and the engine; the command line wins.
    hints = {}
    if hasattr(model, "engine_hints"):  # a card whose spacing differs from the volume's resamples
        import inspect

        takes_spacing = "spacing" in inspect.signature(model.engine_hints).parameters
        hints = model.engine_hints(spacing=image.spacing) if takes_spacing else model.engine_hints()
    target = Target(class_index=class_index, region=region, activation=hints.get("activation", "softmax"),
                    head=hints.get("head", 0), mask=mask, point=point, classes=classes,
                    geodesic_mm=region_request.geodesic_mm,
                    boundary_mm=None if boundary_mm is None else float(boundary_mm),
                    class_names=[str(n) for n in (getattr(card, "classes", None) or [])] or None)
    if region_request.min_voxels is not None:
        target.min_component_voxels = int(region_request.min_voxels)
    patch = request.patch_size if request.patch_size is not None else hints.get("patch_size")
    if hints.get("whole_volume"):
        # The model resamples and runs its own sliding window inside the explained function: the
        # engine gives it the whole volume in one window, with no padding.
        if request.patch_size is not None:
            warnings.append(f"--patch-size {request.patch_size} is ignored: this {model.format} model runs its own "
                            "sliding window at its own patch size inside the explained function.")
        patch = tuple(int(s) for s in image.spatial_shape)
    options = EngineOptions(device=device, precision=request.precision, patch_size=patch,
                            overlap=float(request.overlap),
                            batch_size=request.batch_size if request.batch_size == "auto" else int(request.batch_size),
                            divisor=int(hints.get("divisor") or EngineOptions.divisor),
                            seed=int(request.seed))
    return PreparedRun(request=request, image=image, model=model, target=target, options=options,
                       methods=methods, metrics=metrics, inputs=inputs, class_name=class_name,
                       device=device, warnings=warnings, reference_mask=reference, stability=stability,
                       refused=refused)


def _load_model(path, inputs: List[Tuple[str, Path]], fold=None, activation: Optional[str] = None,
                mirroring: bool = False):
    from . import models

    if is_bundled_model(path):
        if fold is not None or mirroring:
            raise EsegetaError("--fold and --mirroring apply to nnU-Net trained-model folders only, not to the "
                               "bundled model.")
        path = None
        model = models.load_default_model()
        if activation is not None:
            model.set_activation(activation)
    else:
        check_readable(path, "model")
        model = models.load_model(path, fold=fold, activation=activation, mirroring=mirroring)
    for role, file in model_files(model, path):
        inputs.append((role, file))
    return model


def model_files(model, given) -> List[Tuple[str, Path]]:
    """Files a model was loaded from (the file given, and a card's weights file), for checksums."""
    if hasattr(model, "source_files"):  # folders and bundles: every file the network came from
        return [(role, Path(file)) for role, file in model.source_files()]
    path = getattr(model, "path", None) or given
    if path is None or not Path(path).is_file():
        return []
    files = [("model", Path(path))]
    weights = getattr(model.card, "weights", None)
    if str(path).lower().endswith(".json") and weights:
        weights_path = Path(path).parent / weights
        if weights_path.is_file():
            files.append(("model weights", weights_path))
    return files


def resolve_metrics(metrics: Union[str, Sequence[str], None]) -> Union[str, List[str]]:
    """'none' | 'all' | 'default' | names -> 'none' or the metric names (checked by EsegetaLib.metrics).

    Runtime, device and peak memory per method are written whatever is chosen."""
    names = split_list(metrics if metrics is not None else "none")
    if [n.lower() for n in names] in (["none"], []):
        return "none"
    try:
        from .metrics import parse_metrics
    except ImportError as exc:
        if [n.lower() for n in names] == ["default"]:
            return "none"
        raise EsegetaError(f"--metrics {','.join(names)}: the metrics module cannot be loaded here ({exc}); "
                           "use --metrics none.") from None
    chosen = parse_metrics(None if [n.lower() for n in names] == ["default"] else names)
    return chosen or "none"


# ---------------------------------------------------------------------------------- execute
def execute(prepared: PreparedRun, out_dir: Union[str, Path], overwrite: bool = False,
            progress: Optional[ProgressFn] = None, cancel: Optional[Union[threading.Event, Callable[[], bool]]] = None,
            note: Callable[[str], None] = lambda text: None, warn: Callable[[str], None] = lambda text: None,
            command: str = "explain",
            argv: Optional[List[str]] = None) -> Path:
    """Run the engine and write the result directory; returns its path. Nothing is left behind on
    failure or cancellation (the directory is as it was)."""
    from . import provenance
    from .outputs import ResultDirectory

    from .work import WorkPlan, method_stages

    progress = progress or (lambda fraction, message: None)
    started = provenance.utc_now()
    t0 = time.perf_counter()
    # Progress by the work left (work.py): segmentation, each method, the metrics, then writing.
    stages = method_stages([spec for spec, _ in _method_specs(prepared)])
    tta = ["stability"] if prepared.stability is not None else []
    plan = WorkPlan(progress, ["segmentation"] + stages + tta + ["metrics", "writing"])
    plan.set("writing", 0.0)  # seconds of file writing: not model work, not in the estimate
    with ResultDirectory(out_dir, overwrite=overwrite, inputs=[p for _, p in prepared.inputs]) as result:
        explanation, session, peaks, engine_seconds = _run_engine(prepared, plan, stages, cancel)
        stability = _stability(prepared, session, explanation, plan, stages) if tta else None
        folder = result.path
        written = write_images(folder, prepared.image, explanation, compress=prepared.request.compress)
        from .method_outputs import write_method_outputs

        extra_files = write_method_outputs(folder, prepared.image, explanation)
        if stability is not None:
            written.update(write_stability(folder, prepared.image, stability, compress=prepared.request.compress))
        t_engine = time.perf_counter()
        metric_rows = _metrics(prepared, explanation, session, peaks, folder, plan.stage("metrics"), cancel)
        t_metrics = time.perf_counter()
        _check_cancel(cancel)
        writing = plan.stage("writing")
        if prepared.request.scene:
            writing(None, "writing the Slicer review scene and previews")
        scene_record = _scene(prepared, explanation, folder, metric_rows, note, warn)
        _check_cancel(cancel)
        timings = {"engine_seconds": engine_seconds, "total_seconds": None,
                   "metrics_seconds": t_metrics - t_engine, "scene_seconds": time.perf_counter() - t_metrics,
                   "methods": {name: r.seconds for name, r in explanation.results.items()}}
        record = _run_json(prepared, explanation, command, argv, started, timings, metric_rows, written, scene_record,
                           extra_files)
        timings["total_seconds"] = time.perf_counter() - t0
        if stability is not None:
            record["stability"] = stability.summary(explanation.region)
        if prepared.refused:  # on_refusal="record": the methods that gave no map, and why
            record["refused"] = dict(prepared.refused)
        record["outputs"] = provenance.output_records(folder)
        provenance.write_json(folder / "run.json", record)
        plan.finish("done")
        return result.commit()


def _stability(prepared: PreparedRun, session, explanation, plan, stages: Sequence[str]):
    """The methods rerun under test-time augmentation (stability.py); each plain result gets the
    "stability" trust check."""
    from .stability import add_stability_check, augmentations, run_stability
    from .work import BACKWARD, BACKWARD_FORWARDS

    image = prepared.image
    runs = len(augmentations(prepared.stability, image.array[:1, :1, :1, :1]))
    per_run = sum((plan.units.get(s) or 0.0) * (BACKWARD_FORWARDS if plan.kinds.get(s) == BACKWARD else 1.0)
                  for s in ["segmentation"] + list(stages))
    plan.set("stability", runs * per_run)
    # a model-level visualisation has no map of this input to augment
    methods = [(name, params) for (name, params), (spec, _) in zip(prepared.methods_run, _method_specs(prepared))
               if spec.level != "model"]
    result = run_stability(session, lambda array: prepared.model.network_for(array, spacing=image.spacing,
                                                                             affine=image.ijk_to_ras),
                           methods, prepared.stability, progress=plan.stage("stability"))
    for name, method_result in explanation.results.items():
        if method_result.model_level:
            method_result.add_check("stability", "not_run", None, "a model-level visualisation has no map of this "
                                    "input to rerun under test-time augmentation")
            continue
        add_stability_check(method_result, result, name, explanation.region)
    return result


def write_stability(folder: Path, image, stability, compress: bool = True) -> Dict[str, str]:
    """stability/<method>_mean, <method>_cv and prediction_entropy on the input grid (float32)."""
    from .io import extension_for, write_image

    ext = extension_for(image)
    if not compress and ext == ".nii.gz":
        ext = ".nii"
    (folder / "stability").mkdir()
    written = {}
    volumes = {f"{name}_{kind}": array for name, (mean, cv) in stability.maps.items()
               for kind, array in (("mean", mean), ("cv", cv))}
    volumes["prediction_entropy"] = stability.prediction_entropy
    for key, array in volumes.items():
        path = folder / "stability" / f"{key}{ext}"
        write_image(path, np.asarray(array, dtype=np.float32), image, dtype=np.float32, compress=compress)
        written[f"stability/{key}"] = path.relative_to(folder).as_posix()
    return written


def _check_cancel(cancel) -> None:
    if is_cancelled(cancel):
        raise EsegetaCancelled("cancelled")


def _method_specs(prepared: PreparedRun):
    from .methods import get_method

    return [(get_method(name), params) for name, params in prepared.methods_run]


def _run_engine(prepared: PreparedRun, plan, stages: Sequence[str], cancel):
    """One engine session, methods one after another (as `api.explain` does), so that each method
    gets its own runtime and peak memory. `plan`: the run's work.WorkPlan (progress)."""
    from .api import describe_grid, target_records, target_regions
    from .engine import ExplainSession
    from .results import TARGET_SEPARATOR, Explanation
    from .work import plan_methods

    image = prepared.image
    network = prepared.model.network_for(image.array, spacing=image.spacing, affine=image.ijk_to_ras)
    requests = _method_specs(prepared)
    from .methods.layers import check_layer_names

    check_layer_names(requests, network)  # before the segmentation: a misspelt layer costs nothing
    t0 = time.perf_counter()
    session = ExplainSession(image.array, network, prepared.target, prepared.options, spacing=image.spacing,
                             progress=plan.stage("segmentation"), cancel=cancel)
    plan_methods(plan, session, requests, stages)
    _plan_metrics(plan, prepared, session, requests)
    results, peaks = {}, {}
    several = len(session.targets) > 1
    for stage, (spec, params) in zip(stages, requests):
        session.check_cancel()
        session.progress = plan.stage(stage)
        meter = _meter(session.device)
        try:
            with meter.measure():
                if several:  # one map per target: "<target>/<method>" (a folder per target)
                    by_target = session.attribute_targets(spec, params)
                else:
                    results[spec.name] = session.attribute(spec, params)
        except EsegetaError as exc:  # refused on this model (its guarantee missed, no rule for a layer...)
            if prepared.request.on_refusal != "record":
                raise
            prepared.refused[spec.name] = str(exc)
            continue
        if several:
            for target_name, result in by_target.items():
                results[f"{target_name}{TARGET_SEPARATOR}{spec.name}"] = result
                peaks[f"{target_name}{TARGET_SEPARATOR}{spec.name}"] = {"attribution_peak_mb": meter.peak_mb}
        else:
            peaks[spec.name] = {"attribution_peak_mb": meter.peak_mb}
    if not results:
        raise EsegetaError("every method was refused on this model: " + " ".join(prepared.refused.values()))
    session.progress = None  # metrics report their own progress; their reruns would jump the bar back
    engine = {"device": str(session.device), "precision": session.precision,
              "precision_requested": prepared.options.precision, "precision_reason": session.precision_reason,
              "dtype": str(session.dtype).replace("torch.", ""), "batch_size": session.batch_size,
              "divisor": prepared.options.divisor, "overlap": prepared.options.overlap,
              "seed": prepared.options.seed, "patch_size_requested": prepared.options.patch_size,
              "n_windows": len(session.windows)}
    engine.update(describe_grid(session))
    if getattr(network, "record", None):  # what the model's own preprocessing resampled, and how
        engine["model_preprocessing"] = network.record
    explanation = Explanation(segmentation=session.segmentation, region=session.regions_union, results=results,
                              target=_target_record(prepared, session), engine=engine,
                              seconds=time.perf_counter() - t0, targets=target_records(session),
                              target_regions=target_regions(session))
    skipped = session.targets[0].info.get("classes_without_prediction")
    if skipped:
        prepared.warnings.append(f"--classes all: no voxel is predicted as class(es) {', '.join(map(str, skipped))} "
                                 "on this volume; they have no target.")
    return explanation, session, peaks, explanation.seconds


def _meter(device):
    """Wall time and peak memory of a block: the metrics package's Meter (CUDA peak allocated; on
    Linux CPUs the process's peak resident set, reset per block), or a plain clock without it."""
    try:
        from .metrics.context import Meter

        return Meter(device)
    except ImportError:
        return _ClockOnly()


class _ClockOnly:
    peak_mb = float("nan")

    @contextlib.contextmanager
    def measure(self):
        yield self


def explained_classes(prepared: PreparedRun, session) -> Tuple[Union[int, List[int]], Union[str, List[str]]]:
    """(class index, class name) the run explains; lists, in target order, when it explains several
    classes (--classes): each class once, named by the model card (else "class N")."""
    t = prepared.target
    if t.classes is None:
        return t.class_index, prepared.class_name
    indices = list(dict.fromkeys(int(x.class_index) for x in session.targets))
    card = [str(n) for n in (t.class_names or [])]
    return indices, [card[i] if i < len(card) else f"class {i}" for i in indices]


def _target_record(prepared: PreparedRun, session) -> Dict[str, Any]:
    t = prepared.target
    class_index, class_name = explained_classes(prepared, session)
    record = {"class_index": class_index, "class_name": class_name, "region": prepared.request.region,
              "score": t.score, "activation": t.activation, "reduction": t.reduction, "head": t.head,
              "region_voxels": int(session.regions_union.sum())}
    if t.point is not None:
        record["point"] = list(t.point)
    for key in ("geodesic_mm", "boundary_mm"):
        if getattr(t, key) is not None:
            record[key] = getattr(t, key)
    record["boundary_mm"] = session.targets[0].info.get("boundary_mm", record.get("boundary_mm"))
    if record["boundary_mm"] is None:
        record.pop("boundary_mm")
    if t.classes is not None:
        record["classes"] = t.classes if isinstance(t.classes, str) else [int(c) for c in t.classes]
    if len(session.targets) > 1:
        record["targets"] = [{"name": x.name, "class_index": x.class_index, **x.info} for x in session.targets]
    elif session.targets[0].info:
        record["region_facts"] = dict(session.targets[0].info)
    return record


def write_images(folder: Path, image, explanation, compress: bool = True) -> Dict[str, str]:
    """Attribution maps (float32) and the label map on the input grid, in the input's format family
    (`compress=False`: uncompressed NRRD / .nii, for files another process reads back at once)."""
    from .io import extension_for, write_image
    from .results import TARGET_SEPARATOR

    ext = extension_for(image)
    if not compress and ext == ".nii.gz":
        ext = ".nii"
    written = {}
    (folder / "attributions").mkdir()
    for name, result in explanation.results.items():
        if result.model_level:  # no map of this input (features/: method_outputs.py)
            continue
        path = folder / "attributions" / f"{name}{ext}"  # "<target>/<method>" with several targets
        path.parent.mkdir(parents=True, exist_ok=True)
        write_image(path, np.asarray(result.map, dtype=np.float32), image, dtype=np.float32, compress=compress)
        written[name] = path.relative_to(folder).as_posix()
    for target, sign in getattr(explanation, "target_regions", {}).items():
        # each target's region: 1 region (inside band), -1 outside band, 0 elsewhere
        path = folder / "attributions" / target / f"region{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_image(path, np.asarray(sign, dtype=np.float32), image, dtype=np.float32, compress=compress)
        written[f"{target}{TARGET_SEPARATOR}region"] = path.relative_to(folder).as_posix()
    seg_path = folder / f"segmentation{ext}"
    write_image(seg_path, np.asarray(explanation.segmentation).astype(np.uint8), image, dtype=np.uint8,
                compress=compress)
    written["segmentation"] = seg_path.relative_to(folder).as_posix()
    return written


# ---------------------------------------------------------------------------------- metrics
TARGET_PLOTS = "deletion_insertion"  # several targets: deletion_insertion/<target>.png
BASIC_COLUMNS = ("method", "attribution_s", "attribution_peak_mb", "device")


def basic_rows(explanation, peaks: Dict[str, Dict[str, Any]], device: str) -> List[Dict[str, Any]]:
    """Runtime, peak memory and device per method (and the IG convergence delta where there is one);
    with several targets each row also names its `target`."""
    from .results import TARGET_SEPARATOR

    rows = []
    several = getattr(explanation, "multi_target", False)
    for name, result in explanation.results.items():
        row = {"method": name, "attribution_s": float(result.seconds), "device": device}
        if several:  # "<target>/<method>": the target's own column, as with metrics
            row["target"] = name.partition(TARGET_SEPARATOR)[0]
        row.update(peaks.get(name, {}))
        diagnostics = result.diagnostics or {}
        for key in ("convergence_delta", "relative_convergence_delta"):  # completeness of path methods
            if diagnostics.get(key) is not None:
                row[key] = float(np.max(np.abs(np.asarray(diagnostics[key], dtype=float))))
        if diagnostics.get("steps_used_mean") is not None:
            row["steps_used_mean"] = float(diagnostics["steps_used_mean"])
        row.update(trust_columns(result))
        rows.append(row)
    return rows


def trust_columns(result) -> Dict[str, Any]:
    """The result's trust report as table columns: `trust` (one cell, e.g. "completeness=pass
    (0.0042); determinism=pass (0)"), and per check `check_<name>` (status) and `check_<name>_value`."""
    cells, columns = [], {}
    for check in result.checks:
        number = "" if check.value is None else f" ({check.value:.3g})"
        cells.append(f"{check.name}={check.status}{number}")
        columns[f"check_{check.name}"] = check.status
        columns[f"check_{check.name}_value"] = check.value
    columns["trust"] = "; ".join(cells)
    return columns


def add_randomisation_checks(explanation, rows: List[Dict[str, Any]]) -> None:
    """The randomisation sanity check (when computed) joins each result's trust report, and the row's
    trust columns are refreshed; a method the check could not run on says why (`not_run`)."""
    for row in rows:
        result = explanation.results.get(row.get("method"))
        if result is None or not any(k.startswith("randomisation") for k in row):
            continue
        passed, rho = row.get("randomisation_pass"), row.get("randomisation_spearman_signed")
        if passed is None:
            result.add_check("randomisation", "not_run", None,
                             row.get("randomisation_note") or "the network has no parameters that could be redrawn")
        else:
            result.add_check("randomisation", "pass" if passed else "warn", rho,
                             "signed Spearman rank correlation between the map and the map of the fully "
                             "randomised network; |rho| < 0.5 passes (Adebayo et al. 2018)")
        row.update(trust_columns(result))


def _plan_metrics(plan, prepared: PreparedRun, session, requests) -> None:
    """The metrics stage's work: per target (outer, each with its own region and windows), method
    and metric (inner, the order metrics.evaluate reports in), the window forwards each metric
    reruns. `requests`: the run's (spec, params)."""
    if prepared.metrics == "none":
        plan.set("metrics", 0.0)
        return
    from .metrics.evaluate import METRIC_PARAMS, parse_metrics
    from .work import BACKWARD, BACKWARD_FORWARDS, metric_work, per_target, single_target_work

    names = parse_metrics(prepared.metrics)

    def target_items(s) -> List[float]:
        items = []
        for spec, params in requests:
            try:
                units, kind = single_target_work(spec, spec.resolve_params(params), s)
            except Exception:  # noqa: BLE001 - an estimate only: the catalogue's cost
                units, kind = max(len(s.active), 1) * max(float(spec.cost), 1.0), BACKWARD
            units *= BACKWARD_FORWARDS if kind == BACKWARD else 1.0
            for name in names:
                amount, kind = metric_work(name, METRIC_PARAMS.get(name, {}), s, units / BACKWARD_FORWARDS)
                items.append(amount * (BACKWARD_FORWARDS if kind == BACKWARD else 1.0))
        return items

    items = [item for items in per_target(session, target_items) for item in items]
    plan.set("metrics", sum(items), items=items)


def _scaled(progress: ProgressFn, start: float, stop: float, prefix: str = "") -> ProgressFn:
    def report(fraction: float, message: str = "") -> None:
        text = f"{prefix}: {message}" if prefix and message else (prefix or message)
        progress(start + (stop - start) * min(max(float(fraction), 0.0), 1.0), text)

    return report


def _metrics(prepared: PreparedRun, explanation, session, peaks, folder: Path, progress: ProgressFn, cancel):
    """metrics.csv/json: the metrics module's report when metrics were asked for, with runtime,
    device and peak memory of each attribution merged in."""
    rows = basic_rows(explanation, peaks, str(session.device))
    if prepared.metrics != "none":
        from . import metrics as metrics_module

        if getattr(explanation, "multi_target", False):
            return _metrics_per_target(prepared, explanation, session, rows, folder, progress, cancel)
        report = metrics_module.evaluate(session, explanation, metrics=prepared.metrics,
                                         reference_mask=prepared.reference_mask,
                                         params=prepared.request.metric_params or None,
                                         progress=_scaled(progress, 0.0, 1.0, "metrics"), cancel=cancel)
        extra = {row["method"]: row for row in rows}
        for row in report.rows:
            for key, value in extra.get(row.get("method"), {}).items():
                row.setdefault(key, value)
        add_randomisation_checks(explanation, report.rows)
        report.write(folder)
        return report.rows
    write_metrics_tables(folder, rows)
    return rows


def _metrics_per_target(prepared: PreparedRun, explanation, session, rows, folder: Path, progress, cancel):
    """Several targets: the metrics of each target's maps with that target's score and region (the
    session switched to it), one row per target and method ("<target>/<method>", column `target`)."""
    from . import metrics as metrics_module
    from .results import TARGET_SEPARATOR

    extra = {row["method"]: row for row in rows}
    groups = explanation.by_target()
    out: List[Dict[str, Any]] = []
    curves: Dict[str, Dict[str, Any]] = {}
    saved = session.current_target
    try:
        for n, (target, results) in enumerate(groups.items()):
            session.select_target(target)
            a, b = n / len(groups), (n + 1) / len(groups)
            report = metrics_module.evaluate(session, results, metrics=prepared.metrics,
                                             reference_mask=prepared.reference_mask,
                                             params=prepared.request.metric_params or None,
                                             progress=_scaled(progress, a, b, f"metrics {target}"), cancel=cancel)
            for row in report.rows:
                key = f"{target}{TARGET_SEPARATOR}{row.get('method')}"
                row["target"], row["method"] = target, key
                for k, value in extra.get(key, {}).items():
                    row.setdefault(k, value)
                out.append(row)
            if any(report.curves.values()):
                curves[target] = report.curves
    finally:
        session.select_target(saved)
    write_metrics_tables(folder, out)
    write_target_curves(folder, curves)
    return out


def write_target_curves(folder: Path, curves: Dict[str, Dict[str, Any]]) -> None:
    """Several targets' deletion/insertion curves: curves.json keyed by target ({target: {method:
    {"deletion": ..., "insertion": ...}}}) and one figure per target, deletion_insertion/<target>.png
    (each target's curves are of its own score, so they are not drawn on one axis)."""
    if not curves:
        return
    from .metrics.report import MetricsReport, clean_json

    with open(folder / "curves.json", "w") as handle:
        json.dump(clean_json(curves), handle)
    (folder / TARGET_PLOTS).mkdir(exist_ok=True)
    for target, by_method in curves.items():
        MetricsReport(curves=by_method).plot(folder / TARGET_PLOTS / f"{target}.png", title=target)


def write_metrics_tables(folder: Path, rows: List[Dict[str, Any]]) -> None:
    """metrics.csv and metrics.json (same layout as the metrics module's report) without metrics."""
    from .provenance import write_json

    columns = list(BASIC_COLUMNS) + sorted({k for row in rows for k in row} - set(BASIC_COLUMNS))
    write_json(folder / "metrics.json", {"columns": columns, "rows": rows})
    with open(folder / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None or row.get(k) != row.get(k) else row.get(k))
                             for k in columns})


# ---------------------------------------------------------------------------------- scene
def _scene(prepared: PreparedRun, explanation, folder: Path, rows, note, warn) -> Dict[str, Any]:
    """`esegeta.mrb` and `previews/` through the scene bridge (slicer-core) when it is installed.

    The maps, segmentation and tables are the result; the review scene is a convenience, so a
    missing slicer-core is a note and a scene that fails to build is a warning, not a lost run."""
    if not prepared.request.scene:
        return {"written": False, "note": "not requested (--no-scene)"}
    try:
        from .slicer import review
        from .slicer.slicer_env import slicer_module

        slicer_module()
    except (ImportError, EsegetaError) as exc:
        message = f"no Slicer scene or previews: {exc}"
        note(message)
        return {"written": False, "note": message}
    card = prepared.model.card
    names = {i: str(n) for i, n in enumerate(getattr(card, "classes", None) or [])}
    if getattr(card, "activation", "softmax") == "softmax":
        names.pop(0, None)  # softmax class 0 is the background: no segment for it
    volume_name = Path(str(prepared.request.volume)).name.split(".")[0] or "input"
    import dataclasses

    # model-level visualisations have no map on the input's grid: not in the review scene
    explanation = dataclasses.replace(explanation, results={k: r for k, r in explanation.results.items()
                                                            if not r.model_level})
    if not explanation.results:
        return {"written": False, "note": "no map of this input to review (model-level visualisations only)"}
    try:
        written = review.write_review(folder, prepared.image, explanation, rows,
                                     {"esegeta_run": "see run.json beside esegeta.mrb"},
                                     volume_name=volume_name,
                                     class_name=None if prepared.target.classes is not None else prepared.class_name,
                                     segment_names=names)
    except (KeyboardInterrupt, EsegetaCancelled):
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring
        for leftover in (folder / "esegeta.mrb", folder / "previews"):
            if leftover.is_dir():
                import shutil

                shutil.rmtree(leftover, ignore_errors=True)
            elif leftover.exists():
                leftover.unlink()
        message = f"the Slicer review scene could not be written ({type(exc).__name__}: {exc}); the maps are complete."
        warn(message)
        return {"written": False, "note": message}
    return {"written": True, "mrb": "esegeta.mrb",
            "previews": [Path(p).relative_to(folder).as_posix() for p in written.get("previews", [])],
            "notes": written.get("notes", [])}


# ---------------------------------------------------------------------------------- run.json
def _run_json(prepared: PreparedRun, explanation, command, argv, started, timings, rows, written, scene_record,
              extra_files: Optional[Dict[str, Dict[str, str]]] = None):
    from . import provenance

    request = prepared.request
    inputs = [provenance.file_record(path, role) for role, path in prepared.inputs]
    card = prepared.model.card
    parameters = {
        "volume": str(Path(request.volume).resolve()),
        "model": "bundled default model" if is_bundled_model(request.model) else str(Path(request.model).resolve()),
        "methods": {name: next(r.params for key, r in explanation.results.items()
                               if key.rpartition("/")[2] == name) for name, _ in prepared.methods_run},
        "methods_given": {name: params for name, params in prepared.methods},
        "class_index": explanation.target.get("class_index", prepared.target.class_index),
        "class_name": explanation.target.get("class_name", prepared.class_name),
        "region": request.region, "classes": request.classes, "boundary_mm": request.boundary_mm,
        "device": request.device, "precision": request.precision,
        "patch_size": request.patch_size, "overlap": request.overlap, "batch_size": request.batch_size,
        "metrics": prepared.metrics, "seed": request.seed,
        "model_card": _card_record(card),
        "activation": request.activation, "fold": request.fold, "mirroring": request.mirroring,
        "model_description": prepared.model.description.to_dict() if hasattr(prepared.model, "description") else None,
    }
    return provenance.run_record(
        command=command, argv=argv, inputs=inputs, parameters=parameters,
        engine=explanation.engine, device=explanation.engine.get("device", prepared.device), timings=timings,
        started=started, target=explanation.target,
        input_geometry={"shape": list(prepared.image.array.shape), "ijk_to_ras": prepared.image.ijk_to_ras.tolist(),
                        "spacing": list(prepared.image.spacing), "format": prepared.image.format},
        results={name: {"file": written.get(name), "seconds": r.seconds, "diagnostics": r.diagnostics,
                        "checks": [c.as_dict() for c in r.checks],
                        "metadata": {k: r.metadata.get(k) for k in ("family", "signed", "approximation", "level",
                                                                    "explains_target")
                                     if k in (r.metadata or {})},
                        **({"files": (extra_files or {})[name]} if name in (extra_files or {}) else {})}
                 for name, r in explanation.results.items()},
        segmentation=written.get("segmentation"), warnings=prepared.warnings,
        scene=scene_record,
    )


def _card_record(card) -> Dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    if is_dataclass(card):
        return {k: v for k, v in asdict(card).items() if not k.startswith("_")}
    if isinstance(card, dict):
        return dict(card)
    return {k: v for k, v in vars(card).items() if not k.startswith("_")} if hasattr(card, "__dict__") else {}
