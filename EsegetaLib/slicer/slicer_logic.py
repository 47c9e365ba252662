"""The decisions of the Slicer module, without Qt or the Slicer application (tested with plain Python).

The module's widget only shows what these functions return and passes back what the user chose:
- which Python packages are missing, what one confirmation says, how Slicer's own packages are
  protected while installing (`DependencyPlan`);
- the method checklist and each method's parameter editor, generated from the method registry's
  metadata (`method_catalog`, `param_editor`), so no method or default is written twice;
- the panel's settings turned into the CLI's request (`runner.ExplainRequest` fields), with one-line
  errors for what the user must fix (`request_fields`), and what a model card says (`model_card_summary`);
- progress lines and errors turned into what the panel shows (`progress_view`, `failure_view`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ..errors import EsegetaError
from ..options import PRECISIONS, REGIONS, is_bundled_model

# ------------------------------------------------------------------------------------ dependencies

MINIMUM_TORCH = "2.1"
# Provided by Slicer (numpy, SimpleITK, requests) or by the PyTorch extension (torch): never installed
# or upgraded with pip from this module; pinned to the installed versions while installing others.
PROTECTED_PACKAGES = ("numpy", "SimpleITK", "requests", "torch")
# Their `slicer` package would shadow Slicer's own: never installed into the application.
FORBIDDEN_PACKAGES = ("slicer-core", "trame-slicer", "trame-slicer-core", "slicer")
REQUIREMENTS_FILE = "requirements.txt"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class _NameOnly:
    """A requirement read without the `packaging` library (absent from some Slicer versions until
    installed): the name only, satisfied by any installed version."""

    def __init__(self, line: str):
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if not match:
            raise EsegetaError(f"'{line}' is not a requirement.")
        self.name, self.specifier, self.marker = match.group(1), None, None


def _requirement(line: str):
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return _NameOnly(line)
    return Requirement(line)


def load_requirements(path) -> List[str]:
    """Requirement lines of a requirements.txt (comments, blank lines and pip options skipped);
    a forbidden or protected package in it is a packaging mistake and raises."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name = _canonical(_requirement(line).name)
        if name in {_canonical(n) for n in FORBIDDEN_PACKAGES + PROTECTED_PACKAGES}:
            raise EsegetaError(f"{path}: '{line}' must not be installed into Slicer; remove it.")
        lines.append(line)
    return lines


def installed_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def missing_requirements(requirements: Iterable[str]) -> List[str]:
    """The requirements not satisfied by what is installed (absent, or a version outside the range)."""
    missing = []
    for line in requirements:
        requirement = _requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        version = installed_version(requirement.name)
        if version is None or (requirement.specifier and not requirement.specifier.contains(version, prereleases=True)):
            missing.append(line)
    return missing


def torch_satisfied(minimum: str = MINIMUM_TORCH) -> bool:
    version = installed_version("torch")
    if version is None:
        return False
    return _release(version) >= _release(minimum)


def _release(version: str) -> Tuple[int, ...]:
    """(2, 13, 0) from '2.13.0+cu128' / '2.1': enough to compare torch releases."""
    numbers = re.findall(r"\d+", version.split("+")[0])[:3]
    return tuple(int(n) for n in numbers) + (0,) * (3 - len(numbers))


def protection_constraints(to_install: Iterable[str] = ()) -> str:
    """A pip constraints file's text pinning every distribution installed in this Python (Slicer
    bundles numpy, scipy, SimpleITK, pillow, pydicom, requests, ... and the PyTorch extension torch)
    to its installed version, so that installing captum & co. can never replace one (pip refuses
    instead). `to_install`: requirement lines being installed now; those names are not pinned."""
    skip = {_canonical(_requirement(line).name) for line in to_install}
    pins = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if not name or _canonical(name) in skip or not dist.version:
            continue
        pins[_canonical(name)] = f"{name}=={dist.version}"
    for name in PROTECTED_PACKAGES:  # always, even if metadata listing missed them
        version = installed_version(name)
        if version is not None:
            pins[_canonical(name)] = f"{name}=={version}"
    return "\n".join(pins[key] for key in sorted(pins)) + "\n"


@dataclass
class DependencyPlan:
    """What must be installed before the first run, and the one question to ask about it."""

    torch_needed: bool
    torch_requirement: str
    pip_missing: List[str] = field(default_factory=list)

    @property
    def nothing_to_do(self) -> bool:
        return not self.torch_needed and not self.pip_missing

    def confirmation(self) -> str:
        """The single confirmation text, listing everything that will be installed."""
        items = []
        if self.torch_needed:
            items.append(f"PyTorch {self.torch_requirement} (through the PyTorch extension; it picks the "
                         "build for your GPU, or CPU)")
        items.extend(self.pip_missing)
        listing = "\n".join(f"  - {item}" for item in items)
        return ("Esegeta needs these Python packages, which are not installed yet:\n\n" + listing +
                "\n\nThey are downloaded from the internet (PyTorch can be several GB) and installed into "
                "Slicer's Python. Every package Slicer already has (numpy, SimpleITK, scipy, ...) is kept as it is.\n\n"
                "Install them now?")


def dependency_plan(requirements: Sequence[str], minimum_torch: str = MINIMUM_TORCH) -> DependencyPlan:
    import importlib

    importlib.invalidate_caches()  # see packages that pip has just installed into this process's paths
    return DependencyPlan(torch_needed=not torch_satisfied(minimum_torch),
                          torch_requirement=f">={minimum_torch}",
                          pip_missing=missing_requirements(requirements))


# ------------------------------------------------------------------------------------ method panel


# The panel's method list and metric names, generated from the registries by
# `python -m EsegetaLib.slicer.slicer_logic --write-catalog` and checked against them by the tests
# (Testing/slicer_module/test_panel_logic.py): opening the panel must not import torch (2 s or more,
# a broken CUDA build could take Slicer down, and on Windows it locks torch's files).
CATALOG_FILE = Path(__file__).resolve().parents[1] / "resources" / "method_catalog.json"


def registry_catalog() -> Dict[str, Any]:
    """{"methods": [metadata...], "metrics": [names...]} from the registries themselves (imports
    torch): methods cheapest first within each family, default metrics first."""
    from ..methods import all_methods
    from ..metrics import DEFAULT_METRICS, METRICS

    order = {"gradient": 0, "layer": 1, "perturbation": 2}
    specs = sorted(all_methods(), key=lambda s: (order.get(s.family, 9), s.cost, s.name))
    metrics = list(DEFAULT_METRICS) + [name for name in METRICS if name not in DEFAULT_METRICS]
    return json.loads(json.dumps({"methods": [spec.metadata() for spec in specs], "metrics": metrics}))


def write_catalog(path: Path = CATALOG_FILE) -> Path:
    path.write_text(json.dumps(registry_catalog(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def load_catalog(path: Path = CATALOG_FILE) -> Dict[str, Any]:
    """The checked-in catalogue (no torch); a missing or broken file is a packaging error."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EsegetaError(f"The method list {path} is missing or unreadable ({exc}); reinstall Esegeta.") from None
    return data


def method_catalog() -> List[Dict[str, Any]]:
    """Every registered method's metadata (JSON-ready), cheapest first within each family, read
    from the checked-in catalogue: no torch."""
    return load_catalog()["methods"]


def metric_names() -> List[str]:
    """Metrics `EsegetaLib.metrics` computes, the cheap default ones first (from the catalogue)."""
    return list(load_catalog()["metrics"])


# ------------------------------------------------------------------------------------ presets

# Plain-language one-liners for the panel (the registry's descriptions are for specialists).
PLAIN_TOOLTIPS = {
    "Saliency": "Which voxels would change the result most if they changed a little. Fast.",
    "InputXGradient": "Saliency weighted by the image itself: bright voxels that matter. Fast.",
    "IntegratedGradients": "How much each voxel adds to the result, compared with an empty image. "
                           "Slower, but the parts add up to the whole.",
    "GradCAM": "Coarse regions the network's deep layers focus on. Fast, blurry.",
    "GradCAM++": "Like Grad-CAM, better when several separate structures matter. Fast, blurry.",
    "SmoothGrad": "Saliency averaged over slightly noisy copies: less speckle. Slower.",
    "SmoothGradSquared": "Squared SmoothGrad: strongest voxels stand out more. Slower.",
    "VarGrad": "Where saliency is unstable under noise. Slower.",
    "Occlusion": "Covers the image cube by cube and measures how much the result drops. Slow, easy to read.",
    "DeepLift": "How much each voxel adds compared with an empty image, in one pass. Fast.",
    "DeepLiftShap": "DeepLift averaged over several reference images. Moderate.",
    "GradientShap": "Expected contributions over random reference images. Slower.",
    "GuidedBackprop": "Sharp edges the network responds to (not always specific to the result). Fast.",
    "Deconvolution": "Patterns that excite the network (not specific to the result). Fast.",
    "GuidedGradCam": "Grad-CAM regions sharpened with guided backpropagation. Fast.",
    "LayerActivation": "What a deep layer of the network responds to, shown on the image. Fast.",
    "LayerGradientXActivation": "A deep layer's response weighted by its effect on the result. Fast.",
    "LayerDeepLift": "DeepLift measured at a deep layer. Fast.",
    "LayerGradientShap": "Expected contributions measured at a deep layer. Slower.",
    "InternalInfluence": "Influence of a deep layer along the path from an empty image. Slower.",
    "LayerConductance": "How much a deep layer passes on to the result. Slower.",
    "LayerIntegratedGradients": "Integrated Gradients measured at a deep layer. Slower.",
    "FeatureAblation": "Removes image blocks one at a time and measures the drop. Slow.",
    "ShapleyValueSampling": "Fair share of each image block in the result (game theory). Very slow.",
    "KernelShap": "Fits a simple model of the network on random blocks (Shapley weights). Very slow.",
    "Lime": "Fits a simple model of the network on random blocks. Very slow.",
    "RISE": "Averages random smooth masks weighted by the result they give. Slow.",
    "ScoreCAM": "Shows the image through each deep-layer pattern and weights it by the result. Slow.",
    "ExcitationBackprop": "Where the evidence for the result flows from, top-down (ReLU networks only). Fast.",
    "ContrastiveExcitationBackprop": "Evidence for this class rather than the others (ReLU networks only). Fast.",
    "LRP": "Shares the result out among the voxels, layer by layer (relevance propagation). Fast.",
    "FeatureVisualization": "A made-up volume showing what one deep-layer channel looks for: the network in "
                            "general, not this image. Moderate.",
    "TopActivatingWindows": "Boxes where one deep-layer channel fires most on this image, as ROIs. Fast.",
}

# Ordered presets shown first in the panel; "Custom" is the full list in families.
PRESETS = {
    "Quick look": ("Saliency", "IntegratedGradients", "GradCAM"),
    "Thorough": ("Saliency", "IntegratedGradients", "GradCAM", "SmoothGrad", "Occlusion", "DeepLift"),
    "Custom": (),
}
PRESET_TOOLTIPS = {
    "Quick look": "Three complementary maps in a few minutes on a CPU: fine detail, contributions, regions.",
    "Thorough": "Adds noise-averaged, occlusion and reference-based maps; slower (tens of minutes on a CPU).",
    "Custom": "Choose any of the methods yourself, grouped by family.",
}
FAMILY_TITLES = {"gradient": "Gradients (fast)", "layer": "Deep layers (fast, coarse)",
                 "perturbation": "Perturbation (slow)"}


def preset_methods(preset: str, catalog: Sequence[Dict[str, Any]]) -> List[str]:
    """The methods a preset ticks (only those in `catalog`); Custom: none (the user's ticks stay)."""
    if preset not in PRESETS:
        raise EsegetaError(f"Unknown preset '{preset}'; choose one of {', '.join(PRESETS)}.")
    names = {m["name"] for m in catalog}
    return [name for name in PRESETS[preset] if name in names]


def preset_for(methods: Sequence[str]) -> str:
    """The preset whose methods are exactly `methods` (in any order), else "Custom"."""
    for preset, names in PRESETS.items():
        if names and sorted(names) == sorted(methods):
            return preset
    return "Custom"


def method_families(catalog: Sequence[Dict[str, Any]]) -> List[Tuple[str, List[Dict[str, Any]]]]:
    """[(family title, [method metadata...])] in the catalogue's order, for the Custom list."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for meta in catalog:
        groups.setdefault(meta["family"], []).append(meta)
    return [(FAMILY_TITLES.get(family, family.capitalize()), items) for family, items in groups.items()]


# ------------------------------------------------------------------------------------ regions

@dataclass(frozen=True)
class RegionChoice:
    """One entry of the panel's region menu: what the user reads, the request's region word, which
    scene input it needs ('segment', 'point' or None), and `classes` ('all': one map per class).
    `value` is the menu's key (the parameter node's `region`): the region word, or
    '<region>+classes:<classes>' for an entry that also sets the classes."""

    label: str
    region: str
    needs: Optional[str] = None
    tooltip: str = ""
    classes: Optional[str] = None

    @property
    def value(self) -> str:
        return self.region if self.classes is None else f"{self.region}+classes:{self.classes}"


REGION_CHOICES: Tuple[RegionChoice, ...] = (
    RegionChoice("the model's segmentation", "predicted", None,
                 "Explain the voxels the model assigns to the chosen class."),
    RegionChoice("a segment", "roi", "segment", "Explain one segment you drew (Segment Editor) or loaded."),
    RegionChoice("a point", "point", "point", "Explain the model's result at one point you place."),
    RegionChoice("the whole volume", "whole", None, "Explain the class score summed over every voxel."),
    RegionChoice("this vessel (click)", "component", "point",
                 "Explain the connected vessel of the model's segmentation that contains the point you place "
                 "(\"why is this branch vessel?\")."),
    RegionChoice("the vessel wall", "boundary", None,
                 "Explain where the model put the wall: the class score just inside the segmentation's "
                 "boundary minus just outside it (one voxel each side)."),
    RegionChoice("every class", "predicted", None,
                 "One map per class the model predicts (each class's own segmentation), in one batched run.",
                 classes="all"),
)


def region_choice(region: str) -> RegionChoice:
    """The menu entry whose `value` (or, for older scenes, region word) is `region`."""
    for choice in REGION_CHOICES:
        if choice.value == region:
            return choice
    raise EsegetaError(f"Region must be one of: {', '.join(c.label for c in REGION_CHOICES)}.")


def class_choices(summary: Dict[str, Any], n_default: int = 2) -> List[Tuple[int, str]]:
    """(index, text) for the target-class menu: the model card's class names ("1: vessel"), or
    numbered classes when the model has no card. Softmax class 0 (background) is listed last."""
    classes = summary.get("classes")
    if classes:
        items = [(i, f"{c} ({i})") for i, c in enumerate(classes)]
    else:
        items = [(i, f"class {i}") for i in range(max(2, n_default))]
    return items[1:] + items[:1]


# Patch sizes the panel offers (0: the model's own). Window sizes must be divisible by the
# network's downsampling (16 for the usual 4-level U-Nets); these are, and cover 32-256 voxels.
PATCH_SIZE_CHOICES = (0, 32, 48, 64, 96, 128, 160, 192, 256)


def patch_size_label(size: int) -> str:
    return "the model's own" if size == 0 else f"{size} voxels"

def method_tooltip(meta: Dict[str, Any]) -> str:
    """Plain-language line first, then the specialist's facts."""
    lines = [PLAIN_TOOLTIPS.get(meta["name"], ""), meta.get("description") or meta["name"]]
    lines = [line for line in lines if line]
    facts = [meta["family"], "signed" if meta.get("signed") else "unsigned", f"cost ~{meta.get('cost', 1):g}x"]
    if meta.get("captum"):
        facts.append(f"Captum {meta['captum']}")
    lines.append(", ".join(facts))
    if meta.get("approximation"):
        lines.append("Approximation on patches: " + meta["approximation"])
    if meta.get("level") == "model":
        lines.append("Model-level: a visualisation of the network, not an explanation of this image (no map; "
                     "a volume of its own and ROIs are added to the scene).")
    elif meta.get("explains_target") is False:
        lines.append("Activation-based: where a layer responds on this image, not what the result depends on.")
    return "\n".join(lines)


def _decimals(value: Optional[float]) -> int:
    if value is None or value == 0:
        return 3
    text = f"{abs(value):.10f}".rstrip("0")
    return min(6, max(2, len(text.split(".")[1]) if "." in text else 2))


def param_editor(param: Dict[str, Any]) -> Dict[str, Any]:
    """How to edit one parameter (from `MethodSpec.metadata()['params']`): a Qt widget class name
    and its settings.  int -> QSpinBox, float -> QDoubleSpinBox, bool -> QCheckBox,
    choice -> QComboBox, str (and a value with no default) -> QLineEdit."""
    kind, default = param["kind"], param.get("default")
    editor: Dict[str, Any] = {"name": param["name"], "label": param["name"].replace("_", " "),
                              "tooltip": param.get("help", ""), "value": default, "kind": kind}
    lower, upper = param.get("min"), param.get("max")
    if kind == "int" and default is not None:
        editor.update(widget="QSpinBox", minimum=int(lower) if lower is not None else -(2 ** 31),
                      maximum=int(upper) if upper is not None else 2 ** 31 - 1)
    elif kind == "float" and default is not None:
        decimals = max(_decimals(default), _decimals(lower))
        editor.update(widget="QDoubleSpinBox", decimals=decimals,
                      minimum=float(lower) if lower is not None else -1e9,
                      maximum=float(upper) if upper is not None else 1e9,
                      step=_step(float(default)))
    elif kind == "bool":
        editor.update(widget="QCheckBox", value=bool(default))
    elif kind == "choice":
        editor.update(widget="QComboBox", choices=[str(c) for c in (param.get("choices") or [])],
                      value=str(default))
    else:  # str, or a number whose default is "automatic" (None): typed as text, empty = default
        editor.update(widget="QLineEdit", value="" if default is None else str(default))
    return editor


def _step(default: float) -> float:
    if default == 0:
        return 0.01
    magnitude = 10 ** int(f"{abs(default):e}".split("e")[1])
    return float(magnitude) / 10 if magnitude >= 1 else float(magnitude)


def edited_params(method: Dict[str, Any], values: Dict[str, Any]) -> Dict[str, Any]:
    """The parameters to pass for one method: only values that differ from the defaults (so the
    engine's relative defaults still apply), text fields parsed, empty text meaning the default."""
    defaults = {p["name"]: p for p in method["params"]}
    chosen = {}
    for name, value in values.items():
        if name not in defaults:
            continue  # a parameter from an older version of the method: dropped
        param = defaults[name]
        if isinstance(value, str) and param["kind"] != "str" and param["kind"] != "choice":
            text = value.strip()
            if not text:
                continue
            value = _parse_text(text)
        if param["kind"] == "choice":
            value = _match_choice(value, param.get("choices") or [])
        if value != param.get("default"):
            chosen[name] = value
    return chosen


def _parse_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _match_choice(value: Any, choices: Sequence[Any]) -> Any:
    for choice in choices:
        if str(choice) == str(value):
            return choice
    return value


# ------------------------------------------------------------------------------------ job settings

DEVICE_CHOICES = {"auto": "auto", "CPU": "cpu", "GPU": "cuda"}
# auto: the model's own (one output channel: sigmoid); the override of `esegeta explain --activation`.
ACTIVATION_CHOICES = ("auto", "softmax", "sigmoid")
# The model file picker (folders, nnU-Net results and MONAI bundles, have their own button).
MODEL_FILE_FILTER = "Models (*.pt *.ts *.pt2 *.json *.zip);;All files (*)"


@dataclass
class PanelSettings:
    """What the panel holds (mirrors the parameter node), in plain Python."""

    methods: List[str]
    method_params: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    model_path: str = ""  # empty: the bundled default model
    class_index: int = 1
    region: str = "predicted"
    has_roi: bool = False
    has_point: bool = False
    device: str = "auto"
    precision: str = "auto"
    patch_size: int = 0  # 0 = the model card's, else automatic
    overlap: float = 0.25
    metrics: List[str] = field(default_factory=list)
    n_classes: Optional[int] = None
    activation: str = "auto"  # auto (the model's; one output channel: sigmoid) | softmax | sigmoid
    fold: str = ""  # nnU-Net folders: a fold number or "all"; empty: every fold, ensembled


def request_fields(settings: PanelSettings, catalog: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Check the panel's settings and turn them into `runner.ExplainRequest` fields (the CLI's
    request; the volume and the roi/point details are filled in by `SceneRun`). Raises a one-line
    `EsegetaError` that names the control to change."""
    if not settings.methods:
        raise EsegetaError("Tick at least one method under 'Methods', then Apply.")
    by_name = {m["name"]: m for m in (catalog or [])}
    params: Dict[str, Dict[str, Any]] = {}
    for name in settings.methods:
        meta = by_name.get(name)
        if catalog is not None and meta is None:
            raise EsegetaError(f"Method '{name}' is not available in this version; untick it.")
        given = settings.method_params.get(name, {})
        chosen = edited_params(meta, given) if meta is not None else dict(given)
        if chosen:
            params[name] = chosen
    choice = region_choice(settings.region)  # one of the panel's choices, or a one-line error
    if settings.class_index < 0:
        raise EsegetaError("Target class must be 0 or more.")
    if settings.n_classes is not None and settings.class_index >= settings.n_classes:
        raise EsegetaError(f"The model has {settings.n_classes} classes (0-{settings.n_classes - 1}); "
                           f"choose a target class below {settings.n_classes}.")
    if settings.region == "roi" and not settings.has_roi:
        raise EsegetaError("'Explain' is 'a segment': choose the segmentation and the segment under it.")
    if choice.needs == "point" and not settings.has_point:
        raise EsegetaError(f"'Explain' is '{choice.label}': place a point on the volume with the point button "
                           "beside it.")
    if settings.device not in DEVICE_CHOICES:
        raise EsegetaError(f"Device must be one of {', '.join(DEVICE_CHOICES)}; got '{settings.device}'.")
    if settings.precision not in PRECISIONS:
        raise EsegetaError(f"Precision must be one of {', '.join(PRECISIONS)}; got '{settings.precision}'.")
    if settings.patch_size not in PATCH_SIZE_CHOICES:
        raise EsegetaError(f"'Patch size' must be one of the listed sizes; got {settings.patch_size}.")
    if not 0.0 <= settings.overlap < 1.0:
        raise EsegetaError("Overlap must be at least 0 and below 1.")
    if settings.activation not in ("auto", "softmax", "sigmoid"):
        raise EsegetaError(f"Activation must be auto, softmax or sigmoid; got '{settings.activation}'.")
    model = None if is_bundled_model(settings.model_path.strip() or None) else settings.model_path.strip()
    if model is not None and not Path(model).exists():
        raise EsegetaError(f"Model '{model}' does not exist; choose a .pt/.pt2/.json model, an nnU-Net folder or "
                           "a MONAI bundle, or clear the field to use the bundled one.")
    if model is not None and (Path(model).is_dir() or model.lower().endswith(".zip")):
        from ..model_formats import model_format

        kind = model_format(model)  # one line saying what was looked for
    else:
        kind = None
    fold = settings.fold.strip() or None
    if fold is not None and kind != "nnunet":
        raise EsegetaError("Fold applies to nnU-Net trained-model folders only; clear it for this model.")
    if fold is not None and not (fold.isdigit() or fold.lower() == "all"):
        raise EsegetaError(f"Fold must be a fold number or 'all'; got '{fold}'.")
    return {"model": model, "methods": list(settings.methods), "params": params,
            "activation": None if settings.activation == "auto" else settings.activation, "fold": fold,
            "class_index": int(settings.class_index), "region": choice.region, "classes": choice.classes,
            "device": DEVICE_CHOICES[settings.device], "precision": settings.precision,
            "patch_size": int(settings.patch_size) or None, "overlap": float(settings.overlap),
            "metrics": list(settings.metrics) or "none"}


def panel_settings(pn, scene_folder: Optional[str] = None) -> PanelSettings:
    """The panel's settings from its parameter node (any object with the node's fields: the
    `EsegetaParameterNode`, or a namespace in tests); the model path resolved against the scene."""
    model = resolved_model_path(pn.modelPath, getattr(pn, "modelPathRelative", ""), scene_folder)
    classes = model_card_summary(model).get("classes")
    point = pn.regionPoint
    return PanelSettings(
        methods=split_names(pn.methods), method_params=load_params_json(pn.methodParams), model_path=model,
        class_index=int(pn.targetClass), region=pn.region, has_roi=pn.roiSegmentation is not None,
        has_point=point is not None and point.GetNumberOfControlPoints() > 0, device=pn.device,
        precision=pn.precision, patch_size=int(pn.patchSize), overlap=float(pn.overlap),
        metrics=split_names(pn.metrics), n_classes=len(classes) if classes else None,
        activation=getattr(pn, "activation", "auto"), fold=getattr(pn, "fold", ""))  # advanced, where present


def class_name(settings: PanelSettings) -> Optional[str]:
    """The chosen class's name from the model card, or None (the engine then names it: with "every
    class", the run's record lists each class, so no single name is given)."""
    if region_choice(settings.region).classes is not None:
        return None
    classes = model_card_summary(settings.model_path).get("classes")
    return str(classes[settings.class_index]) if classes and 0 <= settings.class_index < len(classes) else None


def model_card_summary(path: str) -> Dict[str, Any]:
    """What the panel says about a model file before loading it (no torch needed): name, classes,
    description, patch size; a TorchScript/export file has no card."""
    text_path = str(path or "").strip()
    if not text_path or is_bundled_model(text_path):
        return {"name": "bundled vessel model", "classes": None, "text": "The bundled model (synthetic TOF-MRA vessels)."}
    file = Path(text_path)
    if file.is_dir():
        from ..model_formats import folder_summary

        return folder_summary(str(file)) or {"name": file.name, "classes": None,
                                             "text": f"{file.name} is neither an nnU-Net folder nor a MONAI bundle."}
    if file.suffix.lower() == ".zip" and file.is_file():
        return {"name": file.name, "classes": None, "text": f"{file.name}: a MONAI bundle archive (read when run)."}
    if not file.is_file():
        return {"name": file.name, "classes": None, "text": f"'{file}' does not exist."}
    if file.suffix.lower() != ".json":
        return {"name": file.name, "classes": None,
                "text": f"{file.name}: a bare network file (no model card: no class names, no normalisation)."}
    try:
        card = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {"name": file.name, "classes": None, "text": f"{file.name} is not a readable model card ({exc})."}
    classes = card.get("classes")
    parts = [str(card.get("name", file.stem))]
    if card.get("description"):
        parts.append(str(card["description"]))
    if classes:
        parts.append("Classes: " + ", ".join(f"{i} = {c}" for i, c in enumerate(classes)))
    if card.get("patch_size"):
        parts.append(f"Patch size: {card['patch_size']}")
    if card.get("normalization"):
        norm = card["normalization"]
        parts.append("Normalisation: " + (norm if isinstance(norm, str) else str(norm.get("type", norm))))
    return {"name": card.get("name", file.stem), "classes": classes, "text": "\n".join(parts)}


def split_names(text: str) -> List[str]:
    """A comma-separated list as stored in the parameter node (order kept, blanks and repeats dropped)."""
    names = []
    for item in (text or "").split(","):
        item = item.strip()
        if item and item not in names:
            names.append(item)
    return names


def join_names(names: Iterable[str]) -> str:
    return ",".join(split_names(",".join(names)))


def load_params_json(text: str) -> Dict[str, Dict[str, Any]]:
    """The per-method parameter values stored in the parameter node (JSON); bad text = none."""
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return {k: dict(v) for k, v in value.items() if isinstance(v, dict)} if isinstance(value, dict) else {}


# ------------------------------------------------------------------------------------ wording

# The engine speaks the command line's language (`--device cuda: ...`); the panel names its controls.
PANEL_CONTROLS = (
    ("--device cpu (or auto)", "'Device' CPU (or auto)"),
    ("--device cuda", "'Device' GPU"), ("--device cpu", "'Device' CPU"), ("--device", "'Device'"),
    ("--precision", "'Precision'"), ("--patch-size", "'Patch size'"), ("--overlap", "'Overlap'"),
    ("--batch-size", "'Batch size'"), ("--class", "'Class'"), ("--region", "'Explain'"),
    ("--methods", "'Methods'"), ("--metrics none", "no metrics"), ("--metrics", "'Metrics'"),
    ("--model", "'Model'"), ("--params", "the method's settings"),
)


def panel_wording(message: str) -> str:
    """A message from the engine or the command-line checks, with the panel's control names in
    place of command-line flags."""
    for flag, control in PANEL_CONTROLS:
        message = message.replace(flag, control)
    return message


def log_entries(events: Iterable[Dict[str, Any]]) -> List[Tuple[str, str]]:
    """(level, text) for Slicer's log and the panel's log view: every worker line, warnings as
    warnings; progress only when its message changes (a window counter is not news)."""
    entries, last = [], None
    for event in events:
        kind = event.get("event")
        if kind == "log":
            entries.append(("info", str(event.get("message", ""))))
        elif kind == "warning":
            entries.append(("warning", panel_wording(str(event.get("message", "")))))
        elif kind == "progress":
            text = str(event.get("message") or "")
            head = text.split(":", 1)[0]
            if text and head != last:
                entries.append(("info", text))
                last = head
        elif kind == "error":
            entries.append(("error", panel_wording(str(event.get("message", "")))))
        elif kind == "done":
            entries.append(("info", f"Finished in {float(event.get('seconds', 0)):.0f} s."))
    return entries


# ------------------------------------------------------------------------------------ platform

# Slicer releases the module is tested against: 5.10 and later ship Python 3.12 (5.8 ships 3.9,
# which captum 0.9 and this package's pins do not support).
MINIMUM_SLICER = (5, 10)


def slicer_version_problem(version: str) -> Optional[str]:
    """A one-line reason this Slicer cannot run Esegeta, or None."""
    release = _release(version)
    if release[:2] < MINIMUM_SLICER:
        return (f"Esegeta needs Slicer {MINIMUM_SLICER[0]}.{MINIMUM_SLICER[1]} or later (this is {version}); "
                "install a current Slicer release.")
    return None


def platform_problem(system: str, machine: str, numpy_version: Optional[str]) -> Optional[str]:
    """Intel macOS: the last PyTorch for x86_64 macOS (2.2) needs numpy < 2, which Slicer 5.10
    and later do not have; installing would leave a torch that fails at its first call."""
    if system == "Darwin" and machine in ("x86_64", "i386") and numpy_version and _release(numpy_version) >= (2, 0, 0):
        return ("PyTorch has no build for Intel Macs that works with this Slicer's numpy "
                f"{numpy_version}; run Esegeta on an Apple-silicon Mac, Linux or Windows, or use the "
                "'esegeta' command line in its own Python environment.")
    return None


# ------------------------------------------------------------------------------------ scene paths


def stored_model_path(path: str, scene_folder: Optional[str]) -> str:
    """The model path relative to the scene's folder, saved beside the absolute one when the scene
    is saved (so a scene folder moved with its model, e.g. to a colleague's machine, still finds
    it); empty when there is none (no path, no folder, another drive)."""
    import os

    text = str(path or "").strip()
    if not text or not scene_folder or not os.path.isabs(text):
        return ""
    try:
        relative = os.path.relpath(text, scene_folder)
    except ValueError:  # another drive (Windows)
        return ""
    return relative.replace(os.sep, "/")


def resolved_model_path(path: str, relative: str = "", scene_folder: Optional[str] = None) -> str:
    """The model to use: `path` (as chosen) when it exists, else the saved relative path taken
    from the scene's folder when that exists, else `path` (whose error then names it)."""
    import os

    text = str(path or "").strip()
    if not text or os.path.exists(text) or not relative or not scene_folder:
        return text
    candidate = os.path.normpath(os.path.join(scene_folder, relative))
    return candidate if os.path.exists(candidate) else text


# ------------------------------------------------------------------------------------ progress view


@dataclass
class ProgressView:
    percent: int
    text: str


def progress_view(event: Dict[str, Any], started_seconds: Optional[float] = None) -> ProgressView:
    """Progress bar value (0-100) and label for a worker `progress` event; the engine's message
    names the current method and window ("Saliency: window 3/8")."""
    fraction = min(1.0, max(0.0, float(event.get("fraction", 0.0))))
    text = str(event.get("message") or "Working")
    if started_seconds is not None and 0.02 < fraction < 1.0:
        remaining = started_seconds * (1.0 - fraction) / fraction
        text += f"  (about {_duration(remaining)} left)"
    return ProgressView(percent=int(round(100 * fraction)), text=text)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(1, int(round(seconds)))} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


@dataclass
class FailureView:
    message: str  # one line, shown in the dialog
    details: str  # the traceback/log, behind "Show details"
    cancelled: bool = False


def failure_view(event: Dict[str, Any]) -> FailureView:
    """What to show for a worker `error` event. Out-of-memory names the remedies."""
    kind = event.get("kind", "internal")
    message = str(event.get("message") or "The run failed.")
    if kind == "cancelled":
        return FailureView("Cancelled. Nothing was added to the scene.", "", cancelled=True)
    if kind == "memory" and not message.startswith("Out of memory"):
        from .worker import out_of_memory_message

        message = out_of_memory_message()
    elif kind == "internal":
        message = "Esegeta failed: " + message + " (see details; please report it with them)."
    return FailureView(panel_wording(message), str(event.get("details") or ""))


if __name__ == "__main__":  # python -m EsegetaLib.slicer.slicer_logic --write-catalog
    import sys

    if sys.argv[1:] != ["--write-catalog"]:
        sys.exit("usage: python -m EsegetaLib.slicer.slicer_logic --write-catalog")
    print(write_catalog())
