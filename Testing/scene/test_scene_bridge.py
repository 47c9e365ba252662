"""The MRML scene bridge on slicer-core's real MRML: geometry, colours, display, masks, tables."""
from __future__ import annotations

import json

import numpy as np
import pytest
import vtk

slicer = pytest.importorskip("slicer", reason="slicer-core (pip install esegeta[scene]) not installed")

from EsegetaLib.slicer import colors, scene as S  # noqa: E402
from EsegetaLib.errors import EsegetaError  # noqa: E402


def oblique_affine(spacing=(0.7, 1.1, 2.3), angles=(20.0, -35.0, 50.0), origin=(-12.5, 30.25, 7.125)):
    """IJK->RAS with rotated (oblique), anisotropic voxels."""
    from scipy.spatial.transform import Rotation

    m = np.eye(4)
    m[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() * np.asarray(spacing)
    m[:3, 3] = origin
    return m


@pytest.fixture
def scene():
    s = S.new_scene()
    yield s
    S.release_scene(s)


def left_handed_affine():
    """A radiological (LAS-like) header: I runs right-to-left, determinant < 0."""
    return oblique_affine() @ np.diag([-1.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("make_affine", [oblique_affine, left_handed_affine])
def test_volume_geometry_round_trip_voxel_for_voxel(scene, make_affine):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(19, 23, 13)).astype(np.float32)  # distinct sizes: a transposition shows
    affine = make_affine()
    node = S.volume_from_array(scene, values, affine, "oblique")

    back, affine_back = S.array_from_volume(node)
    assert back.dtype == np.float32 and back.shape == values.shape
    assert np.array_equal(back, values)
    np.testing.assert_allclose(affine_back, affine, rtol=0, atol=1e-12)
    # Slicer's own view of the same memory is (K, J, I), and voxel (i, j, k) sits at affine @ ijk.
    assert np.array_equal(slicer.util.arrayFromVolume(node), values.transpose(2, 1, 0))
    image = node.GetImageData()
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    for ijk in [(0, 0, 0), (18, 0, 0), (0, 22, 0), (0, 0, 12), (7, 11, 5)]:
        assert image.GetScalarComponentAsDouble(*ijk, 0) == pytest.approx(float(values[ijk]))
        ras = ijk_to_ras.MultiplyPoint([*ijk, 1.0])
        np.testing.assert_allclose(ras[:3], (affine @ [*ijk, 1.0])[:3], atol=1e-9)
    spacing = node.GetSpacing()
    np.testing.assert_allclose(spacing, [0.7, 1.1, 2.3], atol=1e-12)

    # node -> array -> node: a second node on the same grid, same voxels, same matrix.
    again = S.volume_from_array(scene, back, affine_back, "again")
    values2, affine2 = S.array_from_volume(again)
    assert np.array_equal(values2, values)
    np.testing.assert_allclose(affine2, affine, rtol=0, atol=1e-12)


def test_results_keep_the_inputs_parent_transform(scene):
    values = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    node = S.volume_from_array(scene, values, oblique_affine(), "input")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    node.SetAndObserveTransformNodeID(transform.GetID())
    result = S.add_map(scene, values * 2, node, "input - m - c", signed=False)
    assert result.GetTransformNodeID() == transform.GetID()
    np.testing.assert_allclose(S.array_from_volume(result)[1], oblique_affine(), atol=1e-12)


def test_sheared_or_flat_affines_are_refused(scene):
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(EsegetaError, match="sheared"):
        S.volume_from_array(scene, np.zeros((3, 3, 3)), sheared, "x")
    with pytest.raises(EsegetaError, match="3-D"):
        S.volume_from_array(scene, np.zeros((3, 3)), np.eye(4), "x")


def test_colour_tables_have_desktop_ids_and_matplotlib_colours(scene):
    from matplotlib import colormaps

    for name, expected in [("Inferno", "vtkMRMLColorTableNodeFileInferno.txt"),
                           ("Viridis", "vtkMRMLColorTableNodeFileViridis.txt"),
                           ("ColdToHotRainbow", "vtkMRMLColorTableNodeFileColdToHotRainbow.txt"),
                           ("DivergingBlueRed", "vtkMRMLColorTableNodeFileDivergingBlueRed.txt")]:
        node = scene.GetNodeByID(expected)
        assert node is not None, expected
        assert node.GetSingletonTag() == f"File{name}.txt" and node.GetNumberOfColors() == 256
    inferno = scene.GetNodeByID("vtkMRMLColorTableNodeFileInferno.txt")
    rgba = [0.0] * 4
    inferno.GetColor(255, rgba)
    np.testing.assert_allclose(rgba, colormaps["inferno"](1.0), atol=0.5 / 255 + 1e-9)  # 8-bit table
    blue_red = scene.GetNodeByID("vtkMRMLColorTableNodeFileDivergingBlueRed.txt")
    blue_red.GetColor(0, rgba)
    assert rgba[2] > rgba[0]  # blue end first
    # A table that already exists (desktop Slicer's own) is kept, not replaced.
    assert colors.ensure_color_tables(scene)["Inferno"] == "vtkMRMLColorTableNodeFileInferno.txt"
    assert scene.GetNodeByID("vtkMRMLColorTableNodeFileInferno.txt") is inferno
    assert scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") == len(
        {scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode").GetID()
         for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode"))})


def test_signed_table_is_slicers_diverging_table_with_a_transparent_centre_band(scene):
    band = scene.GetNodeByID(colors.color_node_id(colors.BAND_TABLE))
    source = scene.GetNodeByID("vtkMRMLColorTableNodeFileDivergingBlueRed.txt")
    assert band is not None and band.GetSaveWithScene()
    n = band.GetNumberOfColors()
    assert n == source.GetNumberOfColors() == 256
    band_rgba, source_rgba = [0.0] * 4, [0.0] * 4
    alphas = []
    for i in range(n):
        band.GetColor(i, band_rgba)
        source.GetColor(i, source_rgba)
        assert band_rgba[:3] == pytest.approx(source_rgba[:3])  # Slicer's own colours
        alphas.append(band_rgba[3])
    # over the window [-h, h]: entries whose value is within 0.1 h of 0 are transparent, the rest opaque
    centres = (np.arange(n) + 0.5) / n * 2 - 1
    np.testing.assert_array_equal(np.array(alphas) == 0, np.abs(centres) < colors.BAND_FRACTION)
    assert sum(a == 0 for a in alphas) == 26 and alphas[0] == alphas[-1] == 1.0


def test_unsigned_map_display_fixed_range_and_threshold(scene):
    rng = np.random.default_rng(1)
    reference = S.volume_from_array(scene, np.zeros((20, 20, 20), np.float32), oblique_affine(), "ct")
    values = np.abs(rng.normal(size=(20, 20, 20))).astype(np.float32)
    values[values < 0.5] = 0
    values[3, 4, 5] = 1000.0  # one extreme voxel must not set the window
    node = S.add_map(scene, values, reference, "ct - Saliency - vessel", signed=False)
    display = node.GetScalarVolumeDisplayNode()
    high = np.percentile(np.abs(values[values != 0]), S.DEFAULT_PERCENTILE)
    assert high < 10
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeFileInferno.txt"
    assert not display.GetAutoWindowLevel() and not display.GetAutoThreshold()
    assert display.GetWindowLevelMin() == pytest.approx(0.0, abs=1e-9)
    assert display.GetWindowLevelMax() == pytest.approx(high, rel=1e-9)
    assert display.GetApplyThreshold()
    assert display.GetLowerThreshold() == pytest.approx(S.DEFAULT_THRESHOLD_FRACTION * high, rel=1e-9)
    assert display.GetUpperThreshold() >= 1000.0
    assert node.GetImageData().GetScalarTypeAsString() == "float"


def test_signed_map_display_is_symmetric_on_a_diverging_table(scene):
    rng = np.random.default_rng(2)
    reference = S.volume_from_array(scene, np.zeros((16, 18, 20), np.float32), np.eye(4), "mr")
    values = (rng.normal(size=(16, 18, 20)) * 3 + 1.0).astype(np.float32)  # skewed positive
    node = S.add_map(scene, values, reference, "mr - IntegratedGradients - vessel", signed=True)
    display = node.GetScalarVolumeDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeEsegetaDivergingBlueRed"
    assert not display.GetAutoWindowLevel()
    high = np.percentile(np.abs(values), S.DEFAULT_PERCENTILE)
    assert display.GetWindowLevelMax() == pytest.approx(high, rel=1e-9)
    assert display.GetWindowLevelMin() == pytest.approx(-high, rel=1e-9)
    assert display.GetWindow() == pytest.approx(2 * high, rel=1e-9) and display.GetLevel() == pytest.approx(0, abs=1e-9)


def test_map_on_another_grid_is_refused(scene):
    reference = S.volume_from_array(scene, np.zeros((4, 5, 6), np.float32), np.eye(4), "mr")
    with pytest.raises(EsegetaError, match="grid"):
        S.add_map(scene, np.zeros((6, 5, 4), np.float32), reference, "bad", signed=False)


def test_segmentation_segments_and_masks(scene):
    affine = oblique_affine(spacing=(0.5, 0.6, 1.2))
    volume = S.volume_from_array(scene, np.zeros((18, 16, 12), np.float32), affine, "mra")
    labels = np.zeros((18, 16, 12), np.uint8)
    labels[2:9, 3:10, 1:6] = 1
    labels[11:16, 2:5, 7:11] = 2
    seg = S.add_segmentation(scene, labels, volume, "mra - segmentation", {1: "vessel", 2: "aneurysm"},
                             {2: (1.0, 0.0, 1.0)})
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    vessel = segmentation.GetSegmentIdBySegmentName("vessel")
    aneurysm = segmentation.GetSegmentIdBySegmentName("aneurysm")
    assert vessel and aneurysm
    assert segmentation.GetSegment(aneurysm).GetColor() == pytest.approx((1.0, 0.0, 1.0))
    assert seg.GetDisplayNode().GetVisibility2DOutline() and not seg.GetDisplayNode().GetVisibility2DFill()
    assert np.array_equal(S.segment_mask(seg, volume), labels > 0)
    assert np.array_equal(S.segment_mask(seg, volume, vessel), labels == 1)
    assert np.array_equal(S.segment_mask(seg, volume, aneurysm), labels == 2)
    with pytest.raises(EsegetaError, match="not in"):
        S.segment_mask(seg, volume, "nope")
    # A user's segmentation drawn on a coarser grid is resampled onto the volume's grid.
    coarse_affine = affine.copy()
    coarse_affine[:3, :3] *= 2
    coarse_ref = S.volume_from_array(scene, np.zeros((9, 8, 6), np.float32), coarse_affine, "coarse")
    coarse = np.zeros((9, 8, 6), np.uint8)
    coarse[2:5, 2:4, 1:3] = 1
    user = S.add_segmentation(scene, coarse, coarse_ref, "user")
    # Coarse voxel c covers fine indices [2c - 1, 2c + 1): coarse 2..4 -> fine 3..8, and so on.
    expected = np.zeros((18, 16, 12), bool)
    expected[3:9, 3:7, 1:5] = True
    assert np.array_equal(S.segment_mask(user, volume), expected)


def test_markup_point_to_voxel_through_transforms(scene):
    affine = oblique_affine()
    volume = S.volume_from_array(scene, np.zeros((19, 23, 13), np.float32), affine, "mra")
    point = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "click")
    target = (12, 5, 9)
    ras = (affine @ [target[0] + 0.3, target[1] - 0.4, target[2] + 0.2, 1.0])[:3]
    point.AddControlPointWorld(vtk.vtkVector3d(*ras))
    assert S.point_to_voxel(point, volume) == target

    # Move the volume by a transform: the same world point is now another voxel.
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    shift = vtk.vtkMatrix4x4()
    offset = affine[:3, :3] @ [2, 0, -3]  # exactly (+2, 0, -3) voxels along I, J, K
    for r in range(3):
        shift.SetElement(r, 3, offset[r])
    transform.SetMatrixTransformToParent(shift)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    assert S.point_to_voxel(point, volume) == (target[0] - 2, target[1], target[2] + 3)

    far = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "far")
    far.AddControlPointWorld(vtk.vtkVector3d(500.0, 500.0, 500.0))
    with pytest.raises(EsegetaError, match="outside"):
        S.point_to_voxel(far, volume)
    with pytest.raises(EsegetaError, match="no point"):
        S.point_to_voxel(far, volume, 3)


def test_metrics_table_rows_titles_units(scene):
    rows = [{"method": "Saliency", "infidelity": 0.125, "sparseness": 0.5, "runtime_s": 1.5, "device": "cpu"},
            {"method": "IntegratedGradients", "infidelity": 0.25, "runtime_s": 12.0, "device": "cuda:0"}]
    table = S.add_metrics_table(scene, rows, columns={"infidelity": ("Infidelity", "", "lower is better")})
    t = table.GetTable()
    names = [t.GetColumnName(c) for c in range(t.GetNumberOfColumns())]
    assert names == ["method", "infidelity", "sparseness", "runtime_s", "device"]
    assert t.GetNumberOfRows() == 2
    got = S.table_rows(table)
    assert got[0] == {"method": "Saliency", "infidelity": 0.125, "sparseness": 0.5, "runtime_s": 1.5, "device": "cpu"}
    assert got[1]["method"] == "IntegratedGradients" and np.isnan(got[1]["sparseness"])
    assert table.GetColumnTitle("runtime_s") == "Runtime" and table.GetColumnUnitLabel("runtime_s") == "s"
    assert table.GetColumnTitle("infidelity") == "Infidelity"
    assert table.GetColumnDescription("infidelity") == "lower is better"
    assert table.GetColumnTitle("sparseness") == "Sparseness"
    # The CLI runner's column names, odd values (bool, list) and no unit knowledge needed.
    other = S.add_metrics_table(scene, [{"method": "Saliency", "attribution_s": 0.25, "attribution_peak_mb": 12.5,
                                         "randomisation_pass": True, "new_metric": 3, "curve": [1, 2],
                                         "device": "cpu"}])
    assert S.table_rows(other) == [{"method": "Saliency", "randomisation_pass": 1.0, "new_metric": 3.0,
                                    "curve": "[1, 2]", "attribution_s": 0.25, "attribution_peak_mb": 12.5,
                                    "device": "cpu"}]
    assert list(S.table_rows(other)[0])[-3:] == ["attribution_s", "attribution_peak_mb", "device"]
    assert other.GetColumnUnitLabel("attribution_peak_mb") == "MB" and other.GetColumnTitle("new_metric") == "new_metric"


def test_table_numbers_survive_saving_exactly(scene, tmp_path):
    rng = np.random.default_rng(3)
    values = [0.123456789123, 123456.789, -9.87654321e-12, 3.3e15, 1.0 / 3.0, 0.0, *rng.normal(size=20)]
    rows = [{"method": f"m{i}", "value": v} for i, v in enumerate(values)]
    table = S.add_metrics_table(scene, rows)
    before = S.table_rows(table)
    for row, v in zip(before, values):
        assert row["value"] == pytest.approx(v, rel=5e-6, abs=0)  # 6 significant digits
    loaded = S.read_review(S.export_review(scene, tmp_path / "t.mrb"))
    try:
        assert S.table_rows(loaded.GetFirstNodeByClass("vtkMRMLTableNode")) == before  # bit for bit
    finally:
        S.release_scene(loaded)


def test_run_folder_holds_parameters(scene):
    params = {"methods": ["Saliency"], "target": {"class_index": 1, "region": "predicted"}, "patch": 96}
    folder = S.add_run_folder(scene, "Esegeta - run", params)
    sh = scene.GetSubjectHierarchyNode()
    assert sh.GetItemName(folder) == "Esegeta - run"
    assert json.loads(sh.GetItemAttribute(folder, "Esegeta.parameters")) == params
    assert sh.GetItemAttribute(folder, "Esegeta.patch") == "96"


def test_overlay_and_volume_rendering_settings(scene):
    volume = S.volume_from_array(scene, np.ones((12, 12, 12), np.float32), np.eye(4), "mr")
    values = np.zeros((12, 12, 12), np.float32)
    values[4:8, 4:8, 4:8] = 2.0
    node = S.add_map(scene, values, volume, "mr - m - c", signed=False)
    S.ensure_slice_views(scene)
    S.show_overlay(scene, volume, node, 0.35)
    composites = [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
                  for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]
    assert len(composites) == 3
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == volume.GetID()
        assert composite.GetForegroundVolumeID() == node.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.35)
    display = S.show_volume_rendering(scene, node, visible_fraction=0.5)
    assert display is not None and display.GetVisibility()
    opacity = display.GetVolumePropertyNode().GetVolumeProperty().GetScalarOpacity()
    assert opacity.GetValue(0.0) == 0.0 and opacity.GetValue(0.9) == 0.0
    assert opacity.GetValue(2.0) == pytest.approx(0.8)
