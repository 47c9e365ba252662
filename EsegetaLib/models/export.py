"""torch.export programs (`.pt2`): a graph plus weights, loaded without unpickling Python objects."""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import EsegetaError
from .base import first_line

EXTENSIONS = (".pt2",)


def is_export_archive(names: Sequence[str]) -> bool:
    """Whether zip member names are those of a `torch.export.save` archive."""
    return any("/serialized_exported_program" in n or n.endswith("models/model.json") for n in names)


def load_program(path: str):
    """The program's module (its train/eval mode is fixed at export), unflattened
    (`torch.export.unflatten`) so that its submodules run as modules again: layer and CAM methods
    hook them (`ExportedProgram.module()` inlines every call, so no layer hook would fire)."""
    try:
        program = torch.export.load(path)
    except Exception as exc:
        raise EsegetaError(f"cannot load {path} as a torch.export program: {first_line(exc)}") from exc
    try:
        return torch.export.unflatten(program)
    except Exception:  # noqa: BLE001 - a program unflatten cannot rebuild still runs inlined
        return program.module()
