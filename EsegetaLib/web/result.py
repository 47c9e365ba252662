"""What `esegeta view` shows, found and checked before any server starts.

A result directory written by `esegeta explain` holds plain files (`run.json`, `segmentation.<ext>`,
`attributions/<Method>.<ext>`, `metrics.csv|json`, `deletion_insertion.png` (several targets:
`attributions/<target>/<Method>.<ext>`, `deletion_insertion/<target>.png`), `esegeta.mrb`). The
viewer reads the plain files (they are the source of truth and survive without the `.mrb`); a bare
`.mrb` is shown through the scene bridge. Every problem a user can fix becomes one `EsegetaError`
line here, so nothing half-starts. This module needs no MRML: it only looks at files.
"""
from __future__ import annotations

import csv
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import EsegetaError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
INPUT_ROLES = ("input", "volume", "image")
PLOT_NAME = "deletion_insertion.png"
TARGET_PLOTS = "deletion_insertion"  # a folder of one figure per target (runner.TARGET_PLOTS)
MRB_NAME = "esegeta.mrb"


@dataclass
class ViewerResult:
    """Everything the page shows; paths are absolute and exist."""

    source: Path  # the directory or .mrb the user named
    title: str
    input_path: Optional[Path] = None
    segmentation_path: Optional[Path] = None
    attribution_paths: Dict[str, Path] = field(default_factory=dict)  # method -> file, run order
    metrics_columns: List[str] = field(default_factory=list)
    metrics_rows: List[List[str]] = field(default_factory=list)
    plot_path: Optional[Path] = None
    plot_paths: Dict[str, Path] = field(default_factory=dict)  # several targets: target -> its curves' figure
    run: Dict[str, Any] = field(default_factory=dict)  # run.json as read
    mrb_path: Optional[Path] = None  # set when the user named a .mrb (no plain files)

    @property
    def methods(self) -> List[str]:
        return list(self.attribution_paths)


def volume_stem(path: Path) -> Optional[str]:
    """The name of a volume file without its (possibly double) suffix, or None if not a volume."""
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def load_result(path) -> ViewerResult:
    """A checked `ViewerResult` for a result directory or a `.mrb` file (one-line errors)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise EsegetaError(f"Result '{path}' does not exist; give a result directory written by "
                           "`esegeta explain` or an .mrb file.")
    if path.is_file():
        if path.name.lower().endswith(".mrb"):
            return _load_mrb(path.resolve())
        raise EsegetaError(f"'{path}' is a file but not an .mrb scene; give the result directory or its "
                           f"{MRB_NAME}.")
    return _load_directory(path.resolve())


def _load_mrb(path: Path) -> ViewerResult:
    try:
        with zipfile.ZipFile(path) as bundle:
            names = bundle.namelist()
            broken = bundle.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        raise EsegetaError(f"'{path}' is not a readable .mrb (zip) scene ({exc}); re-export it.") from None
    if broken is not None:
        raise EsegetaError(f"'{path}' is damaged (bad member '{broken}'); re-export the scene.")
    if not any(name.lower().endswith(".mrml") for name in names):
        raise EsegetaError(f"'{path}' holds no .mrml scene; it is not a Slicer scene bundle.")
    return ViewerResult(source=path, title=path.stem, mrb_path=path)


def _load_directory(folder: Path) -> ViewerResult:
    if not (folder / "run.json").exists() and (folder / MRB_NAME).is_file():
        return _load_mrb((folder / MRB_NAME).resolve())  # a folder holding only the review scene
    run = _read_run(folder)
    attributions = _attribution_files(folder, run)
    result = ViewerResult(source=folder, title=folder.name, run=run, attribution_paths=attributions)
    result.input_path = _input_file(folder, run)
    result.segmentation_path = _single_volume(folder, "segmentation")
    result.metrics_columns, result.metrics_rows = read_metrics(folder)
    plot = folder / PLOT_NAME
    result.plot_path = plot if plot.is_file() else None
    plots = folder / TARGET_PLOTS  # several targets: deletion_insertion/<target>.png
    if plots.is_dir():
        result.plot_paths = {p.stem: p for p in sorted(plots.glob("*.png")) if p.is_file()}
    for path in [result.input_path, result.segmentation_path, *attributions.values()]:
        if path is not None:
            check_header(path)
    return result


def check_header(path: Path) -> None:
    """Read a volume's header (cheap: no voxels, no MRML) so a damaged file is reported in a
    second; Slicer's reader checks the voxels later, still before the server starts."""
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel
            import numpy as np

            header = nibabel.load(str(path)).header
            # Slicer's reader shows a cut-off uncompressed file without complaint (zeros): check
            # its size (a cut-off .gz stream fails when read).
            needed = int(header["vox_offset"]) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
            if name.endswith(".nii") and path.stat().st_size < needed:
                raise ValueError(f"{path.stat().st_size} bytes, the header needs {needed}")
        elif name.endswith((".nrrd", ".nhdr")):
            import nrrd

            nrrd.read_header(str(path))
    except Exception as exc:  # noqa: BLE001 - any reader failure means a damaged file here
        summary = " ".join(str(exc).split())[:120]
        raise EsegetaError(f"Cannot read '{path}' (damaged or not a volume: {summary}); "
                           "re-run `esegeta explain`.") from None


def _read_run(folder: Path) -> Dict[str, Any]:
    run_file = folder / "run.json"
    if not run_file.is_file():
        raise EsegetaError(f"'{folder}' is not an Esegeta result (no run.json); give the directory "
                           "`esegeta explain --out` wrote.")
    try:
        run = json.loads(run_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EsegetaError(f"'{run_file}' is damaged ({exc}); re-run `esegeta explain`.") from None
    if not isinstance(run, dict):
        raise EsegetaError(f"'{run_file}' is damaged (not a JSON object); re-run `esegeta explain`.")
    return run


def _attribution_files(folder: Path, run: Dict[str, Any]) -> Dict[str, Path]:
    maps_dir = folder / "attributions"
    files = sorted(p for p in maps_dir.glob("*") if p.is_file() and volume_stem(p)) if maps_dir.is_dir() else []
    # several targets: attributions/<target>/<Method>.<ext> (and the target's region.<ext>)
    nested = sorted(p for p in maps_dir.glob("*/*") if p.is_file() and volume_stem(p) not in (None, "region")) \
        if maps_dir.is_dir() else []
    if not files and not nested:
        raise EsegetaError(f"'{folder}' has no attribution maps (attributions/<Method>.nii.gz); "
                           "the run may have failed: re-run `esegeta explain`.")
    found = {volume_stem(p): p for p in files}
    found.update({f"{p.parent.name}/{volume_stem(p)}": p for p in nested})
    # Keep the order the run used (its parameters list the methods) when run.json says it.
    targets = [t.get("name") for t in ((run.get("target") or {}).get("targets") or []) if isinstance(t, dict)]
    keys = [f"{t}/{m}" for t in targets for m in _method_order(run)] if targets else _method_order(run)
    order = [name for name in keys if name in found]
    return {name: found[name] for name in order + [n for n in found if n not in order]}


def _method_order(run: Dict[str, Any]) -> List[str]:
    methods = (run.get("parameters") or {}).get("methods") if isinstance(run.get("parameters"), dict) else None
    methods = methods if methods is not None else run.get("methods")
    if isinstance(methods, dict):
        return [str(m) for m in methods]
    if isinstance(methods, list):
        names = []
        for item in methods:
            if isinstance(item, str):
                names.append(item)
            elif isinstance(item, dict) and "name" in item:
                names.append(str(item["name"]))
            elif isinstance(item, (list, tuple)) and item:
                names.append(str(item[0]))
        return names
    return []


def _input_file(folder: Path, run: Dict[str, Any]) -> Path:
    """The explained volume: the path `run.json` records (absolute, or relative to the result)."""
    candidates: List[str] = []
    inputs = run.get("inputs")
    if isinstance(inputs, list):
        candidates += [str(r["path"]) for r in inputs
                       if isinstance(r, dict) and r.get("path") and str(r.get("role", "")).lower() in INPUT_ROLES]
    parameters = run.get("parameters") if isinstance(run.get("parameters"), dict) else {}
    for value in (parameters.get("volume"), run.get("input"), run.get("input_path"), run.get("volume")):
        if isinstance(value, dict):
            value = value.get("path")
        if isinstance(value, str):
            candidates.append(value)
    for text in candidates:
        candidate = Path(text).expanduser()
        candidate = candidate if candidate.is_absolute() else folder / candidate
        if candidate.is_file():
            return candidate.resolve()
    local = _single_volume(folder, "input")
    if local is not None:
        return local
    if candidates:
        raise EsegetaError(f"The input volume '{candidates[0]}' recorded in {folder / 'run.json'} is missing; "
                           "put it back or copy it into the result directory as input.nii.gz.")
    raise EsegetaError(f"{folder / 'run.json'} records no input volume; re-run `esegeta explain`.")


def _single_volume(folder: Path, stem: str) -> Optional[Path]:
    for suffix in VOLUME_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def read_metrics(folder: Path):
    """(columns, rows) of the run's metrics table as strings, from metrics.csv or metrics.json."""
    csv_file, json_file = folder / "metrics.csv", folder / "metrics.json"
    try:
        if csv_file.is_file():
            with open(csv_file, newline="") as handle:
                table = [row for row in csv.reader(handle) if row]
            return (table[0], [[_number(c) for c in _pad(r, len(table[0]))] for r in table[1:]]) if table else ([], [])
        if json_file.is_file():
            return _metrics_from_json(json.loads(json_file.read_text()))
    except (OSError, UnicodeDecodeError, csv.Error, json.JSONDecodeError) as exc:
        raise EsegetaError(f"The metrics table in '{folder}' is damaged ({exc}); re-run the metrics "
                           "or delete metrics.csv/metrics.json.") from None
    return [], []


def _number(cell: str) -> str:
    """A CSV cell as shown: numbers to 4 significant digits (the file keeps full precision)."""
    try:
        return format_value(float(cell)) if cell.strip() else cell
    except ValueError:
        return cell


def _pad(row: List[str], width: int) -> List[str]:
    return (row + [""] * width)[:width]


def _metrics_from_json(data: Any):
    """Accept the shapes a metrics writer plausibly uses: a list of row objects, {method: {metric:
    value}}, or {"rows": [...]}; anything else is shown as key/value pairs."""
    given: List[str] = []
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        given = [str(c) for c in data.get("columns") or []]
        data = data["rows"]
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        columns: List[str] = list(given)
        for row in data:
            columns += [k for k in row if k not in columns]
        return columns, [[format_value(row.get(c, "")) for c in columns] for row in data]
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        columns = ["method"]
        for row in data.values():
            columns += [k for k in row if k not in columns]
        return columns, [[str(m)] + [format_value(row.get(c, "")) for c in columns[1:]] for m, row in data.items()]
    if isinstance(data, dict):
        return ["name", "value"], [[str(k), format_value(v)] for k, v in flatten(data).items()]
    return [], []


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return "" if value is None else str(value)


def flatten(data: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested dictionaries as dotted keys (the page lists the run's parameters this way)."""
    flat: Dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
