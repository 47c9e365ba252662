"""Which kind of model a path is, and what its files say, without loading it (no torch import):
shared by `models.load_model`, study-file checks and the Slicer panel's model summary.

Kinds: "nnunet" (a folder with plans.json and dataset.json), "monai_bundle" (a folder or zip with
configs/inference.json|yaml), "card" (.json), "export" (.pt2), "torchscript" (.pt, .pth, .ts).
"""
from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Dict, List, Optional

from .errors import EsegetaError

BUNDLE_CONFIGS = ("inference.json", "inference.yaml", "inference.yml")
TORCHSCRIPT_EXTENSIONS = (".pt", ".pth", ".ts")
EXPORT_EXTENSIONS = (".pt2",)
NEITHER = ("{path} is a folder but neither an nnU-Net v2 trained-model folder (looked for plans.json, "
           "dataset.json and fold_N/checkpoint_final.pth) nor a MONAI bundle (looked for "
           "configs/inference.json or .yaml and models/model.pt or .ts); give one of those, or a model file")


def is_nnunet_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "plans.json")) and os.path.isfile(os.path.join(path, "dataset.json"))


def is_bundle(path: str) -> bool:
    """A folder (or zip, possibly with one top folder) holding configs/inference.json|yaml."""
    if os.path.isdir(path):
        return any(os.path.isfile(os.path.join(path, "configs", name)) for name in BUNDLE_CONFIGS)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        return any(n.split("/")[-2:-1] == ["configs"] and n.split("/")[-1] in BUNDLE_CONFIGS for n in names)
    return False


def model_format(path) -> str:
    """The kind of model at `path` (module docstring); EsegetaError (one line) when it is none."""
    path = str(path)
    if not os.path.exists(path):
        raise EsegetaError(f"model file not found: {path}")
    if os.path.isdir(path):
        if is_nnunet_folder(path):
            return "nnunet"
        if is_bundle(path):
            return "monai_bundle"
        raise EsegetaError(NEITHER.format(path=path))
    lower = path.lower()
    if lower.endswith(".zip"):
        if zipfile.is_zipfile(path) and is_bundle(path):
            return "monai_bundle"
        raise EsegetaError(f"{path} is a zip file but not a MONAI bundle (looked for configs/inference.json "
                           "or .yaml inside it)")
    if lower.endswith(".json"):
        return "card"
    if lower.endswith(EXPORT_EXTENSIONS):
        return "export"
    if lower.endswith(TORCHSCRIPT_EXTENSIONS):
        return "torchscript"
    raise EsegetaError(f"{path}: unknown model file type; use TorchScript (.pt/.ts), torch.export (.pt2), "
                       "a model card (.json), an nnU-Net v2 trained-model folder or a MONAI bundle")


def folder_summary(path: str) -> Optional[Dict[str, Any]]:
    """For an nnU-Net folder or a bundle folder: {"name", "classes", "text"} read from its JSON
    files (dataset.json labels, plans' spacing and patch; the bundle's metadata); None otherwise."""
    if not os.path.isdir(path):
        return None
    name = os.path.basename(os.path.normpath(path))
    try:
        if is_nnunet_folder(path):
            with open(os.path.join(path, "dataset.json"), encoding="utf-8") as handle:
                labels = json.load(handle).get("labels", {})
            with open(os.path.join(path, "plans.json"), encoding="utf-8") as handle:
                plans = json.load(handle)
            values = {v: k for k, v in labels.items() if isinstance(v, int)}
            classes: Optional[List[str]] = [values[v] for v in sorted(values)] or None
            folds = sorted(d for d in os.listdir(path) if d.startswith("fold_"))
            configuration = name.split("__")[-1]
            config = plans.get("configurations", {}).get(configuration, {})
            text = [f"nnU-Net v2 model {name}", f"Folds: {', '.join(folds) or 'none found'}"]
            if config:
                text.append(f"Spacing {config.get('spacing')} mm, patch {config.get('patch_size')}, "
                            f"normalisation {', '.join(config.get('normalization_schemes', []))}")
        elif is_bundle(path):
            meta_path = os.path.join(path, "configs", "metadata.json")
            meta = json.load(open(meta_path, encoding="utf-8")) if os.path.isfile(meta_path) else {}
            channels = meta.get("network_data_format", {}).get("outputs", {}).get("pred", {}).get("channel_def", {})
            classes = [str(channels[k]) for k in sorted(channels, key=int)] if channels else None
            text = [f"MONAI bundle {meta.get('name', name)} {meta.get('version', '')}".strip()]
        else:
            return None
    except (OSError, ValueError) as exc:
        return {"name": name, "classes": None, "text": f"{name}: its JSON files cannot be read ({exc})."}
    if classes:
        text.append("Classes: " + ", ".join(f"{i} = {c}" for i, c in enumerate(classes)))
    return {"name": name, "classes": classes, "text": "\n".join(text)}
