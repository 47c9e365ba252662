"""Geometry through Slicer's two other paths, on representative header variants loaded the way
Slicer loads them (slicer-core's vtkMRMLVolumeArchetypeStorageNode):
- the Slicer module's exchange: the input node written to the worker's temporary NRRD, the worker's
  run (its own function, in this process), its result read back and imported as nodes;
- the `.mrb` review scene `esegeta explain` writes, read back.
Every map and segmentation node has the input node's IJK-to-RAS, and the map values sit on the
voxels (and RAS points) they were computed for."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "cli"))

pytest.importorskip("slicer", reason="slicer-core (pip install esegeta[scene]) not installed")
pytest.importorskip("torch")
sitk = pytest.importorskip("SimpleITK")

import header_family as H  # noqa: E402
from helpers import write_torchscript  # noqa: E402

from EsegetaLib.cli import main  # noqa: E402
from EsegetaLib.io import read_image  # noqa: E402
from EsegetaLib.slicer import scene as S  # noqa: E402
from EsegetaLib.slicer.result_import import import_result  # noqa: E402
from EsegetaLib.slicer.slicer_run import write_volume_node  # noqa: E402
from EsegetaLib.slicer.worker import make_job, read_result, run_job  # noqa: E402

REPRESENTATIVES = H.representatives()
METHODS = ["Saliency", "InputXGradient"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_torchscript(tmp_path_factory.mktemp("model") / "unet.pt")


@pytest.fixture
def scene():
    s = S.new_scene()
    yield s
    S.release_scene(s)


def load_as_slicer(scene, path):
    """A volume node loaded by Slicer's own storage node (ITK inside)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "input")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


def bright_ras(path) -> np.ndarray:
    """RAS points of the bright voxels of the file, as ITK places them (an independent reader)."""
    image = sitk.ReadImage(str(path))
    points = [image.TransformIndexToPhysicalPoint(tuple(int(v) for v in ijk)) for ijk in H.BLOB]
    return np.asarray(points) * [-1.0, -1.0, 1.0]


def ras_of_nonzero(values, ijk_to_ras) -> np.ndarray:
    ijk = np.argwhere(values != 0).T
    return (ijk_to_ras[:3, :3] @ ijk + ijk_to_ras[:3, 3:4]).T


def assert_same_points(a, b):
    a, b = sorted(map(tuple, np.round(a, 3))), sorted(map(tuple, np.round(b, 3)))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-3)


@pytest.mark.parametrize("variant", REPRESENTATIVES, ids=[v.name for v in REPRESENTATIVES])
def test_module_exchange_keeps_the_input_nodes_grid(tmp_path, scene, model, variant):
    path = variant.make(tmp_path)
    node = load_as_slicer(scene, path)
    values, ijk_to_ras = S.array_from_volume(node)

    # What SceneRun.start / the worker / SceneRun.import_result do, with the worker's function in process.
    work = tmp_path / "work"
    work.mkdir()
    write_volume_node(node, str(work / "input.nrrd"))
    job = make_job({"volume": str(work / "input.nrrd"), "model": str(model), "methods": METHODS,
                    "params": {"Saliency": {"absolute": "false"}}, "region": "whole", "metrics": "none",
                    "device": "cpu"}, str(work / "result"))
    run_job(job, progress=lambda fraction, message="": None, cancel=threading.Event())
    result = read_result(str(work / "result"))
    nodes = import_result(scene, node, str(work / "result"))  # what SceneRun.import_result calls

    for method, map_node in nodes["maps"].items():
        map_values, map_matrix = S.array_from_volume(map_node)
        np.testing.assert_allclose(map_matrix, ijk_to_ras, atol=1e-9, rtol=0)  # the input node's IJK-to-RAS
        np.testing.assert_array_equal(map_values, result["maps"][method])
    saliency = S.array_from_volume(nodes["maps"]["Saliency"])[0]
    ixg = S.array_from_volume(nodes["maps"]["InputXGradient"])[0]
    # Computed for the node's own voxels: input x gradient is the node's voxels times the gradient map ...
    np.testing.assert_allclose(ixg, saliency * values, rtol=1e-4, atol=1e-6 * np.abs(ixg).max())
    # ... non-zero exactly at the bright voxels, which are where ITK puts them in the original file.
    assert_same_points(ras_of_nonzero(ixg, ijk_to_ras), bright_ras(path))
    if nodes["segmentation"] is not None:
        np.testing.assert_array_equal(S.segment_mask(nodes["segmentation"], node), result["segmentation"] > 0)


@pytest.mark.parametrize("variant", REPRESENTATIVES[:2], ids=[v.name for v in REPRESENTATIVES[:2]])
def test_review_scene_nodes_share_the_inputs_grid(tmp_path, scene, model, variant, capsys):
    path = variant.make(tmp_path)
    out = tmp_path / "result"
    code = main(["explain", str(path), "--model", str(model), "--out", str(out), "--methods", ",".join(METHODS),
                 "--param", "Saliency.absolute=false", "--region", "whole", "--metrics", "none", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    image = read_image(path)
    S.read_review(out / "esegeta.mrb", scene)
    volumes = [scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
               for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
    assert len(volumes) >= 1 + len(METHODS)
    grids = [S.array_from_volume(v) for v in volumes]
    for (_, matrix), v in zip(grids, volumes):  # every node of the bundle: the input node's IJK-to-RAS
        np.testing.assert_allclose(matrix, grids[0][1], atol=1e-4, rtol=0, err_msg=v.GetName())
    by_name = {v.GetName(): g for v, g in zip(volumes, grids)}
    for method in METHODS:
        name = next(n for n in by_name if f" - {method} - " in n)
        saved = read_image(out / "attributions" / f"{method}{'.nii.gz' if variant.fmt == 'nifti' else '.nrrd'}")
        H.assert_same_world_values(saved.array[0], saved.ijk_to_ras, *by_name[name], f"{method} in the .mrb")
    # The bundle's input node sits where Slicer puts the original file.
    original = H.slicer_volume(scene, path)
    H.assert_same_world_values(image.array[0], image.ijk_to_ras, *original, "input file in Slicer")
    input_node = next(g for n, g in by_name.items() if " - " not in n)
    H.assert_same_world_values(image.array[0], image.ijk_to_ras, *input_node, "input node in the .mrb")


def test_result_off_the_input_grid_is_refused(tmp_path):
    """read_result checks every map against run.json's input geometry rather than trusting it."""
    import json

    from EsegetaLib.errors import EsegetaError
    from EsegetaLib.io import Image, write_image

    grid = H.affine()
    moved = grid.copy()
    moved[:3, 3] += [0.0, 0.0, 2.5]
    values = H.values()
    (tmp_path / "attributions").mkdir()
    write_image(tmp_path / "attributions" / "Saliency.nrrd", values, Image(values[None], moved, "nrrd"))
    write_image(tmp_path / "segmentation.nrrd", values > 100, Image(values[None], grid, "nrrd"))
    (tmp_path / "run.json").write_text(json.dumps({
        "input_geometry": {"ijk_to_ras": grid.tolist()}, "segmentation": "segmentation.nrrd",
        "results": {"Saliency": {"file": "attributions/Saliency.nrrd", "metadata": {"signed": True}}}}))
    with pytest.raises(EsegetaError, match="not on the input volume's grid"):
        read_result(str(tmp_path))
    write_image(tmp_path / "attributions" / "Saliency.nrrd", values, Image(values[None], grid, "nrrd"))
    np.testing.assert_array_equal(read_result(str(tmp_path))["maps"]["Saliency"], values)
