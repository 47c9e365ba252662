#!/usr/bin/env python3
"""Write the bundled synthetic TOF-MRA sample and its vessel mask into EsegetaLib/resources.

Deterministic: the volume depends only on `EsegetaLib.sample.SAMPLE_SEED`, shape and spacing, so
re-running this script reproduces the committed files (uint16 intensities, uint8 labels, the same
oblique, anisotropic, off-origin grid).

    python scripts/make_sample.py [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from EsegetaLib.io import write_image  # noqa: E402
from EsegetaLib.sample import SAMPLE_FILE, SAMPLE_LABELS_FILE as LABELS_FILE, generate_tof_like  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "EsegetaLib" / "resources")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    image, labels = generate_tof_like()
    # uint16 keeps the file small; intensities are ~0..1500, so rounding costs < 0.1 %.
    write_image(args.out / SAMPLE_FILE, np.round(np.clip(image.array, 0, 65535)), image, dtype=np.uint16)
    write_image(args.out / LABELS_FILE, labels, image, dtype=np.uint8)
    print(f"wrote {args.out / SAMPLE_FILE} {image.spatial_shape} spacing {image.spacing} and "
          f"{args.out / LABELS_FILE} ({int(labels.sum())} vessel voxels)")


if __name__ == "__main__":
    main()
