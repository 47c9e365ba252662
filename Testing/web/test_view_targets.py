"""Several targets in the review scene and in `esegeta view`: a subject-hierarchy folder per target
in the .mrb, and maps keyed "<target>/<method>" from the result folder and from the .mrb alike
(the viewer's Target menu lists the targets, its Method menu the methods of the chosen one)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import vessel_tubes

pytest.importorskip("trame_slicer", reason="`esegeta view` needs trame-slicer (pip install esegeta[scene])")


@pytest.fixture(scope="module")
def result_folder(tmp_path_factory):
    from EsegetaLib import runner
    from EsegetaLib.io import Image, write_image

    folder = tmp_path_factory.mktemp("targets")
    volume = folder / "tubes.nii.gz"
    array = vessel_tubes((32, 32, 32), ((16, 9), (16, 23)), 2.5)[None]
    write_image(volume, array, Image(array=array, ijk_to_ras=np.diag([0.4, 0.4, 0.4, 1.0]), format="nifti"))
    request = runner.ExplainRequest(volume=volume, methods="Saliency,InputXGradient", region="components",
                                    device="cpu", metrics="deletion,insertion", precision="fp32")
    return runner.execute(runner.prepare(request), folder / "result")


KEYS = ["component_1/Saliency", "component_1/InputXGradient", "component_2/Saliency", "component_2/InputXGradient"]


def test_folder_per_target_in_the_mrb(result_folder):
    from EsegetaLib.slicer.scene import read_review

    scene = read_review(result_folder / "esegeta.mrb")
    sh = scene.GetSubjectHierarchyNode()
    maps = [scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
    maps = [n for n in maps if n.GetAttribute("Esegeta.method")]
    where = {(sh.GetItemName(sh.GetItemParent(sh.GetItemByDataNode(n))), n.GetAttribute("Esegeta.method")) for n in maps}
    assert where == {(k.split("/")[0], k.split("/")[1]) for k in KEYS}


def test_viewer_keys_maps_by_target(result_folder):
    from trame_slicer.core import SlicerApp

    from EsegetaLib.web.result import load_result
    from EsegetaLib.web.scene_setup import load_directory, load_mrb

    result = load_result(result_folder)
    assert result.methods == KEYS  # run order: targets, then methods
    from_dir = load_directory(SlicerApp(), result)
    from_mrb = load_mrb(SlicerApp(), load_result(result_folder / "esegeta.mrb"))
    assert list(from_dir.maps) == KEYS and sorted(from_mrb.maps) == sorted(KEYS)


def test_target_menu_switches_the_methods_and_the_map(result_folder):
    import os

    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    from trame.app import get_server

    from EsegetaLib.web.app import EsegetaViewer
    from EsegetaLib.web.result import load_result

    viewer = EsegetaViewer(load_result(result_folder), get_server("targets_state", client_type="vue3"))
    state = viewer.state
    assert state.targets == ["component_1", "component_2"] and state.target == "component_1"
    assert state.methods == ["Saliency", "InputXGradient"] and state.method == "Saliency"
    assert viewer.current is viewer.scene.maps["component_1/Saliency"]
    viewer._on_method("InputXGradient")
    state.method = "InputXGradient"
    state.target = "component_2"
    viewer._on_target("component_2")
    assert state.method == "InputXGradient" and viewer.current is viewer.scene.maps["component_2/InputXGradient"]


def test_the_curves_shown_are_the_chosen_targets(result_folder):
    """The page's deletion/insertion figure follows the Target menu: each target's own figure."""
    import base64
    import os

    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    from trame.app import get_server

    from EsegetaLib.web.app import EsegetaViewer
    from EsegetaLib.web.result import load_result

    result = load_result(result_folder)
    assert sorted(result.plot_paths) == ["component_1", "component_2"]
    viewer = EsegetaViewer(result, get_server("targets_curves", client_type="vue3"))

    def shown():
        return base64.b64decode(viewer.state.plot_src.split(",", 1)[1])

    assert shown() == (result_folder / "deletion_insertion" / "component_1.png").read_bytes()
    viewer.state.target = "component_2"
    viewer._on_target("component_2")
    assert shown() == (result_folder / "deletion_insertion" / "component_2.png").read_bytes()
    assert shown() != (result_folder / "deletion_insertion" / "component_1.png").read_bytes()
