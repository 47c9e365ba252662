"""torch.export programs (`.pt2`): a graph plus weights, loaded without unpickling Python objects."""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from ..errors import EsegetaError
from .base import first_line

EXTENSIONS = (".pt2",)


def is_export_archive(names: Sequence[str]) -> bool:
    """Whether zip member names are those of a `torch.export.save` archive."""
    return any("/serialized_exported_program" in n or n.endswith("models/model.json") for n in names)


# torch (2.13) warns, while it unpickles the program's pytree specs inside `torch.export.load` and
# `unflatten`, that `isinstance(treespec, LeafSpec)` is deprecated: its own code's call, not ours
# (we call the recommended torch.export.load / unflatten), and nothing a user can act on.
_TORCH_INTERNAL_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def load_program(path: str):
    """The program's module (its train/eval mode is fixed at export), unflattened
    (`torch.export.unflatten`) so that its submodules run as modules again: layer and CAM methods
    hook them (`ExportedProgram.module()` inlines every call, so no layer hook would fire)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCH_INTERNAL_WARNING, category=FutureWarning)
        try:
            program = torch.export.load(path)
        except Exception as exc:
            raise EsegetaError(f"cannot load {path} as a torch.export program: {first_line(exc)}") from exc
        try:
            return torch.export.unflatten(program)
        except Exception:  # noqa: BLE001 - a program unflatten cannot rebuild still runs inlined
            return program.module()
