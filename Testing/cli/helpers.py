"""Small real inputs for command-line tests: an oblique volume on disk and real (tiny) models."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Testing"))

from conftest import make_unet_instancenorm_prelu  # noqa: E402

SHAPE = (24, 20, 16)


def oblique_affine() -> np.ndarray:
    """Rotated, anisotropic, one flipped axis, off-origin: geometry mistakes show."""
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-0.4, 0.45, 0.7])
    affine[:3, 3] = [12.5, -30.25, 7.0]
    return affine


def volume_array(shape=SHAPE, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A bright tube over textured background, (C, I, J, K) float32."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    tube = np.exp(-((j - shape[1] / 2) ** 2 + (k - shape[2] / 2) ** 2) / 6.0)
    base = 100 + 400 * tube + 20 * rng.standard_normal(shape)
    return np.stack([base * (1 + 0.1 * c) for c in range(channels)]).astype(np.float32)


def write_volume(path: Path, array: np.ndarray = None, affine: np.ndarray = None) -> Path:
    from EsegetaLib.io import Image, format_of, write_image

    array = volume_array() if array is None else array
    affine = oblique_affine() if affine is None else affine
    reference = Image(array=array, ijk_to_ras=affine, format=format_of(path))
    write_image(path, array, reference)
    return Path(path)


def write_torchscript(path: Path, in_channels: int = 1, seed: int = 0) -> Path:
    import torch

    net = make_unet_instancenorm_prelu(in_channels=in_channels, out_channels=2, seed=seed)
    traced = torch.jit.trace(net, torch.zeros(1, in_channels, 16, 16, 16))
    traced.save(str(path))
    return Path(path)


def write_model_card(folder: Path, patch_size=(16, 16, 16), seed: int = 0) -> Path:
    """A MONAI UNet described by a model card, weights as a state dict (loaded weights_only)."""
    import torch

    net = make_unet_instancenorm_prelu(seed=seed)
    torch.save(net.state_dict(), folder / "unet_weights.pt")
    card = {
        "name": "tiny-vessel-unet", "architecture": "UNet",
        "arguments": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [8, 16, 32],
                      "strides": [2, 2], "num_res_units": 1, "norm": "instance", "act": "prelu"},
        "weights": "unet_weights.pt", "in_channels": 1, "classes": ["background", "vessel"],
        "activation": "softmax", "normalization": {"type": "zscore"},
        "patch_size": list(patch_size), "divisor": 4,
    }
    path = folder / "tiny_unet.json"
    path.write_text(json.dumps(card, indent=2))
    return path


def snapshot(folder: Path):
    """Every path under `folder` with its bytes; None when the folder does not exist."""
    folder = Path(folder)
    if not folder.exists():
        return None
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def siblings(folder: Path):
    """Everything beside `folder` in its parent (to prove no temporary folder was left)."""
    parent = Path(folder).absolute().parent
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


_INPUTS = {}


def shared_inputs(tmp_path_factory):
    """Volumes and models every command-line test reads, built once per test session (tracing
    and saving the networks is the slow part); tests never write into this folder."""
    if not _INPUTS:
        folder = tmp_path_factory.mktemp("cli_inputs")
        _INPUTS.update({
            "folder": folder,
            "volume": write_volume(folder / "volume.nii.gz"),
            "nrrd": write_volume(folder / "volume.nrrd"),
            "model": write_torchscript(folder / "unet.pt"),
            "model2ch": write_torchscript(folder / "unet_2ch.pt", in_channels=2),
            "card": write_model_card(folder),
        })
        _INPUTS["nifti"] = _INPUTS["volume"]
    return _INPUTS
