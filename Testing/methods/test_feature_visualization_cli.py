"""`esegeta explain` with FeatureVisualization and TopActivatingWindows (#17 item 3): the feature
volume (NIfTI on the model's window grid with the input's spacing) and its projection PNG, the ROI
list and Slicer markups, all listed in run.json and read back with nibabel, SimpleITK and PIL; no
attribution map and no metrics for the model-level result (with the reason); a bad channel is one
line with exit 2 and leaves nothing behind."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))

from helpers import snapshot, write_model_card, write_volume  # noqa: E402

from EsegetaLib.cli import main  # noqa: E402

LAYER = "network.model.1.submodule.2"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An oblique, left-handed NRRD volume and a MONAI UNet model card (eager: layers can be hooked)."""
    folder = tmp_path_factory.mktemp("fv_inputs")
    write_volume(folder / "volume.nii.gz")
    return {"nrrd": write_volume(folder / "volume.nrrd"), "card": write_model_card(folder)}


def _layer_name(card):
    """The decoder block's name inside the card's network (wrapped with its normalisation)."""
    from EsegetaLib.models import load_model
    from EsegetaLib.io import read_image

    model = load_model(card)
    image = read_image(Path(card).parent / "volume.nii.gz")
    network = model.network_for(image.array, spacing=image.spacing, affine=image.ijk_to_ras)
    return next(n for n, _ in network.named_modules() if n.endswith("model.1.submodule.2"))


def test_explain_writes_features_and_rois(inputs, tmp_path, capsys):
    nib = pytest.importorskip("nibabel")
    sitk = pytest.importorskip("SimpleITK")
    from PIL import Image as PILImage

    layer = _layer_name(inputs["card"])
    out = tmp_path / "result"
    # an NRRD input (the maps are NRRD then; the feature volume is NIfTI whatever the input)
    code = main(["explain", str(inputs["nrrd"]), "--model", str(inputs["card"]), "--out", str(out),
                 "--methods", "FeatureVisualization,TopActivatingWindows,Saliency", "--region", "whole",
                 "--param", f"FeatureVisualization.layer={layer}", "--param", "FeatureVisualization.channel=1",
                 "--param", "FeatureVisualization.steps=24", "--param", f"TopActivatingWindows.layer={layer}",
                 "--param", "TopActivatingWindows.k=3", "--metrics", "sparseness", "--device", "cpu", "--no-scene"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads((out / "run.json").read_text())
    fv = record["results"]["FeatureVisualization"]
    assert fv["file"] is None and fv["metadata"]["level"] == "model" and fv["metadata"]["explains_target"] is False
    assert not (out / "attributions" / "FeatureVisualization.nii.gz").exists()
    source = sitk.ReadImage(str(inputs["nrrd"]))
    # the feature volume: the model's window (the card's 16^3 patch), the input's spacing and axes
    nii = out / fv["files"]["feature_volume"]
    assert nii.name == f"FeatureVisualization_{layer}_1.nii.gz"
    image = nib.load(str(nii))
    assert image.shape == (16, 16, 16) and np.isfinite(image.get_fdata()).all() and image.get_fdata().std() > 0
    assert b"model-level" in image.header["descrip"].tobytes()
    itk = sitk.ReadImage(str(nii))
    np.testing.assert_allclose(itk.GetSpacing(), source.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(itk.GetDirection(), source.GetDirection(), atol=1e-5)
    # centred on the input: the window's centre voxel sits at the input's centre
    centre_in = source.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in source.GetSize()])
    centre_fv = itk.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in itk.GetSize()])
    np.testing.assert_allclose(centre_fv, centre_in, atol=1e-4)
    png = PILImage.open(out / fv["files"]["feature_mip"])
    assert png.size[0] > 3 * 16 and png.size[1] > 16 and np.asarray(png).std() > 0
    checks = {c["name"]: c for c in fv["checks"]}
    print(f"\nCLI FeatureVisualization '{layer}' channel 1, {fv['diagnostics']['objective']} objective: "
          f"{fv['diagnostics']['activation_start']:.4f} -> {fv['diagnostics']['activation_final']:.4f} "
          f"(factor {fv['diagnostics']['activation_factor']}, lr {fv['diagnostics']['lr']:.4f})")
    assert checks["input_level"]["status"] == "not_run" and checks["optimisation"]["status"] == "pass"
    assert fv["diagnostics"]["channel"] == 1 and fv["diagnostics"]["steps"] == 24
    # top activating windows: an attribution-like map on the input grid, the ROI list, the markups
    taw = record["results"]["TopActivatingWindows"]
    amap = sitk.ReadImage(str(out / taw["file"]))
    assert amap.GetSize() == source.GetSize()
    listing = json.loads((out / taw["files"]["rois"]).read_text())
    assert len(listing["rois"]) == 3 and listing["coordinate_system"] == "RAS"
    for roi in listing["rois"]:
        lps = np.asarray(source.TransformContinuousIndexToPhysicalPoint([float(v) for v in roi["centre_ijk"]]))
        np.testing.assert_allclose(roi["centre_ras"], lps * [-1, -1, 1], atol=1e-4)
        markup = json.loads((out / taw["files"][f"roi_{roi['rank']}"]).read_text())["markups"][0]
        assert markup["type"] == "ROI" and len(markup["controlPoints"]) == 1
        np.testing.assert_allclose(markup["center"], lps, atol=1e-4)
    # metrics: computed for the maps of the input, skipped with the reason for the model-level result
    metrics = json.loads((out / "metrics.json").read_text())
    rows = {row["method"]: row for row in metrics["rows"]}
    assert "sparseness" in rows["Saliency"] and "sparseness" in rows["TopActivatingWindows"]
    assert "sparseness" not in rows["FeatureVisualization"]
    assert "model-level" in rows["FeatureVisualization"]["metrics_skipped"]
    assert "not an attribution" in rows["TopActivatingWindows"]["metrics_note"]
    listed = {entry["path"] for entry in record["outputs"]}  # every file with its SHA-256
    assert set(fv["files"].values()) | set(taw["files"].values()) <= listed
    _import_into_slicer_scene(out, inputs["nrrd"], listing, nii)


def _import_into_slicer_scene(out, volume_file, listing, nii):
    """The Slicer panel's import (slicer-core scene): one ROI node per box at its RAS centre, the
    feature volume on its own grid, no map node for the model-level result."""
    try:
        from EsegetaLib.slicer import scene as bridge
        from EsegetaLib.slicer.result_import import import_result
        from EsegetaLib.slicer.slicer_env import slicer_module

        slicer_module()
    except Exception:  # noqa: BLE001 - slicer-core not installed
        return
    scene = bridge.new_scene()
    try:
        # the input as Slicer loads it (its reader orders a left-handed grid's axes its own way)
        slicer = slicer_module()
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(volume_file))
        volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "input")
        assert storage.ReadData(volume)
        nodes = import_result(scene, volume, out)
        assert set(nodes["maps"]) == {"TopActivatingWindows", "Saliency"}
        rois = [n for n in nodes["extras"]["TopActivatingWindows"] if n.IsA("vtkMRMLMarkupsROINode")]
        assert len(rois) == 3
        for node, roi in zip(rois, listing["rois"]):
            centre = [0.0, 0.0, 0.0]
            node.GetCenter(centre)
            np.testing.assert_allclose(centre, roi["centre_ras"], atol=1e-4)
        (feature,) = nodes["extras"]["FeatureVisualization"]
        assert "model-level" in feature.GetName() and feature.GetImageData().GetDimensions() == (16, 16, 16)
        matrix = bridge._vtk().vtkMatrix4x4()
        feature.GetIJKToRASMatrix(matrix)
        import nibabel as nib

        # placed where the file says (Slicer may order a left-handed grid's axes differently: compare
        # the centre and the voxel size, not the matrix)
        centre = bridge._numpy_matrix(matrix) @ np.array([7.5, 7.5, 7.5, 1.0])
        affine = nib.load(str(nii)).affine
        np.testing.assert_allclose(centre, affine @ np.array([7.5, 7.5, 7.5, 1.0]), atol=1e-4)
        np.testing.assert_allclose(feature.GetSpacing(), np.linalg.norm(affine[:3, :3], axis=0), rtol=1e-5)
    finally:
        bridge.release_scene(scene)


def test_bad_channel_is_one_line_exit_2_and_nothing_written(inputs, tmp_path, capsys):
    layer = _layer_name(inputs["card"])
    out = tmp_path / "result"
    code = main(["explain", str(inputs["nrrd"]), "--model", str(inputs["card"]), "--out", str(out),
                 "--methods", "FeatureVisualization", "--region", "whole",
                 "--param", f"FeatureVisualization.layer={layer}", "--param", "FeatureVisualization.channel=40",
                 "--metrics", "none", "--device", "cpu", "--no-scene"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("esegeta: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "channel 40 is out of range" in errors[0] and "(0-7)" in errors[0]
    assert snapshot(out) is None
