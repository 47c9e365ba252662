#!/usr/bin/env python3
"""Show what the bundled default model finds: maximum-intensity projections (MIPs) of each volume
and of the model's vessel prediction, side by side, in `docs/default_model_mra.png`.

Rows: the bundled synthetic sample (with its true-mask Dice), then each real angiogram found in
`../shared/data/mra` (see its README; not part of the repository). Each volume is normalised as
the model card says (constants from the whole volume, inside `LoadedModel.network_for`) and, where
its voxels are far from the spacing the model was trained at, resampled first; the prediction is
brought back to the volume's own grid (nearest neighbour) before projecting.

    python scripts/make_mip_figure.py [--model CARD.json] [--out docs/default_model_mra.png]
"""
from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from EsegetaLib.io import read_image  # noqa: E402
from EsegetaLib.models import load_default_model, load_model  # noqa: E402
from EsegetaLib.sample import load_sample, load_sample_labels  # noqa: E402

SHARED_MRA = REPO.parent / "shared" / "data" / "mra"
# name, file, spacing (mm) to run the model at (None: the file's own), projection axis, why.
REAL_VOLUMES = [
    ("brain TOF-MRA (chris_MRA)", "chris_MRA.nii.gz", None, 2,
     "0.52x0.52x0.65 mm, inside the trained range: run as is"),
    ("abdominal MRA (vmtk aorta)", "vmtk_aorta.mha", None, 2,
     "0.88x0.88x1.5 mm, run at its own spacing (body MRA: outside the training domain)"),
]


def segment(loaded, image, spacing=None) -> np.ndarray:
    """Vessel labels (I,J,K) on the image's own grid: optional resampling, sliding windows."""
    from monai.inferers import sliding_window_inference

    array = image.array
    zoom = None
    if spacing is not None:
        zoom = np.asarray(image.spacing) / np.asarray(spacing)
        array = np.stack([ndimage.zoom(c, zoom, order=1) for c in array])
    network = loaded.network_for(array)
    roi = tuple(loaded.card.patch_size or (64, 64, 64))
    with torch.no_grad():
        logits = sliding_window_inference(torch.from_numpy(array[None]), roi, 1, network,
                                          overlap=0.25, mode="gaussian")
    labels = logits.argmax(1)[0].numpy().astype(np.uint8)
    if zoom is not None:
        back = np.asarray(image.spatial_shape) / np.asarray(labels.shape)
        labels = ndimage.zoom(labels, back, order=0)[tuple(slice(0, s) for s in image.spatial_shape)]
    return labels


def dice(pred, truth) -> float:
    return float(2 * np.logical_and(pred, truth).sum() / max(pred.sum() + truth.sum(), 1))


def mip_panel(ax, array, axis, spacing, title, cmap="gray", vmax=None):
    mip = array.max(axis=axis)
    rest = [a for a in range(3) if a != axis]
    aspect = spacing[rest[0]] / spacing[rest[1]]
    ax.imshow(mip, cmap=cmap, aspect=aspect, vmin=0, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def main(argv=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model card or TorchScript file (default: the bundled model)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "default_model_mra.png")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model) if args.model else load_default_model()

    rows = []
    sample = load_sample()
    truth = load_sample_labels().array[0] > 0
    start = time.time()
    pred = segment(loaded, sample)
    rows.append(("bundled synthetic sample", sample, pred, 2,
                 f"Dice vs true mask {dice(pred, truth):.3f}", time.time() - start))
    for name, file, spacing, axis, why in REAL_VOLUMES:
        path = SHARED_MRA / file
        if not path.exists():
            print(f"skipping {name}: {path} not found")
            continue
        image = read_image(path)
        start = time.time()
        pred = segment(loaded, image, spacing)
        rows.append((name, image, pred, axis, why, time.time() - start))

    fig, axes = plt.subplots(len(rows), 3, figsize=(12, 4.2 * len(rows)), squeeze=False)
    for (name, image, pred, axis, note, seconds), row in zip(rows, axes):
        volume = image.array[0]
        vmax = np.percentile(volume, 99.95)
        mip_panel(row[0], volume, axis, image.spacing, f"{name}: volume MIP", vmax=vmax)
        mip_panel(row[1], pred.astype(np.float32), axis, image.spacing,
                  f"prediction MIP ({int(pred.sum())} voxels, {seconds:.0f} s)", cmap="magma", vmax=1)
        mip_panel(row[2], volume, axis, image.spacing, "overlay\n" + textwrap.fill(note, 60), vmax=vmax)
        overlay = np.ma.masked_where(pred.max(axis=axis) == 0, pred.max(axis=axis))
        rest = [a for a in range(3) if a != axis]
        row[2].imshow(overlay, cmap="autumn", alpha=0.45, vmin=0, vmax=1, interpolation="nearest",
                      aspect=image.spacing[rest[0]] / image.spacing[rest[1]])
        print(f"{name}: {int(pred.sum())} vessel voxels ({pred.mean():.2%}), {seconds:.1f} s; {note}")
    fig.suptitle(f"Esegeta default model '{loaded.card.name}': maximum-intensity projections "
                 "(left volume, middle prediction, right overlay)", fontsize=11)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
