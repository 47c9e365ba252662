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


def protection_constraints() -> str:
    """A pip constraints file's text pinning Slicer's own packages to their installed versions, so
    that installing captum & co. can never replace them (pip refuses instead)."""
    pins = []
    for name in PROTECTED_PACKAGES:
        version = installed_version(name)
        if version is not None:
            pins.append(f"{name}=={version}")
    return "\n".join(pins) + "\n"


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
                "Slicer's Python. Slicer's own numpy, SimpleITK and requests are kept as they are.\n\n"
                "Install them now?")


def dependency_plan(requirements: Sequence[str], minimum_torch: str = MINIMUM_TORCH) -> DependencyPlan:
    import importlib

    importlib.invalidate_caches()  # see packages that pip has just installed into this process's paths
    return DependencyPlan(torch_needed=not torch_satisfied(minimum_torch),
                          torch_requirement=f">={minimum_torch}",
                          pip_missing=missing_requirements(requirements))


# ------------------------------------------------------------------------------------ method panel


def method_catalog() -> List[Dict[str, Any]]:
    """Every registered method's metadata (JSON-ready), cheapest first within each family.
    Imports torch and the methods: call only once the dependencies are present."""
    from ..methods import all_methods

    order = {"gradient": 0, "layer": 1, "perturbation": 2}
    specs = sorted(all_methods(), key=lambda s: (order.get(s.family, 9), s.cost, s.name))
    return [spec.metadata() for spec in specs]


def catalog_available() -> bool:
    """Whether the method registry can be loaded here (torch and captum importable)."""
    try:
        method_catalog()
    except Exception:  # ImportError, or a broken torch install (e.g. a DLL that fails to load)
        return False
    return True


def metric_names() -> List[str]:
    """Metrics `EsegetaLib.metrics` computes, the cheap default ones first; none before the
    dependencies are installed (it imports torch)."""
    try:
        from ..metrics import DEFAULT_METRICS, METRICS
    except ImportError:
        return []
    return list(DEFAULT_METRICS) + [name for name in METRICS if name not in DEFAULT_METRICS]


def method_tooltip(meta: Dict[str, Any]) -> str:
    lines = [meta.get("description") or meta["name"]]
    facts = [meta["family"], "signed" if meta.get("signed") else "unsigned", f"cost ~{meta.get('cost', 1):g}x"]
    if meta.get("captum"):
        facts.append(f"Captum {meta['captum']}")
    lines.append(", ".join(facts))
    if meta.get("approximation"):
        lines.append("Approximation on patches: " + meta["approximation"])
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
    if settings.region not in REGIONS:
        raise EsegetaError(f"Region must be one of {', '.join(REGIONS)}; got '{settings.region}'.")
    if settings.class_index < 0:
        raise EsegetaError("Target class must be 0 or more.")
    if settings.n_classes is not None and settings.class_index >= settings.n_classes:
        raise EsegetaError(f"The model has {settings.n_classes} classes (0-{settings.n_classes - 1}); "
                           f"choose a target class below {settings.n_classes}.")
    if settings.region == "roi" and not settings.has_roi:
        raise EsegetaError("Region 'roi' needs a segmentation and a segment: choose them under Region.")
    if settings.region == "point" and not settings.has_point:
        raise EsegetaError("Region 'point' needs a markup point on the volume: place one and choose it.")
    if settings.device not in DEVICE_CHOICES:
        raise EsegetaError(f"Device must be one of {', '.join(DEVICE_CHOICES)}; got '{settings.device}'.")
    if settings.precision not in PRECISIONS:
        raise EsegetaError(f"Precision must be one of {', '.join(PRECISIONS)}; got '{settings.precision}'.")
    if settings.patch_size < 0 or 0 < settings.patch_size < 16:
        raise EsegetaError("Patch size must be 0 (the model's own) or at least 16 voxels.")
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
            "class_index": int(settings.class_index), "region": settings.region,
            "device": DEVICE_CHOICES[settings.device], "precision": settings.precision,
            "patch_size": int(settings.patch_size) or None, "overlap": float(settings.overlap),
            "metrics": list(settings.metrics) or "none"}


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
    return FailureView(message, str(event.get("details") or ""))
