"""What the viewer puts in its MRML scene (slicer-core, no server): geometry, values, display.

A result directory (plain files, read by Slicer's readers) and the same result as a `.mrb` written by
the scene bridge must give the same maps with the same colour tables and display windows.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from web_fixtures import AFFINE, METHODS, arrays, write_mrb, write_result

pytest.importorskip("trame_slicer", reason="`esegeta view` needs trame-slicer (pip install esegeta[scene])")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_result(tmp_path_factory.mktemp("scene") / "result")


def new_app():
    from trame_slicer.core import SlicerApp

    return SlicerApp()


def test_result_directory_loads_exactly(folder):
    from EsegetaLib.slicer.scene import array_from_volume, display_range
    from EsegetaLib.web.result import load_result
    from EsegetaLib.web.scene_setup import load_directory

    result = load_result(folder)
    assert result.methods == list(METHODS)  # the run's order (run.json parameters.methods)
    loaded = load_directory(new_app(), result)
    volume, segmentation, maps = arrays()
    values, ijk_to_ras = array_from_volume(loaded.input_node)
    np.testing.assert_array_equal(values, volume)
    np.testing.assert_allclose(ijk_to_ras, AFFINE, atol=1e-9)  # NIfTI geometry as Slicer reads it
    for name in METHODS:
        layer = loaded.maps[name]
        map_values, map_affine = array_from_volume(layer.node)
        np.testing.assert_array_equal(map_values, maps[name])
        np.testing.assert_allclose(map_affine, AFFINE, atol=1e-9)
        expected = display_range(maps[name], signed=name != "Saliency")
        assert (layer.low, layer.high) == pytest.approx((expected["low"], expected["high"]))
    assert loaded.maps["Saliency"].color_node.GetID() == "vtkMRMLColorTableNodeFileInferno.txt"
    assert loaded.maps["IntegratedGradients"].color_node.GetID() == "vtkMRMLColorTableNodeEsegetaDivergingBlueRed"
    display = loaded.segmentation_node.GetDisplayNode()
    assert display.GetVisibility2DOutline() and not display.GetVisibility2DFill()
    labelmap = loaded.segmentation_node.GetSegmentation().GetNumberOfSegments()
    assert labelmap == 1


def test_mrb_gives_the_same_display_as_the_directory(folder, tmp_path):
    from EsegetaLib.web.result import load_result
    from EsegetaLib.web.scene_setup import load_directory, load_mrb

    from_dir = load_directory(new_app(), load_result(folder))
    from_mrb = load_mrb(new_app(), load_result(write_mrb(tmp_path / "review.mrb")))
    assert set(from_mrb.maps) == set(METHODS)
    for name in METHODS:
        a, b = from_dir.maps[name], from_mrb.maps[name]
        assert a.color_node.GetID() == b.color_node.GetID()
        assert (a.low, a.high, a.signed) == pytest.approx((b.low, b.high, b.signed))
        assert a.threshold == pytest.approx(b.threshold)
    assert from_mrb.metrics[0][:2] == ["method", "deletion_auc"]
    assert [row[0] for row in from_mrb.metrics[1]] == list(METHODS)
    assert from_mrb.parameters["methods"] == list(METHODS)
    assert from_mrb.segmentation_node is not None


def test_page_state_of_an_mrb(tmp_path):
    """The whole app (views, scene, page state) built from a .mrb, without serving it."""
    import os

    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    from trame.app import get_server

    from EsegetaLib.web.app import EsegetaViewer
    from EsegetaLib.web.result import load_result

    viewer = EsegetaViewer(load_result(write_mrb(tmp_path / "review.mrb")), get_server("mrb_state", client_type="vue3"))
    state = viewer.state
    assert sorted(state.methods) == sorted(METHODS) and state.method == state.methods[0]
    # One row per method, the quality metrics only (short headers, full names as tooltips).
    assert [h["title"] for h in state.metrics["headers"]] == ["method", "deletion_auc"]
    assert state.metrics["headers"][1]["label"] == "Del. AUC"
    assert sorted(state.metrics["rows"]) == sorted([["Saliency", "0.21"], ["IntegratedGradients", "0.18"]])
    # The page's title is the volume's name (the scene bridge names the input node), not "review".
    assert viewer.result.title == viewer.scene.input_node.GetName() == "input"
    assert state.trame__title == "Esegeta: input"
    # A meaningful display range: an unsigned map from exactly 0 (the scene file's window/level
    # round trip gave -2e-08 before), a signed one symmetric.
    for layer in viewer.scene.maps.values():
        assert (layer.low == -layer.high) if layer.signed else (layer.low == 0.0 < layer.high), layer
        display = layer.node.GetScalarVolumeDisplayNode()
        assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((layer.low, layer.high))
    # Slice views named, with the orientation letters of Slicer's presets (radiological axial).
    marks = state.view_marks
    assert marks["Red"]["name"].startswith("Axial") and marks["Yellow"]["name"].startswith("Sagittal")
    assert {k: marks["Red"][k] for k in ("left", "right", "top", "bottom")} == \
        {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert (marks["Green"]["top"], marks["Green"]["left"]) == ("S", "R")
    assert (marks["Yellow"]["top"], {marks["Yellow"]["left"], marks["Yellow"]["right"]}) == ("S", {"A", "P"})
    from EsegetaLib.web.app import plane_name

    # a view turned to an oblique volume's axes (Slicer: "Reformat") is named by its nearest plane
    assert plane_name((-0.94, 0.34, 0), (0.05, 0.1, 0.99)) == "Coronal"
    assert any(key == "parameters.methods" for key, _ in state.parameters)
    shown = viewer.scene.maps[state.method]
    assert shown.vr_display.GetVisibility() and shown.legend.GetVisibility()
    assert all(view.get_foreground_volume_id() == shown.node.GetID() for view in viewer.slice_views)
    assert all(view.get_background_volume_id() == viewer.scene.input_node.GetID() for view in viewer.slice_views)
    other = next(name for name in METHODS if name != state.method)
    viewer._on_method(other)  # what a change of the Method menu calls (the browser test drives the menu)
    assert all(view.get_foreground_volume_id() == viewer.scene.maps[other].node.GetID()
               for view in viewer.slice_views)
    assert viewer.scene.maps[other].vr_display.GetVisibility() and not shown.vr_display.GetVisibility()


def test_threshold_hides_values_in_slices_and_3d(folder):
    from EsegetaLib.web.result import load_result
    from EsegetaLib.web.scene_setup import load_directory, set_threshold

    loaded = load_directory(new_app(), load_result(folder))
    saliency = loaded.maps["Saliency"]
    set_threshold(saliency, 0.6)
    display = saliency.node.GetScalarVolumeDisplayNode()
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(0.6)
    opacity = saliency.vr_display.GetVolumePropertyNode().GetVolumeProperty().GetScalarOpacity()
    assert opacity.GetValue(0.5) == 0.0 and opacity.GetValue(0.9) > 0.0
    # Signed map: a copy of the run's table, transparent for |value| < t, same colours elsewhere.
    gradients = loaded.maps["IntegratedGradients"]
    set_threshold(gradients, 0.6)
    band = gradients.node.GetScalarVolumeDisplayNode().GetColorNode()
    assert band.GetID() != gradients.color_node.GetID()
    base, table = gradients.color_node.GetLookupTable(), band.GetLookupTable()
    count = table.GetNumberOfTableValues()
    values = gradients.low + (np.arange(count) + 0.5) / count * (gradients.high - gradients.low)
    for index in range(count):
        assert table.GetTableValue(index)[:3] == pytest.approx(base.GetTableValue(index)[:3])
        assert (table.GetTableValue(index)[3] == 0.0) == (abs(values[index]) < 0.6)
    opacity = gradients.vr_display.GetVolumePropertyNode().GetVolumeProperty().GetScalarOpacity()
    assert opacity.GetValue(-0.5) == 0.0 and opacity.GetValue(-0.9) > 0.0 and opacity.GetValue(0.9) > 0.0
    set_threshold(gradients, gradients.top)  # everything hidden in 3D too
    assert all(opacity.GetValue(v) == 0.0 for v in (-1.0, -0.5, 0.5, 0.99))
    set_threshold(gradients, 0.0)
    assert gradients.node.GetScalarVolumeDisplayNode().GetColorNodeID() == gradients.color_node.GetID()


def test_cut_off_volume_is_one_line_error(tmp_path):
    """A sound header with voxels cut off (which Slicer's reader would show as zeros)."""
    import nibabel as nib

    from EsegetaLib.errors import EsegetaError
    from EsegetaLib.web.result import load_result

    folder = write_result(tmp_path / "result", with_plot=False)
    target = folder / "attributions" / "IntegratedGradients.nii"
    (folder / "attributions" / "IntegratedGradients.nii.gz").unlink()
    nib.save(nib.Nifti1Image(arrays()[2]["IntegratedGradients"], AFFINE), target)
    target.write_bytes(target.read_bytes()[:1000])
    with pytest.raises(EsegetaError, match=r"Cannot read .*IntegratedGradients.nii' \(damaged") as error:
        load_result(folder)
    assert "\n" not in str(error.value)


def test_metrics_json_and_relative_input(tmp_path):
    """metrics.json in the runner's {"columns", "rows"} layout; an input path relative to the result."""
    from EsegetaLib.web.result import load_result

    folder = write_result(tmp_path / "result", with_plot=False)
    (folder / "metrics.csv").unlink()
    (folder / "metrics.json").write_text(json.dumps({"columns": ["method", "auc"],
                                                     "rows": [{"method": "Saliency", "auc": 0.123456}]}))
    run = json.loads((folder / "run.json").read_text())
    volume = folder / "volume.nii.gz"
    (tmp_path / "result_input.nii.gz").rename(volume)
    run["inputs"] = [{"role": "model", "path": "/elsewhere/model.pt"}, {"role": "volume", "path": "volume.nii.gz"}]
    run["parameters"]["volume"] = "volume.nii.gz"
    (folder / "run.json").write_text(json.dumps(run))
    result = load_result(folder)
    assert result.input_path == volume.resolve()
    assert result.metrics_columns == ["method", "auc"] and result.metrics_rows == [["Saliency", "0.1235"]]
    assert result.plot_path is None


def test_loopback_hosts():
    from EsegetaLib.web.command import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
