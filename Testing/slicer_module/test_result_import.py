"""Importing a worker result into a real slicer-core scene: where it goes in the subject hierarchy,
nothing left behind by a failure part-way, peak extra memory of N maps, and the worker's life
cycle around Slicer (hidden console on Windows, orphan shutdown, stale folders swept)."""
from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core is not installed (pip install esegeta[scene])")

from EsegetaLib.errors import EsegetaError  # noqa: E402
from EsegetaLib.slicer import scene as bridge  # noqa: E402
from EsegetaLib.slicer import worker as W  # noqa: E402
from EsegetaLib.slicer.result_import import _sh_items, import_result  # noqa: E402

from import_memory import write_result  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SHAPE = (20, 18, 12)
AFFINE = np.array([[0.0, -0.5, 0.0, 10.0], [0.6, 0.0, 0.0, -4.0], [0.0, 0.0, 0.8, 2.5], [0, 0, 0, 1.0]])


@pytest.fixture
def scene():
    s = bridge.new_scene()
    yield s
    bridge.release_scene(s)


def node_ids(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def test_result_goes_under_the_inputs_study_and_references_the_input(scene, tmp_path):
    volume = bridge.volume_from_array(scene, np.zeros(SHAPE, np.float32), AFFINE, "TOF")
    sh = scene.GetSubjectHierarchyNode()
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "MRA 2026")
    item = sh.GetItemByDataNode(volume) or sh.CreateItem(sh.GetSceneItemID(), volume)
    sh.SetItemParent(item, study)
    write_result(tmp_path / "result", SHAPE, 2, AFFINE)
    nodes = import_result(scene, volume, tmp_path / "result")
    assert sh.GetItemParent(nodes["folder"]) == study
    assert sh.GetItemAttribute(nodes["folder"], "Esegeta.input") == volume.GetID()
    for name, node in nodes["maps"].items():
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == nodes["folder"]
        assert node.GetNodeReferenceID("Esegeta.input") == volume.GetID()
        written = bridge.array_from_volume(node)
        from EsegetaLib.io import read_image

        expected = read_image(tmp_path / "result" / "attributions" / f"{name}.nrrd")
        np.testing.assert_array_equal(written[0], expected.array[0])  # voxel for voxel
        np.testing.assert_allclose(written[1], bridge.volume_grid(volume)[1], atol=1e-12)  # the input's grid
        np.testing.assert_allclose(written[1], AFFINE, atol=1e-12)
    signed = {name: node.GetAttribute("Esegeta.signed") for name, node in nodes["maps"].items()}
    assert signed == {"Method0": "true", "Method1": "false"}


def test_segmentation_references_its_volume(scene):
    volume = bridge.volume_from_array(scene, np.zeros(SHAPE, np.float32), AFFINE, "TOF")
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:5, 3:9, 4:6] = 1
    segmentation = bridge.add_segmentation(scene, labels, volume, "seg", {1: "vessel"})
    role = segmentation.GetReferenceImageGeometryReferenceRole()
    assert segmentation.GetNodeReferenceID(role) == volume.GetID()


def test_a_failure_part_way_leaves_the_scene_as_it_was(scene, tmp_path):
    volume = bridge.volume_from_array(scene, np.zeros(SHAPE, np.float32), AFFINE, "TOF")
    write_result(tmp_path / "result", SHAPE, 3, AFFINE)
    write_result(tmp_path / "other", (SHAPE[0] + 1,) + SHAPE[1:], 1, AFFINE)
    # the third map is on another grid: the import fails after two maps were added
    (tmp_path / "other" / "attributions" / "Method0.nrrd").replace(tmp_path / "result" / "attributions" / "Method2.nrrd")
    before_nodes, before_items = node_ids(scene), _sh_items(scene)
    seen = []
    with pytest.raises(EsegetaError, match="Method2.nrrd has size"):
        import_result(scene, volume, tmp_path / "result", between_maps=seen.append)
    assert seen == ["Method0", "Method1", "Method2"]  # two maps had been added
    assert node_ids(scene) == before_nodes and _sh_items(scene) == before_items
    assert not scene.IsBatchProcessing()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM reset)")
def test_peak_extra_memory_of_importing_n_maps_is_at_most_two_maps():
    """Measured in a fresh process (command in import_memory.py's docstring)."""
    probe = subprocess.run([sys.executable, str(HERE / "import_memory.py"), "--shape", "160", "128", "96",
                            "--maps", "5"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    if probe.returncode != 0 and "Permission denied" in probe.stderr:
        pytest.skip("this kernel does not let a process reset its peak memory")
    assert probe.returncode == 0, probe.stderr
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    print(report)
    assert report["maps"] == 5 and report["peak_extra_maps"] <= 2.0, report


# ------------------------------------------------------------------------------------ worker life
def test_windows_worker_starts_without_a_console_window():
    options = W.hidden_window_options("nt")
    assert options["creationflags"] & W.CREATE_NO_WINDOW == 0x08000000
    assert options["creationflags"] & W.CREATE_NEW_PROCESS_GROUP == 0x00000200
    if sys.platform == "win32":  # pragma: no cover
        assert options["startupinfo"].wShowWindow == W.SW_HIDE
    assert W.hidden_window_options("posix") == {"start_new_session": True}
    # every process the worker module starts (the worker, taskkill) gets these options
    tree = ast.parse(Path(W.__file__).read_text(encoding="utf-8"))
    popens = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
              and isinstance(node.func, ast.Attribute) and node.func.attr in ("Popen", "run", "call")
              and getattr(node.func.value, "id", "") == "subprocess"]
    assert len(popens) >= 2
    for call in popens:
        spread = [k for k in call.keywords if k.arg is None]
        assert spread, f"line {call.lineno}: a process started without hidden_window_options()"
        value = spread[0].value
        assert (isinstance(value, ast.Call) and getattr(value.func, "id", "") == "hidden_window_options") or (
            isinstance(value, ast.Name) and value.id == "kwargs"), f"line {call.lineno}"
    assert "kwargs = hidden_window_options()" in Path(W.__file__).read_text(encoding="utf-8")


def test_no_fallback_to_the_application_executable_inside_slicer(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(EsegetaError, match="PythonSlicer"):
        W.default_python(in_slicer=True)
    assert W.default_python(in_slicer=False) == sys.executable


PARENT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from EsegetaLib.slicer.slicer_run import make_run_folder
    from EsegetaLib.slicer.worker import WorkerProcess, make_job, write_job
    folder = make_run_folder(sys.argv[2])
    request = {"volume": sys.argv[3], "model": sys.argv[4], "methods": ["IntegratedGradients"],
               "params": {"IntegratedGradients": {"n_steps": 1024}}, "region": "whole", "metrics": "none",
               "device": "cpu"}
    job = write_job(str(folder / "job.json"), make_job(request, str(folder / "result")))
    worker = WorkerProcess(job).start()
    while True:
        if any(e["event"] == "progress" and "IntegratedGradients" in e["message"] for e in worker.poll()):
            print(worker.process.pid, folder, flush=True)
            break
        if worker.final_event is not None:
            print("ended", worker.final_event, flush=True)
            sys.exit(1)
        time.sleep(0.05)
    time.sleep(3600)
""")


@pytest.mark.skipif(os.name == "nt", reason="kills the parent with SIGKILL")
def test_an_orphaned_worker_stops_and_its_folder_is_swept_at_the_next_start(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("captum")
    from conftest import make_unet_instancenorm_prelu

    from EsegetaLib.io import Image, write_image
    from EsegetaLib.slicer.slicer_run import make_run_folder

    model = tmp_path / "unet.pt"
    torch.jit.trace(make_unet_instancenorm_prelu(), torch.zeros(1, 1, 32, 32, 32)).save(str(model))
    volume = np.random.default_rng(1).normal(size=(1, 32, 32, 32)).astype(np.float32)
    write_image(tmp_path / "v.nrrd", volume, Image(volume, np.eye(4), "nrrd"))
    runs = tmp_path / "runs"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(REPO), str(runs), str(tmp_path / "v.nrrd"),
                               str(model)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    line = parent.stdout.readline().split()
    assert len(line) == 2 and line[0].isdigit(), " ".join(line)[:600]
    worker_pid, folder = int(line[0]), Path(line[1])
    assert W.process_alive(worker_pid) and folder.is_dir()
    parent.kill()  # Slicer crashed
    parent.wait()
    deadline = time.monotonic() + 10  # the bound: the worker exits within 10 s
    while W.process_alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not W.process_alive(worker_pid), "the orphaned worker is still running"
    assert folder.is_dir()  # its folder outlives it ...
    fresh = make_run_folder(str(runs))  # ... until the next start sweeps it
    assert not folder.exists() and fresh.is_dir()
    assert sorted(p.name for p in runs.iterdir()) == [fresh.name]


def test_the_parent_watch_itself_ends_the_worker_when_the_parent_is_gone():
    """The watch alone (no broken pipe involved): a process whose 'parent' has exited leaves."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    code = textwrap.dedent(f"""
        import sys, threading, time
        sys.path.insert(0, {str(REPO)!r})
        from EsegetaLib.slicer.worker import watch_parent
        cancel = threading.Event()
        watch_parent("{gone.pid}", cancel, interval=0.1, grace=0.5)
        time.sleep(60)
        print("still running")
    """)
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "still running" not in child.stdout
    assert child.returncode in (-signal.SIGTERM, W.EXIT_CODES["cancelled"])
    assert W.watch_parent(None, None) is None and W.watch_parent("", None) is None


def test_several_targets_import_into_a_folder_per_target(scene, tmp_path):
    """A run with several targets (--region components): each target's maps in its own folder
    under the run's folder, named after the target, voxel for voxel as written."""
    from conftest import vessel_tubes
    from EsegetaLib import runner
    from EsegetaLib.io import Image, read_image, write_image

    affine = np.diag([0.4, 0.4, 0.4, 1.0])
    array = vessel_tubes((32, 32, 32), ((16, 9), (16, 23)), 2.5)[None]
    write_image(tmp_path / "tubes.nii.gz", array, Image(array=array, ijk_to_ras=affine, format="nifti"))
    request = runner.ExplainRequest(volume=tmp_path / "tubes.nii.gz", methods="Saliency", region="components",
                                    device="cpu", metrics="none", precision="fp32", scene=False)
    folder = runner.execute(runner.prepare(request), tmp_path / "result")
    volume = bridge.volume_from_array(scene, array[0], affine, "tubes")
    nodes = import_result(scene, volume, folder)
    sh = scene.GetSubjectHierarchyNode()
    assert sorted(nodes["maps"]) == ["component_1/Saliency", "component_2/Saliency"]
    for key, node in nodes["maps"].items():
        parent = sh.GetItemParent(sh.GetItemByDataNode(node))
        assert sh.GetItemName(parent) == key.split("/")[0] and sh.GetItemParent(parent) == nodes["folder"]
        assert node.GetName() == f"tubes - Saliency - {key.split('/')[0]}"
        np.testing.assert_array_equal(bridge.array_from_volume(node)[0],
                                      read_image(folder / "attributions" / f"{key}.nii.gz").array[0])
