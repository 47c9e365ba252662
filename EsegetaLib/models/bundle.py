"""MONAI bundles: a folder or zip with configs/inference.json|yaml (network and transforms filled in
by the bundle work)."""
from __future__ import annotations

import os
import zipfile

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")


def is_bundle(path: str) -> bool:
    """A folder (or zip, possibly with one top folder) holding configs/inference.json|yaml."""
    if os.path.isdir(path):
        return any(os.path.isfile(os.path.join(path, "configs", name)) for name in CONFIG_NAMES)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        return any(n.split("/")[-2:-1] == ["configs"] and n.split("/")[-1] in CONFIG_NAMES for n in names)
    return False
