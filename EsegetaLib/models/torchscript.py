"""TorchScript files (`.pt`, `.pth`, `.ts`): architecture and weights in one archive, no pickle.

A zip archive is told apart by its members: a torch.export program (see `export.py`), TorchScript
(`code/`, `constants.pkl`), or a plain `torch.save` archive, which holds weights only (a card must
name the architecture) or a pickled whole model (refused: unpickling runs arbitrary code).
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch

from ..errors import EsegetaError
from .base import LoadedModel, ModelCard, first_line, infer_in_channels, load_tensors

EXTENSIONS = (".pt", ".pth", ".ts")


def load_archive(path: str):
    """The network in a TorchScript or torch.export archive; explain what to do with anything else."""
    from .export import EXTENSIONS as EXPORT_EXTENSIONS, is_export_archive, load_program

    if not os.path.exists(path):
        raise EsegetaError(f"model file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise EsegetaError(f"{path} is not a model file (TorchScript, torch.export or state dict "
                           "archives are zip files)")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if path.lower().endswith(EXPORT_EXTENSIONS) or is_export_archive(names):
        return load_program(path)
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        try:
            return torch.jit.load(path, map_location="cpu")
        except Exception as exc:
            raise EsegetaError(f"cannot load {path} as TorchScript: {first_line(exc)}") from exc
    # A plain torch.save archive: a state dict needs an architecture; a whole model is a pickle.
    state = load_tensors(path, "a model file")
    raise EsegetaError(f"{path} holds weights only ({type(state).__name__}), no architecture: write a "
                       "model card .json naming the network and pointing at these weights "
                       "(docs/readme/models.md)")


def load(path: str) -> LoadedModel:
    """A bare TorchScript or `.pt2` file: no class names, normalisation 'none' unless overridden."""
    from .export import EXTENSIONS as EXPORT_EXTENSIONS

    network = load_archive(path)
    is_export = path.lower().endswith(EXPORT_EXTENSIONS)
    card = ModelCard(name=Path(path).name.split(".")[0], architecture="export" if is_export else "torchscript",
                     weights=Path(path).name, in_channels=infer_in_channels(network), divisor=None)
    return LoadedModel(card=card, network=network, path=path, format=card.architecture,
                       activation_source="default (no model card)")
