"""The study file: parse and validate a whole YAML study before any work starts.

Every problem is collected (file, key, what is wrong) and reported at once, so a user fixes a
study file in one round rather than one error per run.  The result, `StudySpec`, holds absolute
paths (globs expanded, relative paths resolved against the study file's folder) and the list of
cases, one per (volume, model), each with its own seed derived from the study seed.

    name: demo                       # optional; used in the report's title
    seed: 2026                       # the study seed; each case's seed is derived from it
    volumes:
      - path: data/a.nii.gz          # one file (name: the file name without extensions, or `name:`)
        mask: data/a_vessels.nii.gz  # optional ROI mask (target.region: roi)
      - glob: data/cohort/*.nii.gz   # many files; mask may be a template: masks/{name}_roi.nii.gz
      - glob: data/sub-*/tof.nii.gz  # same file name per folder: names from the differing parts (sub-01, ...)
        reference: "{dir}/vessels.nii.gz"   # ground-truth mask for vxap, pointing_game, relevance_mass, ...
      - data/b.nrrd                  # shorthand for path (or glob when it has * ? [)
    models:
      - name: default
        path: bundled                # the bundled default model
      - {name: small, path: models/small.pt}   # TorchScript, torch.export (.pt2) or model card (.json)
      - {name: nnunet, path: results/Dataset001_X/nnUNetTrainer__nnUNetPlans__3d_fullres, fold: 0}
      - {name: zoo, path: bundles/spleen_ct_segmentation}  # a MONAI bundle (folder or .zip)
      - {name: one-channel, path: models/vessels.pt2, activation: sigmoid}  # softmax | sigmoid override
    methods:
      - Saliency
      - {name: IntegratedGradients, params: {n_steps: 16}}
    target: {class: 1, region: predicted}      # predicted | whole | roi | point:I,J,K | component:I,J,K[:MM]
                                               # | components[:N] | boundary[:MM]; optional keys:
                                               # classes: all | [a, b] (one map per class), boundary: MM
    metrics: [infidelity, sparseness]          # or default | all | none
    metric_params: {sensitivity: {n_samples: 4}}   # optional, per metric (esegeta's metric defaults otherwise)
    engine: {device: auto, precision: auto, retries: 1}
"""
from __future__ import annotations

import difflib
import glob as globlib
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import EsegetaError
from ..options import is_bundled_model

MODEL_SUFFIXES = (".pt", ".pth", ".ts", ".pt2", ".json")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
TOP_KEYS = ("name", "description", "seed", "volumes", "models", "methods", "target", "metrics", "metric_params",
            "engine")
VOLUME_KEYS = ("path", "glob", "name", "mask", "reference")
MODEL_KEYS = ("name", "path", "activation", "fold")
METHOD_KEYS = ("name", "params")
TARGET_KEYS = ("class", "region", "classes", "boundary")
ENGINE_DEFAULTS: Dict[str, Any] = {
    "device": "auto", "precision": "auto", "patch_size": None, "overlap": 0.25, "batch_size": "auto",
    "retries": 1,           # extra attempts of a case after an unexpected error (not after bad input)
    "scene": False,         # esegeta.mrb + previews per case (slow; the study has its own figures)
    "gallery_cases": 3,     # cases shown in figures/gallery.png
    "cpus_per_task": 1,     # Ray: CPUs asked per case on a cluster without GPUs
    "gpus_per_task": 1,     # Ray: GPUs asked per case on a cluster with GPUs
    "stability": None,      # flips | noise:N[:F]: test-time augmentation per case (EsegetaLib/stability.py)
}


@dataclass
class StudyIssue:
    """One problem in the study file: where (file, key) and what is wrong."""

    file: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.message}"


class StudySpecError(EsegetaError):
    """A study file with problems; `issues` lists every one of them."""

    def __init__(self, issues: Sequence[StudyIssue]):
        self.issues = list(issues)
        noun = "problem" if len(self.issues) == 1 else "problems"
        super().__init__(f"the study file has {len(self.issues)} {noun}; nothing was run: "
                         + "; ".join(str(issue) for issue in self.issues))


@dataclass
class VolumeEntry:
    name: str
    path: str
    mask: Optional[str] = None
    reference: Optional[str] = None  # ground-truth / reference mask for localisation metrics


@dataclass
class ModelEntry:
    name: str
    path: Optional[str]  # None: the bundled default model
    classes: Optional[List[str]] = None  # from its model card, when it has one (for checking target.class)
    scripted: bool = False  # TorchScript: no layer hooks (GradCAM and other layer methods cannot run on it)
    activation: Optional[str] = None  # softmax | sigmoid override (None: the model's; one channel: sigmoid)
    fold: Optional[str] = None  # nnU-Net folders: a fold number or "all" (None: every fold, ensembled)


@dataclass
class MethodEntry:
    name: str  # the registered name (canonical spelling)
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Case:
    """One unit of work: a model on a volume, every method, written into `cases/<volume>/<model>/`."""

    volume: VolumeEntry
    model: ModelEntry
    seed: int

    @property
    def key(self) -> str:
        return f"{self.volume.name}/{self.model.name}"


@dataclass
class StudySpec:
    file: str
    name: str
    description: str
    seed: int
    volumes: List[VolumeEntry]
    models: List[ModelEntry]
    methods: List[MethodEntry]
    class_index: Optional[Union[int, str]]
    region: str
    metrics: Union[str, List[str]]
    engine: Dict[str, Any]
    metric_params: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    classes: Optional[Union[str, List[Union[int, str]]]] = None  # several targets: "all" or a list
    boundary_mm: Optional[float] = None  # a boundary band on the region

    @property
    def cases(self) -> List[Case]:
        return [Case(volume=v, model=m, seed=case_seed(self.seed, v.name, m.name))
                for v in self.volumes for m in self.models]

    def resolved(self) -> Dict[str, Any]:
        """The study as run (absolute paths, expanded globs, engine defaults filled, case seeds)."""
        record = {k: v for k, v in asdict(self).items()}
        record["cases"] = [{"volume": c.volume.name, "model": c.model.name, "seed": c.seed} for c in self.cases]
        return record


def case_seed(study_seed: int, volume: str, model: str) -> int:
    """A case's seed from the study seed and the case's names (not its position), so adding or
    reordering volumes and models never changes the seeds of the other cases."""
    digest = hashlib.sha256(json.dumps([int(study_seed), volume, model]).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def volume_name(path: Union[str, Path]) -> str:
    """File name without its image extensions: 'sub-01_tof.nii.gz' -> 'sub-01_tof'."""
    name = Path(path).name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


# ------------------------------------------------------------------------------------- loading
def load_study(path: Union[str, Path]) -> StudySpec:
    """Read and validate a study file; raise `StudySpecError` listing every problem."""
    import yaml

    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise StudySpecError([StudyIssue(where, "(file)", "does not exist or is not a file; check the path")])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise StudySpecError([StudyIssue(where, "(file)", f"is not valid YAML{at}: {problem}")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StudySpecError([StudyIssue(where, "(file)", f"cannot be read: {exc}")]) from None
    return validate_study(data, where, base=path.resolve().parent)


def validate_study(data: Any, where: str, base: Path) -> StudySpec:
    """Check a parsed study document; every problem is collected, then raised together."""
    issues: List[StudyIssue] = []

    def problem(key: str, message: str) -> None:
        issues.append(StudyIssue(where, key, message))

    if not isinstance(data, dict):
        raise StudySpecError([StudyIssue(where, "(file)", "must be a mapping with volumes, models and methods")])
    _unknown_keys(data, TOP_KEYS, "", problem)
    seed = _integer(data.get("seed", 0), "seed", problem, minimum=0)
    volumes = _volumes(data.get("volumes"), base, problem)
    models = _models(data.get("models"), base, problem)
    methods = _methods(data.get("methods"), problem)
    class_index, region = _target(data.get("target"), volumes, problem)
    classes, boundary_mm = _target_extras(data.get("target"), problem)
    _check_class(class_index, models, problem)
    _check_eager(methods, models, problem)
    metrics = _metrics(data.get("metrics", "default"), problem)
    metric_params = _metric_params(data.get("metric_params"), problem)
    engine = _engine(data.get("engine"), problem)
    name = data.get("name", Path(where).stem)
    if not isinstance(name, str):
        problem("name", f"must be text, got {name!r}")
    if issues:
        raise StudySpecError(issues)
    return StudySpec(file=str(Path(where).resolve()), name=str(name), description=str(data.get("description", "")),
                     seed=int(seed), volumes=volumes, models=models, methods=methods, class_index=class_index,
                     region=region, metrics=metrics, engine=engine, metric_params=metric_params,
                     classes=classes, boundary_mm=boundary_mm)


def _unknown_keys(mapping: dict, known: Sequence[str], prefix: str, problem) -> None:
    for key in mapping:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else f"; known keys: {', '.join(known)}"
            problem(f"{prefix}{key}", f"unknown key{extra}")


def _integer(value, key, problem, minimum=None) -> Optional[int]:
    if isinstance(value, bool) or not isinstance(value, int):
        problem(key, f"must be a whole number, got {value!r}")
        return None
    if minimum is not None and value < minimum:
        problem(key, f"must be at least {minimum}, got {value}")
        return None
    return value


def _list_of(value, key, problem, what) -> list:
    if value is None:
        problem(key, f"is missing; list the {what}")
        return []
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list) or not value:
        problem(key, f"must be a non-empty list of {what}")
        return []
    return value


def _resolve(base: Path, text: str) -> Path:
    path = Path(str(text)).expanduser()
    return path if path.is_absolute() else base / path


def _check_name(name: str, key: str, problem) -> bool:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        problem(key, f"name {name!r} must be letters, digits, '.', '_', '+' or '-' (it names a folder)")
        return False
    return True


def _volumes(value, base: Path, problem) -> List[VolumeEntry]:
    found: List[Tuple[str, VolumeEntry]] = []
    for i, entry in enumerate(_list_of(value, "volumes", problem, "volumes (path or glob)")):
        key = f"volumes[{i}]"
        if isinstance(entry, str):
            entry = {"glob" if any(c in entry for c in "*?[") else "path": entry}
        if not isinstance(entry, dict):
            problem(key, f"must be a path, a glob or a mapping with path/glob, name, mask; got {entry!r}")
            continue
        _unknown_keys(entry, VOLUME_KEYS, f"{key}.", problem)
        has_path, has_glob = "path" in entry, "glob" in entry
        if has_path == has_glob:
            problem(key, "give exactly one of 'path' or 'glob'")
            continue
        if has_glob and "name" in entry:
            problem(f"{key}.name", "a glob matches many files; names come from the file names")
        if has_path:
            path = _resolve(base, entry["path"])
            if not path.is_file():
                problem(f"{key}.path", f"'{entry['path']}' does not exist ({path}); check the path")
                continue
            paths = [path]
        else:
            pattern = str(_resolve(base, entry["glob"]))
            paths = [Path(p) for p in sorted(globlib.glob(pattern, recursive=True)) if Path(p).is_file()]
            if not paths:
                problem(f"{key}.glob", f"'{entry['glob']}' matches no file ({pattern})")
                continue
        names = [entry["name"]] if has_path and "name" in entry else distinct_names(paths)
        for path, name in zip(paths, names):
            if not _check_name(name, f"{key}.name" if "name" in entry else key, problem):
                continue
            files = {}
            for field_name in ("mask", "reference"):
                if entry.get(field_name) is None:
                    continue
                template = str(entry[field_name]).replace("{name}", name).replace("{dir}", str(path.parent))
                file_path = _resolve(base, template)
                if not file_path.is_file():
                    problem(f"{key}.{field_name}", f"{field_name} '{file_path}' for volume '{name}' does not exist")
                files[field_name] = str(file_path)
            found.append((key, VolumeEntry(name=name, path=str(path.resolve()), **files)))
    return _unique(found, "volume", problem)


def distinct_names(paths: Sequence[Path]) -> List[str]:
    """Volume names for the files of one glob: the file names without extensions when they differ;
    else the parts of the paths that differ (`sub-01/tof.nii.gz`, `sub-02/tof.nii.gz` -> `sub-01`,
    `sub-02`), joined by '_', with characters a folder name cannot hold replaced by '-'."""
    plain = [volume_name(p) for p in paths]
    if len(set(plain)) == len(plain):
        return plain
    parts = [list(Path(p).resolve().parent.parts) + [volume_name(p)] for p in paths]
    depth = min(len(x) for x in parts)
    head = 0
    while head < depth - 1 and len({x[head] for x in parts}) == 1:
        head += 1
    tail = 0
    while tail < depth - head - 1 and len({x[len(x) - 1 - tail] for x in parts}) == 1:
        tail += 1
    names = ["_".join(x[head:len(x) - tail]) for x in parts]
    return [re.sub(r"[^A-Za-z0-9._+-]", "-", n).lstrip("._+-") or n for n in names]


def _unique(found, what: str, problem) -> list:
    seen: Dict[str, str] = {}
    unique = []
    for key, item in found:
        if item.name in seen:
            problem(key, f"duplicate {what} name '{item.name}' (also {seen[item.name]}); give each a distinct name")
            continue
        seen[item.name] = key
        unique.append(item)
    return unique


def _models(value, base: Path, problem) -> List[ModelEntry]:
    found = []
    for i, entry in enumerate(_list_of(value, "models", problem, "models (name and path)")):
        key = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            problem(key, f"must be a mapping with name and path; got {entry!r}")
            continue
        _unknown_keys(entry, MODEL_KEYS, f"{key}.", problem)
        given = entry.get("path")
        if given is None:
            problem(f"{key}.path", "is missing: a model file (.pt, .ts, .pt2, model card .json) or 'bundled'")
            continue
        classes, scripted = None, False
        if is_bundled_model(given):
            path, default_name = None, "default"
            classes = _card_classes(None)
        else:
            resolved = _resolve(base, given)
            if not resolved.exists():
                problem(f"{key}.path", f"'{given}' does not exist ({resolved}); check the path")
                continue
            kind = _folder_or_zip_model(resolved, f"{key}.path", problem)
            if kind == "invalid":
                continue
            if kind is None and not str(resolved).lower().endswith(MODEL_SUFFIXES):
                problem(f"{key}.path", f"'{given}' is not a model file; use TorchScript (.pt, .ts), "
                        "torch.export (.pt2) or a model card (.json)")
                continue
            scripted = kind is None and _is_torchscript(resolved)
            if kind is None and str(resolved).lower().endswith(".json"):
                classes = _check_card(resolved, f"{key}.path", problem)
                scripted = _card_is_torchscript(resolved)
            path, default_name = str(resolved.resolve()), Path(str(given)).name.split(".")[0]
        activation, fold = entry.get("activation"), entry.get("fold")
        if activation is not None and activation not in ("softmax", "sigmoid"):
            problem(f"{key}.activation", f"must be softmax or sigmoid; got {activation!r}")
        if fold is not None and (path is None or _folder_or_zip_model(Path(path), key, problem) != "nnunet"):
            problem(f"{key}.fold", "applies to nnU-Net trained-model folders only")
        name = entry.get("name", default_name)
        if _check_name(name, f"{key}.name", problem):
            found.append((key, ModelEntry(name=name, path=path, classes=classes, scripted=scripted,
                                          activation=activation, fold=None if fold is None else str(fold))))
    return _unique(found, "model", problem)


def _folder_or_zip_model(path: Path, key: str, problem) -> Optional[str]:
    """'nnunet' | 'monai_bundle' for a folder or zip model, None for a model file, 'invalid' (with
    the problem reported) for a folder or zip that is neither. Reads file names only."""
    if not (path.is_dir() or str(path).lower().endswith(".zip")):
        return None
    from ..model_formats import model_format

    try:
        return model_format(path)
    except EsegetaError as exc:
        problem(key, str(exc))
        return "invalid"


def _check_card(path: Path, key: str, problem) -> Optional[List[str]]:
    """Read a model card now (cheap), so a broken card is reported with the rest; its classes."""
    from ..models import ModelCard

    try:
        card = ModelCard.read(path)
    except EsegetaError as exc:
        problem(key, str(exc))
        return None
    if card.weights and not (path.parent / card.weights).is_file():
        problem(key, f"model card names weights '{card.weights}', which do not exist beside it")
    return [str(c) for c in card.classes] if card.classes else None


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive (its zip holds code/ or constants.pkl), read without loading it."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _card_is_torchscript(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    weights = data.get("weights") if isinstance(data, dict) else None
    return data.get("architecture") == "torchscript" and bool(weights) and _is_torchscript(path.parent / weights)


def _check_eager(methods: List["MethodEntry"], models: List["ModelEntry"], problem) -> None:
    """Methods that hook layers cannot run on TorchScript models: say so now, not once per case."""
    from ..methods import get_method

    eager = [m.name for m in methods if getattr(get_method(m.name), "requires_eager", False)]
    for i, model in enumerate(models):
        if model.scripted and eager:
            problem("methods", f"{', '.join(eager)} cannot run on model '{model.name}', a TorchScript file (they "
                    "hook layers, which TorchScript hides); export it with torch.export (.pt2), give a model card "
                    "with the network's class, or drop these methods")


def _card_classes(path: Optional[Path]) -> Optional[List[str]]:
    from ..models import DEFAULT_CARD, ModelCard
    from ..sample import resource_path

    try:
        card = ModelCard.read(path or resource_path(DEFAULT_CARD))
    except (EsegetaError, OSError):
        return None
    return [str(c) for c in card.classes] if card.classes else None


def _check_class(class_index, models: List["ModelEntry"], problem) -> None:
    """target.class against each model's classes (where its card names them)."""
    if class_index is None or isinstance(class_index, bool):
        return
    for model in models:
        names = model.classes
        if isinstance(class_index, str) and not class_index.strip().lstrip("-").isdigit():
            if names is None:
                problem("target.class", f"'{class_index}' is a class name, but model '{model.name}' names no "
                        "classes (no model card); give the class index")
            elif class_index.lower() not in [n.lower() for n in names]:
                problem("target.class", f"'{class_index}' is not a class of model '{model.name}' "
                        f"({', '.join(f'{i}={n}' for i, n in enumerate(names))})")
        elif names is not None and int(class_index) >= len(names):
            problem("target.class", f"{class_index} is out of range for model '{model.name}' "
                    f"({', '.join(f'{i}={n}' for i, n in enumerate(names))})")


def _methods(value, problem) -> List[MethodEntry]:
    from ..methods import get_method

    found = []
    for i, entry in enumerate(_list_of(value, "methods", problem, "attribution methods")):
        key = f"methods[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or "name" not in entry:
            problem(key, f"must be a method name or a mapping with name and params; got {entry!r}")
            continue
        _unknown_keys(entry, METHOD_KEYS, f"{key}.", problem)
        try:
            spec = get_method(str(entry["name"]))
        except EsegetaError as exc:
            problem(f"{key}.name", str(exc))
            continue
        params = entry.get("params") or {}
        if not isinstance(params, dict):
            problem(f"{key}.params", f"must be a mapping of parameter: value; got {params!r}")
            continue
        try:
            spec.resolve_params(params)
        except EsegetaError as exc:
            problem(f"{key}.params", str(exc))
            continue
        found.append((key, MethodEntry(name=spec.name, params=dict(params))))
    return _unique(found, "method", problem)


def _target_extras(value, problem):
    """target.classes ('all' or a list of names/indices) and target.boundary (mm), both optional."""
    if not isinstance(value, dict):
        return None, None
    classes, boundary = value.get("classes"), value.get("boundary")
    if classes is not None:
        if isinstance(classes, str) and classes.strip().lower() == "all":
            classes = "all"
        elif not isinstance(classes, list) or not classes or not all(
                isinstance(c, (int, str)) and not isinstance(c, bool) for c in classes):
            problem("target.classes", f"must be 'all' or a list of class names or indices; got {classes!r}")
            classes = None
    if boundary is not None and (isinstance(boundary, bool) or not isinstance(boundary, (int, float)) or boundary <= 0):
        problem("target.boundary", f"must be a positive number of mm; got {boundary!r}")
        boundary = None
    return classes, (None if boundary is None else float(boundary))


def _target(value, volumes: List[VolumeEntry], problem) -> Tuple[Optional[Union[int, str]], str]:
    from ..runner import parse_region

    value = {} if value is None else value
    if not isinstance(value, dict):
        problem("target", f"must be a mapping with class and region; got {value!r}")
        return None, "predicted"
    _unknown_keys(value, TARGET_KEYS, "target.", problem)
    class_index = value.get("class")
    if class_index is not None and (isinstance(class_index, bool) or not isinstance(class_index, (int, str))):
        problem("target.class", f"must be a class index or a class name; got {class_index!r}")
    if isinstance(class_index, int) and not isinstance(class_index, bool) and class_index < 0:
        problem("target.class", f"must be 0 or more; got {class_index}")
    region = str(value.get("region", "predicted"))
    if region.lower() == "roi":
        missing = [v.name for v in volumes if v.mask is None]
        if missing:
            problem("target.region", f"'roi' needs a mask for every volume; none for {', '.join(missing)}")
        return class_index, "roi"
    try:
        parse_region(region)
    except EsegetaError as exc:
        problem("target.region", str(exc).replace("--region", "region"))
    if region.lower().startswith("roi:"):
        problem("target.region", "use region: roi and give each volume its 'mask'")
    return class_index, region


def _metrics(value, problem) -> Union[str, List[str]]:
    from ..metrics import parse_metrics

    if isinstance(value, str) and value.strip().lower() in ("default", "none", "all"):
        return value.strip().lower()
    try:
        names = parse_metrics(value)
    except EsegetaError as exc:
        problem("metrics", str(exc))
        return "none"
    except (AttributeError, TypeError):
        problem("metrics", f"must be a list of metric names, or default, all, none; got {value!r}")
        return "none"
    return names or "none"


def _metric_params(value, problem) -> Dict[str, Dict[str, Any]]:
    """{metric: {parameter: value}} checked against the metrics' own parameter lists."""
    from ..metrics.evaluate import resolve_params

    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        problem("metric_params", f"must map metric names to parameter mappings; got {value!r}")
        return {}
    try:
        resolve_params(value)
    except EsegetaError as exc:
        problem("metric_params", str(exc))
        return {}
    return {str(k): dict(v) for k, v in value.items()}


def _engine(value, problem) -> Dict[str, Any]:
    from ..options import DEVICES, PRECISIONS

    engine = dict(ENGINE_DEFAULTS)
    value = {} if value is None else value
    if not isinstance(value, dict):
        problem("engine", f"must be a mapping of engine options; got {value!r}")
        return engine
    _unknown_keys(value, tuple(ENGINE_DEFAULTS), "engine.", problem)
    engine.update({k: v for k, v in value.items() if k in ENGINE_DEFAULTS})
    if engine["device"] not in DEVICES:
        problem("engine.device", f"must be one of {', '.join(DEVICES)}; got {engine['device']!r}")
    if engine["precision"] not in PRECISIONS:
        problem("engine.precision", f"must be one of {', '.join(PRECISIONS)}; got {engine['precision']!r}")
    if engine["patch_size"] is not None:
        _integer(engine["patch_size"], "engine.patch_size", problem, minimum=8)
    overlap = engine["overlap"]
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        problem("engine.overlap", f"must be a number in [0, 1); got {overlap!r}")
    if engine["batch_size"] != "auto":
        _integer(engine["batch_size"], "engine.batch_size", problem, minimum=1)
    for key in ("retries", "gallery_cases", "cpus_per_task", "gpus_per_task"):
        _integer(engine[key], f"engine.{key}", problem, minimum=0)
    if not isinstance(engine["scene"], bool):
        problem("engine.scene", f"must be true or false; got {engine['scene']!r}")
    if engine["stability"] is not None:
        from ..stability import parse_stability

        try:
            parse_stability(str(engine["stability"]))
        except EsegetaError as error:
            problem("engine.stability", str(error).replace("--stability ", "", 1))
    return engine
