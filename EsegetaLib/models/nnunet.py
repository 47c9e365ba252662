"""nnU-Net v2 trained-model folders (placeholder, filled below)."""
from __future__ import annotations

import os


def is_nnunet_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "plans.json")) and os.path.isfile(os.path.join(path, "dataset.json"))
