"""A small result directory written the way `esegeta explain` writes one (plain files only).

32^3 volume, 1 mm voxels, RAS axes along I, J, K with an offset origin. The input is a bright
sphere (radius 6 voxels) on zero, so the attribution blocks below lie over black background:

    Saliency (unsigned):            0.5 on I in [21, 29), J in [21, 29)  (axial: top-left)
    IntegratedGradients (signed):  +0.5 on I in [3, 11),  J in [3, 11)   (axial: bottom-right)
                                   -0.5 on I in [21, 29), J in [3, 11)   (axial: bottom-left)

In Slicer's axial view patient right (+I here) is on the screen's left and anterior (+J) is up.
Forty voxels at 1.0 in a far corner (I, J < 2, K < 10: off the central slices) make the display
window's upper end (the bridge's 99.5th percentile of |map|) 1.0, so the blocks sit mid-table.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

SHAPE = (32, 32, 32)
AFFINE = np.array([[1.0, 0, 0, -10.0], [0, 1.0, 0, 20.0], [0, 0, 1.0, -5.0], [0, 0, 0, 1]])
BLOCK_VALUE = 0.5
PEAK = (slice(0, 2), slice(0, 2), slice(0, 10))
SALIENCY_BLOCK = (slice(21, 29), slice(21, 29))
POSITIVE_BLOCK = (slice(3, 11), slice(3, 11))
NEGATIVE_BLOCK = (slice(21, 29), slice(3, 11))
METHODS = ("Saliency", "IntegratedGradients")


def arrays():
    """input, segmentation, {method: map} as float32/uint8 (I, J, K) arrays."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    radius = np.sqrt((i - 15.5) ** 2 + (j - 15.5) ** 2 + (k - 15.5) ** 2)
    volume = np.where(radius < 6, 100.0 + 2.0 * k, 0.0).astype(np.float32)
    segmentation = (radius < 4).astype(np.uint8)
    saliency = np.zeros(SHAPE, np.float32)
    saliency[SALIENCY_BLOCK] = BLOCK_VALUE
    saliency[PEAK] = 1.0
    gradients = np.zeros(SHAPE, np.float32)
    gradients[POSITIVE_BLOCK] = BLOCK_VALUE
    gradients[NEGATIVE_BLOCK] = -BLOCK_VALUE
    gradients[PEAK] = 1.0
    return volume, segmentation, {"Saliency": saliency, "IntegratedGradients": gradients}


def write_result(folder: Path, with_plot: bool = True) -> Path:
    """Write the result directory (input kept outside it, as a user's volume would be)."""
    import nibabel as nib

    folder = Path(folder)
    (folder / "attributions").mkdir(parents=True)
    volume, segmentation, maps = arrays()
    input_path = folder.parent / f"{folder.name}_input.nii.gz"
    nib.save(nib.Nifti1Image(volume, AFFINE), input_path)
    nib.save(nib.Nifti1Image(segmentation, AFFINE), folder / "segmentation.nii.gz")
    for name, values in maps.items():
        nib.save(nib.Nifti1Image(values, AFFINE), folder / "attributions" / f"{name}.nii.gz")
    rows = [{"method": "Saliency", "deletion_auc": 0.21, "insertion_auc": 0.74, "attribution_s": 0.5},
            {"method": "IntegratedGradients", "deletion_auc": 0.18, "insertion_auc": 0.81, "attribution_s": 3.2}]
    with open(folder / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    run = {
        "schema": "esegeta-run/1", "command": "explain",
        "inputs": [{"role": "volume", "path": str(input_path.resolve()), "bytes": input_path.stat().st_size}],
        "parameters": {"volume": str(input_path.resolve()), "methods": {"Saliency": {"abs": True},
                                                                        "IntegratedGradients": {"n_steps": 32}},
                       "class_index": 1, "region": "predicted", "device": "cpu"},
        "target": {"class_index": 1, "region": "predicted"},
        "results": {"Saliency": {"metadata": {"signed": False}},
                    "IntegratedGradients": {"metadata": {"signed": True}}},
        "segmentation": "segmentation.nii.gz",
    }
    (folder / "run.json").write_text(json.dumps(run, indent=2))
    if with_plot:
        write_plot(folder / "deletion_insertion.png")
    return folder


def write_plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fraction = np.linspace(0, 1, 11)
    figure, axis = plt.subplots(figsize=(4, 2.5), dpi=60)
    axis.plot(fraction, 1 - fraction ** 0.5, label="deletion")
    axis.plot(fraction, fraction ** 0.5, label="insertion")
    axis.legend()
    figure.savefig(path)
    plt.close(figure)


def write_mrb(path: Path) -> Path:
    """The same result as a review scene written by the scene bridge (`EsegetaLib.slicer.scene`)."""
    from EsegetaLib.slicer import scene as bridge
    from EsegetaLib.results import Explanation, MethodResult

    volume, segmentation, maps = arrays()
    results = {name: MethodResult(name, values[None], {}, 0.1, metadata={"signed": name != "Saliency"})
               for name, values in maps.items()}
    explanation = Explanation(segmentation=segmentation, region=segmentation.astype(bool), results=results,
                              target={"class_index": 1, "region": "predicted"}, engine={"device": "cpu"})
    rows = [{"method": "Saliency", "deletion_auc": 0.21}, {"method": "IntegratedGradients", "deletion_auc": 0.18}]
    built = bridge.build_review_scene((volume, AFFINE), explanation, rows, {"methods": list(METHODS)})
    try:
        bridge.export_review(built["scene"], path)
    finally:
        bridge.release_scene(built["scene"])
    return Path(path)
