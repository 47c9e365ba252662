"""Real, tiny inputs for study tests: generated TOF-like volumes and two small real models (a MONAI
UNet described by a model card, and a TorchScript export of another net), written to a folder."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Testing"))

from conftest import make_net_batchnorm_relu, make_unet_instancenorm_prelu  # noqa: E402

METHODS = ["Saliency", "InputXGradient", {"name": "IntegratedGradients", "params": {"n_steps": 4}}]
METRICS = ["sparseness", "complexity", "relevance_mass"]
# The TorchScript model refuses windows whose last axis is the longest: a real exception raised in
# the middle of one case (the volume shaped like that), not a mock.
PICKY_SHAPE = (24, 24, 36)


def write_volumes(folder: Path, shapes, seed: int = 300):
    from EsegetaLib.io import write_image
    from EsegetaLib.sample import generate_tof_like

    paths = []
    for i, shape in enumerate(shapes):
        image, labels = generate_tof_like(shape=shape, spacing=(0.5, 0.5, 0.5), seed=seed + i)
        path = folder / f"vol{i}.nii.gz"
        write_image(path, image.array, image)
        write_image(folder / f"vol{i}_roi.nii.gz", labels[None].astype("float32"), image)
        paths.append(path)
    return paths


def write_unet_card(folder: Path) -> Path:
    import torch

    torch.save(make_unet_instancenorm_prelu(seed=1).state_dict(), folder / "unet_weights.pt")
    card = {"name": "tiny-unet", "architecture": "UNet",
            "arguments": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [8, 16, 32],
                          "strides": [2, 2], "num_res_units": 1, "norm": "instance", "act": "prelu"},
            "weights": "unet_weights.pt", "in_channels": 1, "classes": ["background", "vessel"],
            "activation": "softmax", "normalization": {"type": "zscore"}, "divisor": 4}
    path = folder / "unet.json"
    path.write_text(json.dumps(card, indent=2))
    return path


def write_picky_torchscript(folder: Path) -> Path:
    """A BatchNorm+ReLU net plus an intensity term, scripted (TorchScript keeps the `raise`)."""
    import torch

    class Picky(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            if x.shape[-1] > x.shape[-2]:
                raise RuntimeError("picky model: the last axis is the longest")
            z = (x - 300.0) / 150.0
            # Bright voxels (vessels, z ~ 3-4) lean to class 1, tissue (z ~ 0) to class 0.
            return self.net(z) + torch.cat([torch.zeros_like(z), 2.0 * (z - 1.5)], dim=1)

    scripted = torch.jit.script(Picky(make_net_batchnorm_relu(seed=2)))
    path = folder / "picky.pt"
    scripted.save(str(path))
    return path


def write_study(path: Path, volumes, models, methods=None, metrics=None, seed: int = 11, **extra) -> Path:
    import yaml

    doc = {"name": path.stem, "seed": seed, "volumes": volumes, "models": models,
           "methods": methods or METHODS, "metrics": metrics or METRICS,
           "target": {"class": 1, "region": "predicted"},
           "engine": {"device": "cpu", "retries": 1, "gallery_cases": 2}}
    doc.update(extra)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
