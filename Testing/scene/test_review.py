"""Review scenes: build from an Explanation, .mrb round trip, previews checked pixel by pixel."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (pip install esegeta[scene]) not installed")

from EsegetaLib.slicer import previews as P, review as R, scene as S  # noqa: E402
from EsegetaLib.errors import EsegetaError  # noqa: E402
from EsegetaLib.results import Explanation, MethodResult  # noqa: E402

from .test_scene_bridge import oblique_affine  # noqa: E402

SHAPE = (24, 20, 16)


def make_case():
    """A synthetic MRA: a bright tube along I (label 1), attributions peaking on it."""
    i, j, k = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    tube = (j - 10) ** 2 + (k - 8) ** 2 <= 9
    volume = (100.0 + 20.0 * np.sin(i / 3.0) + 250.0 * tube).astype(np.float32)[None]
    blob = np.exp(-((i - 15) ** 2 + (j - 10) ** 2 + (k - 8) ** 2) / 12.0).astype(np.float32)
    saliency = MethodResult("Saliency", np.abs(blob)[None], {"abs": True}, 0.5,
                            metadata={"signed": False})
    signed = (blob * np.where(i < 15, -1.0, 1.0)).astype(np.float32)
    ig = MethodResult("IntegratedGradients", signed[None], {"n_steps": 16, "baseline": "blur"}, 2.25,
                      diagnostics={"convergence_delta": 0.01}, metadata={"signed": True})
    explanation = Explanation(segmentation=tube.astype(np.uint8), region=tube,
                              results={"Saliency": saliency, "IntegratedGradients": ig},
                              target={"class_index": 1, "region": "predicted"},
                              engine={"device": "cpu", "precision": "fp32"}, seconds=3.0)
    metrics = [{"method": "Saliency", "sparseness": 0.61, "runtime_s": 0.5, "device": "cpu"},
               {"method": "IntegratedGradients", "sparseness": 0.42, "infidelity": 0.03,
                "runtime_s": 2.25, "device": "cpu"}]
    return volume, oblique_affine(spacing=(0.4, 0.45, 0.9)), explanation, metrics


def nodes_by_class(scene, cls):
    return {scene.GetNthNodeByClass(i, cls).GetName(): scene.GetNthNodeByClass(i, cls)
            for i in range(scene.GetNumberOfNodesByClass(cls))}


def color_values(node):
    rgba = [0.0] * 4
    out = []
    for i in range(node.GetNumberOfColors()):
        node.GetColor(i, rgba)
        out.append(list(rgba))
    return np.array(out)


def test_mrb_round_trip_every_node(tmp_path):
    volume, affine, explanation, metrics = make_case()
    params = {"model": "unet.pt", "methods": ["Saliency", "IntegratedGradients"], "patch_size": None}
    built = S.build_review_scene((volume, affine), explanation, metrics, params, volume_name="TOF",
                                 class_name="vessel", opacity=0.4)
    scene = built["scene"]
    assert set(built["maps"]) == {"Saliency", "IntegratedGradients"}
    assert built["maps"]["Saliency"].GetName() == "TOF - Saliency - vessel"
    path = S.export_review(scene, tmp_path / "review.mrb")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["review.mrb"]  # nothing left behind
    with zipfile.ZipFile(path) as bundle:
        mrml = [n for n in bundle.namelist() if n.endswith(".mrml")]
        assert mrml == ["review/review.mrml"]
        assert 'version="Slicer5.' in bundle.read(mrml[0]).decode()

    loaded = S.read_review(path)
    try:
        assert loaded.GetLastLoadedVersion().startswith("Slicer5.")
        before, after = nodes_by_class(scene, "vtkMRMLScalarVolumeNode"), nodes_by_class(loaded, "vtkMRMLScalarVolumeNode")
        assert set(after) == {"TOF", "TOF - Saliency - vessel", "TOF - IntegratedGradients - vessel"}
        for name, node in before.items():
            values, matrix = S.array_from_volume(node)
            values2, matrix2 = S.array_from_volume(after[name])
            assert values2.dtype == values.dtype and np.array_equal(values2, values), name
            np.testing.assert_allclose(matrix2, matrix, rtol=0, atol=1e-9)
            d1, d2 = node.GetScalarVolumeDisplayNode(), after[name].GetScalarVolumeDisplayNode()
            assert d2.GetColorNodeID() == d1.GetColorNodeID()
            assert loaded.GetNodeByID(d2.GetColorNodeID()) is not None
            # MRML stores window and level as text with 6 significant digits.
            tolerance = 1e-5 * max(d1.GetWindow(), 1e-12)
            for getter in ("GetWindowLevelMin", "GetWindowLevelMax", "GetLowerThreshold",
                           "GetUpperThreshold", "GetApplyThreshold", "GetAutoWindowLevel"):
                assert getattr(d2, getter)() == pytest.approx(getattr(d1, getter)(), rel=1e-5, abs=tolerance), \
                    (name, getter)
        assert after["TOF - Saliency - vessel"].GetScalarVolumeDisplayNode().GetColorNodeID() == \
            "vtkMRMLColorTableNodeFileInferno.txt"
        assert after["TOF - IntegratedGradients - vessel"].GetScalarVolumeDisplayNode().GetColorNodeID() == \
            "vtkMRMLColorTableNodeEsegetaDivergingBlueRed"
        assert json.loads(after["TOF - IntegratedGradients - vessel"].GetAttribute("Esegeta.params")) == \
            {"n_steps": 16, "baseline": "blur"}
        for table_id in ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeFileDivergingBlueRed.txt",
                         "vtkMRMLColorTableNodeEsegetaDivergingBlueRed"):  # the band's alphas survive the .mrb
            np.testing.assert_allclose(color_values(loaded.GetNodeByID(table_id)),
                                       color_values(scene.GetNodeByID(table_id)), atol=1e-6)
            assert len([1 for i in range(loaded.GetNumberOfNodesByClass("vtkMRMLColorTableNode"))
                        if loaded.GetNthNodeByClass(i, "vtkMRMLColorTableNode").GetID() == table_id]) == 1

        # Segmentation: names, colours, voxels.
        segs = nodes_by_class(loaded, "vtkMRMLSegmentationNode")
        assert list(segs) == ["TOF - segmentation"]
        seg = segs["TOF - segmentation"].GetSegmentation()
        assert seg.GetNumberOfSegments() == 1 and seg.GetNthSegment(0).GetName() == "vessel"
        original = built["segmentation"].GetSegmentation().GetNthSegment(0)
        assert seg.GetNthSegment(0).GetColor() == pytest.approx(original.GetColor())
        assert np.array_equal(S.segment_mask(segs["TOF - segmentation"], after["TOF"]),
                              explanation.segmentation > 0)

        # Table cells, titles, units.
        tables = nodes_by_class(loaded, "vtkMRMLTableNode")
        assert list(tables) == ["TOF - metrics"]
        rows = S.table_rows(tables["TOF - metrics"])
        saved = S.table_rows(built["table"])
        assert [list(r) for r in rows] == [list(r) for r in saved]
        for got, want in zip(rows, saved):
            for key, value in want.items():
                assert got[key] == value or (value != value and got[key] != got[key]), (key, got, want)
        assert [r["method"] for r in rows] == ["Saliency", "IntegratedGradients"]
        assert rows[0]["sparseness"] == pytest.approx(0.61) and np.isnan(rows[0]["infidelity"])
        assert rows[1]["infidelity"] == pytest.approx(0.03) and rows[1]["device"] == "cpu"
        assert tables["TOF - metrics"].GetColumnUnitLabel("runtime_s") == "s"

        # Run folder with the parameters; every result inside it.
        sh = loaded.GetSubjectHierarchyNode()
        folder = sh.GetItemByName("Esegeta - TOF - vessel")
        assert folder
        stored = json.loads(sh.GetItemAttribute(folder, "Esegeta.parameters"))
        assert stored["model"] == "unet.pt" and stored["target"]["class_index"] == 1
        assert stored["methods"] == ["Saliency", "IntegratedGradients"]
        for node in list(after.values()) + list(tables.values()) + list(segs.values()):
            assert sh.GetItemParent(sh.GetItemByDataNode(node)) == folder, node.GetName()

        # Views: the overlay and the volume rendering come back as set.
        shown = after["TOF - Saliency - vessel"]
        composites = nodes_by_class(loaded, "vtkMRMLSliceCompositeNode")
        assert len(composites) == 3
        for composite in composites.values():
            assert composite.GetForegroundVolumeID() == shown.GetID()
            assert composite.GetBackgroundVolumeID() == after["TOF"].GetID()
            assert composite.GetForegroundOpacity() == pytest.approx(0.4)
        vr = S.logic(loaded, "VolumeRendering").GetFirstVolumeRenderingDisplayNode(shown)
        assert vr is not None and vr.GetVisibility()
        opacity = vr.GetVolumePropertyNode().GetVolumeProperty().GetScalarOpacity()
        top = shown.GetScalarVolumeDisplayNode().GetWindowLevelMax()
        assert opacity.GetValue(0.4 * top) == 0.0 and opacity.GetValue(top) == pytest.approx(0.8)
    finally:
        S.release_scene(loaded)
        S.release_scene(scene)


def test_export_refuses_other_suffixes_and_reader_checks_files(tmp_path):
    scene = S.new_scene()
    try:
        with pytest.raises(EsegetaError, match=".mrb"):
            S.export_review(scene, tmp_path / "scene.mrml")
    finally:
        S.release_scene(scene)
    bogus = tmp_path / "bogus.mrb"
    bogus.write_text("not a zip")
    with pytest.raises(EsegetaError, match="not a Slicer"):
        S.read_review(bogus)


def _grey_background_scene():
    """Uniform background 100 shown on a fixed window [0, 200] (grey 50 %), a map that is zero
    except for a cube in the middle, and a segmentation around the cube."""
    scene = S.new_scene()
    affine = oblique_affine(spacing=(1.0, 1.2, 1.5), angles=(0.0, 0.0, 0.0), origin=(0, 0, 0))
    background = S.add_image(scene, None, "mr", array=np.full(SHAPE, 100.0, np.float32), ijk_to_ras=affine)[0]
    display = background.GetScalarVolumeDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(0.0, 200.0)
    values = np.zeros(SHAPE, np.float32)
    values[9:15, 7:13, 5:11] = 1.0
    node = S.add_map(scene, values, background, "mr - Saliency - vessel", signed=False)
    labels = np.zeros(SHAPE, np.uint8)
    labels[6:18, 4:16, 3:13] = 1
    seg = S.add_segmentation(scene, labels, background, "seg", {1: "vessel"}, {1: (0.0, 1.0, 0.0)})
    return scene, background, node, seg


def test_slice_preview_pixels_show_overlay_where_high_and_grey_where_zero(tmp_path):
    from matplotlib import colormaps

    scene, background, node, seg = _grey_background_scene()
    try:
        rgb = P.render_slice(scene, "Axial", background, node, 0.5, None, (12.0 * 1.0, 10 * 1.2, 8 * 1.5),
                             size=(200, 200))
        h, w, _ = rgb.shape
        centre = rgb[h // 2, w // 2].astype(int)
        top = np.array(colormaps["inferno"](1.0)[:3]) * 255
        expected = 0.5 * 127.5 + 0.5 * top  # foreground opacity 0.5 over grey 50 %
        assert np.all(np.abs(centre - expected) <= 4), (centre, expected)
        assert centre[0] - centre[2] > 30  # clearly coloured, not grey
        # Inside the volume but where the map is 0: the plain grey background (threshold hides 0).
        edge = rgb[h // 2, w // 2 + int(0.4 * (w // 2) * 24 / 24 * 0.9)].astype(int)
        corner_inside = rgb[h // 2 + 8, w // 2 + 60].astype(int)
        for pixel in (edge, corner_inside):
            assert abs(pixel[0] - pixel[1]) <= 1 and abs(pixel[1] - pixel[2]) <= 1, pixel
            assert 120 <= pixel[0] <= 135, pixel
        # Nothing of the overlay outside the cube: count coloured pixels ~ the cube's area.
        coloured = np.abs(rgb[..., 0].astype(int) - rgb[..., 2].astype(int)) > 20
        pixel_mm = 24.0 / w  # FitSliceToAll: the volume's widest extent fills the view
        cube_area = (6 * 1.0 / pixel_mm) * (6 * 1.2 / pixel_mm)
        assert 0.6 * cube_area < coloured.sum() < 1.6 * cube_area

        result = P.write_previews(scene, tmp_path / "previews", background, node, seg, three_d=False)
        assert [p.split("/")[-1] for p in result["paths"]] == ["axial.png", "coronal.png", "sagittal.png"]
        from PIL import Image

        for path in result["paths"]:
            image = np.asarray(Image.open(path).convert("RGB")).astype(int)
            green = (image[..., 1] > 150) & (image[..., 0] < 80) & (image[..., 2] < 80)
            assert green.sum() > 20, f"no segmentation outline in {path}"
            assert (np.abs(image[..., 0] - image[..., 2]) > 30).sum() > 50, f"no overlay in {path}"
        # The preview's temporary nodes are gone from the scene.
        assert scene.GetNumberOfNodesByClass("vtkMRMLSliceNode") == 0
        assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0
    finally:
        S.release_scene(scene)


def test_write_review_writes_bundle_and_previews(tmp_path):
    from EsegetaLib.io import Image as EImage

    volume, affine, explanation, metrics = make_case()
    out = tmp_path / "run"
    result = R.write_review(out, EImage(volume, affine), explanation, metrics, {"model": "demo"},
                            class_name="vessel", show_method="IntegratedGradients")
    assert result["mrb"] == str(out / "esegeta.mrb") and zipfile.is_zipfile(result["mrb"])
    names = [p.split("/")[-1] for p in result["previews"]]
    ok, why = P.egl_available()
    assert names == ["Saliency.png", "IntegratedGradients.png", "overview.png"]  # one panel per method
    assert bool(result["notes"]) == (not ok), (result["notes"], why)
    loaded = S.read_review(result["mrb"])
    try:
        shown = loaded.GetFirstNodeByName("TOF - IntegratedGradients - vessel") or \
            loaded.GetFirstNodeByName("input - IntegratedGradients - vessel")
        assert shown is not None
        composite = loaded.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
        assert composite.GetForegroundVolumeID() == shown.GetID()
    finally:
        S.release_scene(loaded)
    if ok:
        from PIL import Image

        # the panel's 3D view (bottom right quarter) has a black background with something rendered on it
        image = np.asarray(Image.open(out / "previews" / "IntegratedGradients.png").convert("RGB")).astype(int)
        h, w, _ = image.shape
        quarter = image[h // 2:, w // 2 - 40:int(0.8 * w)]  # left of the colour bar
        black = (quarter.sum(axis=2) < 15)
        assert black.sum() > 20000
        assert ((quarter.sum(axis=2) > 60) & ~black).sum() > 200


def test_review_without_segmentation_and_with_two_channels(tmp_path):
    volume, affine, explanation, _ = make_case()
    two = np.concatenate([volume, 2 * volume])  # e.g. two MR contrasts
    result = R.write_result_scene(tmp_path, (two, affine), explanation, include_segmentation=False,
                                  three_d=False, show_method="Saliency")
    assert [p.split("/")[-1] for p in result["previews"]] == ["Saliency.png", "IntegratedGradients.png",
                                                              "overview.png"] and result["notes"] == []
    loaded = S.read_review(result["mrb"])
    try:
        assert loaded.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
        assert loaded.GetNumberOfNodesByClass("vtkMRMLTableNode") == 0
        first, second = loaded.GetFirstNodeByName("input [0]"), loaded.GetFirstNodeByName("input [1]")
        assert np.array_equal(S.array_from_volume(second)[0], two[1])
        assert np.array_equal(S.array_from_volume(first)[0], two[0])
        shown = loaded.GetFirstNodeByName("input - Saliency - class 1")
        assert shown is not None and shown.GetAttribute("Esegeta.method") == "Saliency"
        composite = loaded.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
        assert composite.GetBackgroundVolumeID() == first.GetID()
        assert composite.GetForegroundVolumeID() == shown.GetID()
    finally:
        S.release_scene(loaded)


def test_previews_cut_through_the_strongest_attribution(tmp_path):
    """A small blob far from the volume's centre: every preview must pass through it."""
    from PIL import Image

    scene = S.new_scene()
    try:
        affine = oblique_affine(spacing=(0.8, 0.9, 1.4))
        background = S.add_image(scene, None, "mr", array=np.full(SHAPE, 50.0, np.float32), ijk_to_ras=affine)[0]
        values = np.zeros(SHAPE, np.float32)
        values[3:6, 14:17, 1:4] = 1.0  # centred on voxel (4, 15, 2)
        values[20, 2, 12] = 0.3  # weaker, isolated: must not win
        node = S.add_map(scene, values, background, "mr - m - c", signed=False)
        ijk, world = P.strongest_point(node)
        assert ijk == (4, 15, 2)
        np.testing.assert_allclose(world, (affine @ [4, 15, 2, 1])[:3], atol=1e-9)
        result = P.write_previews(scene, tmp_path, background, node, three_d=False)
        for path in result["paths"]:
            image = np.asarray(Image.open(path).convert("RGB")).astype(int)
            assert (np.abs(image[..., 0] - image[..., 2]) > 30).sum() > 20, f"{path} misses the blob"
    finally:
        S.release_scene(scene)
