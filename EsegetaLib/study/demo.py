"""Inputs of the demo study (examples/demo_study.yaml), generated, never downloaded or committed:

- two variants of the bundled synthetic TOF-MRA (other seeds, sizes and spacings) with their true
  vessel masks, beside the bundled sample and its mask;
- a second model: the bundled UNet's architecture with freshly initialised (seeded) weights, as a
  model card.  An untrained copy is the control that the model-randomisation sanity check
  (Adebayo et al. 2018) asks for: a method whose maps and scores hardly change between the
  trained and the random network is not explaining the model.

    python -m EsegetaLib.study.demo examples/demo_data
    esegeta study examples/demo_study.yaml --out demo_study
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

VARIANTS = (  # (name, seed, shape, spacing mm)
    ("variant_a", 4101, (80, 80, 56), (0.45, 0.45, 0.55)),
    ("variant_b", 4102, (72, 88, 48), (0.35, 0.35, 0.6)),
)
RANDOM_SEED = 77


def make_demo_inputs(folder) -> Path:
    import torch

    from ..io import write_image
    from ..models import ModelCard, build_network
    from ..sample import SAMPLE_FILE, SAMPLE_LABELS_FILE, generate_tof_like, resource_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(str(resource_path(SAMPLE_FILE)), folder / "sample.nii.gz")
    shutil.copyfile(str(resource_path(SAMPLE_LABELS_FILE)), folder / "sample_vessels.nii.gz")
    for name, seed, shape, spacing in VARIANTS:
        image, labels = generate_tof_like(shape=shape, spacing=spacing, seed=seed)
        write_image(folder / f"{name}.nii.gz", image.array, image)
        write_image(folder / f"{name}_vessels.nii.gz", labels[None].astype("uint8"), image, dtype="uint8")
    card = ModelCard.read(resource_path("default_model.json"))
    torch.manual_seed(RANDOM_SEED)
    network = build_network(card)
    torch.save(network.state_dict(), folder / "random_unet.pt")
    data = json.loads(Path(str(resource_path("default_model.json"))).read_text())
    data.update({"name": "random-unet", "weights": "random_unet.pt", "metrics": {}, "training": {},
                 "description": f"The bundled UNet's architecture with random weights (torch seed {RANDOM_SEED}): "
                                "a control for the model-randomisation sanity check."})
    (folder / "random_unet.json").write_text(json.dumps(data, indent=2) + "\n")
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="examples/demo_data")
    args = parser.parse_args(argv)
    print(f"demo inputs written to {make_demo_inputs(args.folder)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
