"""Top activating windows (#17 item 3, methods/topwindows.py + method_outputs.py): on a volume where a
known bright blob drives a hand-set detector channel, the strongest box contains the blob; the ROI
list's RAS coordinates are the IJK centres through the volume's affine (checked against SimpleITK's
TransformContinuousIndexToPhysicalPoint on the file, LPS -> RAS), and Slicer's own markups reader
(slicer-core's vtkMRMLMarkupsROIJsonStorageNode) loads each .mrk.json as the same box."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from EsegetaLib.engine import ExplainSession
from EsegetaLib.io import Image, read_image, write_image
from EsegetaLib.method_outputs import MARKUPS_SCHEMA, write_rois
from EsegetaLib.options import EngineOptions, Target

SHAPE = (32, 28, 24)
BLOB = (21, 9, 15)


def oblique_affine():
    angle = np.deg2rad(25)
    rot = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.5, -0.6, 0.9])
    affine[:3, 3] = [-20.0, 14.5, 3.25]
    return affine


def blob_volume():
    rng = np.random.default_rng(0)
    g = np.indices(SHAPE)
    r2 = sum((g[a] - BLOB[a]) ** 2 for a in range(3))
    return (np.exp(-r2 / 8.0) + 0.05 * rng.standard_normal(SHAPE)).astype(np.float32)


def detector_net():
    """conv (channel 0: a 5^3 box filter minus a threshold = a bright-blob detector; channel 1: off),
    ReLU, max-pool 2 (the explained layer '2'), a small random decoder."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 2, 5, padding=2), nn.ReLU(), nn.MaxPool3d(2), nn.Conv3d(2, 4, 3, padding=1),
                        nn.ReLU(), nn.Upsample(scale_factor=2), nn.Conv3d(4, 2, 1))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].weight[0] = 1.0 / 125.0
        net[0].bias.copy_(torch.tensor([-0.1, 0.0]))
    return net.eval()


@pytest.fixture(scope="module")
def result():
    session = ExplainSession(blob_volume(), detector_net(), Target(class_index=1, region="whole"),
                             EngineOptions(device="cpu", precision="fp32", patch_size=16, divisor=2, overlap=0.5),
                             spacing=(0.5, 0.6, 0.9))
    assert len(session.windows) > 1  # the activation is blended over several windows
    return session.attribute("TopActivatingWindows", {"layer": "2", "channel": 0, "k": 3})


def test_strongest_box_contains_the_blob(result):
    rois = result.outputs["rois"]
    top = rois[0]
    print(f"\ntop box {top['start_ijk']}..{top['stop_ijk']} (peak {top['peak_ijk']}, activation "
          f"{top['activation']:.3f}); blob at {BLOB}")
    assert all(lo <= b < hi for lo, b, hi in zip(top["start_ijk"], BLOB, top["stop_ijk"]))
    assert max(abs(p - b) for p, b in zip(top["peak_ijk"], BLOB)) <= 2
    # effective receptive field of the pooled 5^3 detector: about the filter's size per axis
    assert all(4 <= s <= 8 for s in top["size_voxels"]), top["size_voxels"]
    assert top["receptive_field"] == "measured"
    assert [r["rank"] for r in rois] == [1, 2, 3]
    assert rois[0]["activation"] >= rois[1]["activation"] >= rois[2]["activation"]
    # the activation map is on the input grid, strongest at the blob
    amap = result.map
    assert amap.shape == SHAPE and np.unravel_index(int(np.argmax(amap)), SHAPE) == tuple(top["peak_ijk"])
    assert result.checks and {c.name: c.status for c in result.checks}["target_attribution"] == "not_run"


def test_roi_files_match_simpleitk_and_slicer(result, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    affine = oblique_affine()
    image = Image(array=blob_volume()[None], ijk_to_ras=affine, format="nifti")
    volume_file = tmp_path / "blob.nii.gz"
    write_image(volume_file, image.array, image)
    image = read_image(volume_file)
    written = write_rois(tmp_path, "TopActivatingWindows_2_0", result.outputs["rois"], image,
                         {"method": "TopActivatingWindows", "layer": "2", "channel": 0})
    listing = json.loads((tmp_path / written["rois"]).read_text())
    itk = sitk.ReadImage(str(volume_file))
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    for roi in listing["rois"]:
        expected = np.asarray(itk.TransformContinuousIndexToPhysicalPoint([float(v) for v in roi["centre_ijk"]])) * lps_to_ras
        np.testing.assert_allclose(roi["centre_ras"], expected, atol=1e-4)
        np.testing.assert_allclose(roi["size_mm"], np.asarray(roi["size_voxels"]) * np.asarray(itk.GetSpacing()), rtol=1e-5)
        markup_file = tmp_path / written[f"roi_{roi['rank']}"]
        document = json.loads(markup_file.read_text())
        assert document["@schema"] == MARKUPS_SCHEMA and len(document["markups"]) == 1
        markup = document["markups"][0]
        assert markup["type"] == "ROI" and markup["roiType"] == "Box" and markup["coordinateSystem"] == "LPS"
        assert markup["coordinateUnits"] == "mm" and len(markup["controlPoints"]) == 1
        point = markup["controlPoints"][0]
        assert point["positionStatus"] == "defined"
        lps = expected * lps_to_ras  # the file is in LPS, as Slicer writes markups: ITK's own frame
        np.testing.assert_allclose(point["position"], lps, atol=1e-4)
        np.testing.assert_allclose(markup["center"], lps, atol=1e-4)
        np.testing.assert_allclose(markup["size"], roi["size_mm"], rtol=1e-6)
        # orientation (row-major 3x3): its columns are the volume's IJK axes (ITK's direction, in LPS)
        direction = np.asarray(markup["orientation"]).reshape(3, 3)
        np.testing.assert_allclose(direction, np.asarray(itk.GetDirection()).reshape(3, 3), atol=1e-6)
        ras_direction = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
        _check_with_slicer(markup_file, expected, roi["size_mm"], ras_direction)


def _check_with_slicer(path, centre, size, direction):
    """Slicer's markups JSON reader (slicer-core, when installed) loads the file as the same box, in
    RAS (the scene's frame)."""
    try:
        import slicer
    except ImportError:
        return
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    storage = slicer.vtkMRMLMarkupsROIJsonStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    got = [0.0, 0.0, 0.0]
    node.GetCenter(got)
    np.testing.assert_allclose(got, centre, atol=1e-4)
    np.testing.assert_allclose(list(node.GetSize()), size, rtol=1e-5)
    matrix = node.GetObjectToNodeMatrix()
    rotation = np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])
    np.testing.assert_allclose(rotation, direction, atol=1e-6)
    assert node.GetNumberOfControlPoints() == 1
