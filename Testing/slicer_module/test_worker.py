"""The background worker for real: `python -m EsegetaLib.slicer.worker JOB.json` in a subprocess on a small
generated volume and a small TorchScript UNet; progress read while it runs, results read back and
compared with the engine run in this process, a cancel midway that leaves nothing behind, a user
error reported in one line; then the Slicer module's run (`SceneRun`) on a real slicer-core scene."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("captum")

from EsegetaLib.io import Image, read_image, write_image  # noqa: E402
from EsegetaLib.outputs import leftovers  # noqa: E402
from EsegetaLib.slicer.worker import EXIT_CODES, WorkerProcess, make_job, read_result, write_job  # noqa: E402

SHAPE = (32, 32, 24)
METHODS = ["Saliency", "InputXGradient"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An oblique, anisotropic volume with bright tubes (NRRD) and a traced MONAI UNet (.pt)."""
    from conftest import make_unet_instancenorm_prelu

    folder = tmp_path_factory.mktemp("worker")
    net = make_unet_instancenorm_prelu()
    model = folder / "unet.pt"
    torch.jit.trace(net, torch.zeros(1, 1, 32, 32, 32)).save(str(model))
    rng = np.random.default_rng(3)
    volume = rng.normal(0.0, 0.3, size=(1,) + SHAPE).astype(np.float32)
    volume[0, 10:14, :, 8:12] += 2.0
    volume[0, :, 20:23, 14:17] += 2.0
    angle = np.deg2rad(20)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                               [0, 0, 1]]) @ np.diag([0.4, 0.5, 0.8])
    affine[:3, 3] = [12.5, -30.0, 7.25]
    image = Image(volume, affine, "nrrd")
    path = folder / "volume.nrrd"
    write_image(path, volume, image)
    return {"folder": folder, "model": model, "volume": path, "image": read_image(path)}


def start(files, tmp_path, python=None, **request):
    fields = {"volume": files["volume"], "model": files["model"], "methods": METHODS, "region": "whole",
              "metrics": "none", "device": "cpu"}
    fields.update(request)
    output = tmp_path / "result"
    job = write_job(str(tmp_path / "job.json"), make_job(fields, str(output)))
    return WorkerProcess(job, python=python).start(), output


def running_in_group(group):
    """Live (not zombie) processes of a process group, from /proc (Linux) or `ps`."""
    from pathlib import Path

    if Path("/proc").is_dir():
        live = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid, rest = stat.read_text().split(" ", 1)
                state, _ppid, pgid = rest.rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue
            if int(pgid) == group and state != "Z":
                live.append(int(pid))
        return live
    import subprocess

    out = subprocess.run(["ps", "-A", "-o", "pid=,pgid=,stat="], capture_output=True, text=True).stdout
    return [int(p) for p, g, st in (line.split()[:3] for line in out.splitlines()) if int(g) == group and "Z" not in st]


def launcher(tmp_path):
    """A stand-in for Slicer's PythonSlicer: a launcher that runs Python as its child process
    (not exec), so that stopping the launcher alone would leave the computation running."""
    import sys

    path = tmp_path / "PythonLauncher"
    path.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\nexit $?\n')
    path.chmod(0o755)
    return str(path)


def test_worker_reports_progress_and_its_results_read_back_equal_the_engine(files, tmp_path):
    worker, output = start(files, tmp_path)
    events = worker.wait(timeout=600)
    assert worker.final_event["event"] == "done", worker.final_event
    assert worker.returncode == EXIT_CODES["done"]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "done"
    progress = [e for e in events if e["event"] == "progress"]
    fractions = [e["fraction"] for e in progress]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    for method in METHODS:  # the current method is named while it runs
        assert any(method in e["message"] for e in progress), [e["message"] for e in progress]

    result = read_result(worker.final_event["output"])
    assert sorted(result["maps"]) == sorted(METHODS)
    assert result["segmentation"].shape == SHAPE and result["segmentation"].dtype == np.uint8
    # maps on the input grid, voxel for voxel: the written files carry the input's geometry
    for name, entry in result["run"]["results"].items():
        written = read_image(output / entry["file"])
        np.testing.assert_allclose(written.ijk_to_ras, files["image"].ijk_to_ras, atol=1e-6)
        assert written.spatial_shape == SHAPE

    # the same request run by the engine in this process gives the same maps
    from EsegetaLib import runner

    prepared = runner.prepare(runner.ExplainRequest(volume=str(files["volume"]), model=str(files["model"]),
                                                    methods=METHODS, region="whole", metrics="none", device="cpu"))
    from EsegetaLib.work import WorkPlan, method_stages

    stages = method_stages([spec for spec, _ in runner._method_specs(prepared)])
    explanation, *_ = runner._run_engine(prepared, WorkPlan(None, ["segmentation"] + stages), stages, None)
    for name in METHODS:
        reference = explanation.results[name].map
        scale = float(np.abs(reference).max())
        assert scale > 0
        np.testing.assert_allclose(result["maps"][name], reference, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_array_equal(result["segmentation"], explanation.segmentation)


@pytest.mark.skipif(os.name == "nt", reason="the launcher stand-in is a POSIX shell script")
def test_cancel_midway_terminates_and_leaves_nothing_at_the_result_location(files, tmp_path):
    worker, output = start(files, tmp_path, python=launcher(tmp_path), methods=["IntegratedGradients"],
                           params={"IntegratedGradients": {"n_steps": 400}})
    deadline = time.monotonic() + 300
    working = False
    while time.monotonic() < deadline and worker.final_event is None:
        working = any(e["event"] == "progress" and "IntegratedGradients" in e["message"] for e in worker.poll())
        if working:
            break
        time.sleep(0.05)
    assert working, "the worker never started the method"
    group = os.getpgid(worker.process.pid) if os.name != "nt" else None
    worker.cancel()  # returns at once; polling completes the bookkeeping
    deadline = time.monotonic() + 60
    while not (worker.finished and worker.final_event) and time.monotonic() < deadline:
        worker.poll()
        time.sleep(0.05)
    assert worker.final_event["kind"] == "cancelled"
    assert worker.returncode is not None  # the process is gone
    if group is not None:
        assert running_in_group(group) == []  # and so is every process it started
    assert not output.exists()
    assert leftovers(output) == []  # the worker removed its partial result on SIGTERM


def test_user_error_is_one_line_and_writes_nothing(files, tmp_path):
    worker, output = start(files, tmp_path, model=str(tmp_path / "missing.pt"))
    worker.wait(timeout=300)
    event = worker.final_event
    assert event["kind"] == "user" and worker.returncode == EXIT_CODES["user"]
    assert "missing.pt" in event["message"] and "\n" not in event["message"]
    assert "Traceback" in event["details"]
    assert not output.exists() and leftovers(output) == []


def test_out_of_memory_is_recognised_and_suggests_cpu_or_a_smaller_patch():
    from EsegetaLib.slicer.worker import classify_error

    kind, message = classify_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "cuda")
    assert kind == "memory" and "device CPU" in message and "smaller patch" in message
    try:  # a real allocation failure of torch's CPU allocator
        torch.empty(2 ** 50, dtype=torch.uint8)
    except RuntimeError as error:
        kind, message = classify_error(error, "cpu")
    assert kind == "memory" and "device CPU" not in message and "smaller patch" in message
    assert classify_error(MemoryError(), "auto")[0] == "memory"
    assert classify_error(RuntimeError("boom"))[0] == "internal"


# ------------------------------------------------------------------------------------ SceneRun
@pytest.fixture
def scene_with_volume(files):
    pytest.importorskip("slicer", reason="slicer-core is not installed (pip install esegeta[scene])")
    from EsegetaLib.slicer import scene as bridge

    scene = bridge.new_scene()
    bridge.ensure_slice_views(scene)  # Red/Yellow/Green, as desktop Slicer's layout has
    image = files["image"]
    volume = bridge.volume_from_array(scene, image.array[0], image.ijk_to_ras, "TOF")
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[10:14, 4:28, 8:12] = 1
    segmentation = bridge.add_segmentation(scene, labels, volume, "my vessel", {1: "vessel"})
    yield scene, volume, segmentation
    bridge.release_scene(scene)


def node_ids(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def test_scene_run_imports_maps_on_the_input_grid(files, scene_with_volume, tmp_path):
    from EsegetaLib.slicer import colors
    from EsegetaLib.slicer import scene as bridge
    from EsegetaLib.slicer.slicer_run import SceneRun

    scene, volume, segmentation = scene_with_volume
    segment_id = segmentation.GetSegmentation().GetNthSegmentID(0)
    request = {"model": str(files["model"]), "methods": METHODS, "params": {}, "class_index": 1,
               "region": "roi", "device": "cpu", "precision": "fp32", "patch_size": None, "overlap": 0.25,
               "metrics": "none"}
    expected_mask = bridge.segment_mask(segmentation, volume, segment_id)
    assert expected_mask.sum() == 4 * 24 * 4
    before = node_ids(scene)
    run = SceneRun(scene, volume, request, segmentation_node=segmentation, segment_id=segment_id,
                   class_name="vessel", workdir=str(tmp_path)).start()
    workdir = run.workdir
    assert node_ids(scene) == before  # reading the segment left nothing behind
    written = read_image(workdir / "input.nrrd")
    np.testing.assert_array_equal(written.array[0], files["image"].array[0])
    np.testing.assert_allclose(written.ijk_to_ras, files["image"].ijk_to_ras, atol=1e-9)
    np.testing.assert_array_equal(read_image(workdir / "region.nrrd").array[0] > 0, expected_mask)
    assert run.wait(timeout=600) == "done", run.failure
    assert node_ids(scene) == before  # nothing added while it ran
    result = read_result(run.worker.final_event["output"])
    for entry in result["run"]["results"].values():  # exchange files are uncompressed NRRD
        assert b"encoding: raw" in (workdir / "result" / entry["file"]).read_bytes()[:1000]
    imported = []
    nodes = run.import_result(opacity=0.4, between_maps=imported.append)
    assert imported == list(result["maps"])
    assert not workdir.exists()

    assert sorted(nodes["maps"]) == sorted(METHODS)
    for method, node in nodes["maps"].items():
        assert node.GetName() == f"TOF - {method} - vessel"
        values, ijk_to_ras = bridge.array_from_volume(node)
        np.testing.assert_array_equal(values, result["maps"][method])
        np.testing.assert_allclose(ijk_to_ras, files["image"].ijk_to_ras, atol=1e-9)
        table = colors.SIGNED_TABLE if result["signed"][method] else colors.UNSIGNED_TABLE
        assert node.GetScalarVolumeDisplayNode().GetColorNodeID() == colors.color_node_id(table)
    rows = bridge.table_rows(nodes["table"])
    assert [row["method"] for row in rows] == list(result["maps"])
    sh = scene.GetSubjectHierarchyNode()
    assert sh.GetItemName(nodes["folder"]) == "Esegeta - TOF - vessel"
    assert "roi" in sh.GetItemAttribute(nodes["folder"], "Esegeta.parameters")
    composites = [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
                  for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]
    assert len(composites) == 3
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == volume.GetID()
        assert composite.GetForegroundVolumeID() == nodes["shown"].GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.4)


def test_scene_run_cancel_leaves_the_scene_exactly_as_it_was(files, scene_with_volume, tmp_path):
    from EsegetaLib.slicer.slicer_run import SceneRun

    scene, volume, _ = scene_with_volume
    request = {"model": str(files["model"]), "methods": ["IntegratedGradients"],
               "params": {"IntegratedGradients": {"n_steps": 400}}, "region": "whole", "device": "cpu",
               "metrics": "none"}
    before = node_ids(scene)
    modified = volume.GetMTime()
    run = SceneRun(scene, volume, request, workdir=str(tmp_path)).start()
    workdir = run.workdir
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and run.state == "running":
        if any(e["event"] == "progress" and "IntegratedGradients" in e["message"] for e in run.poll()):
            break
        time.sleep(0.05)
    run.cancel()  # returns at once
    assert run.state == "cancelled"
    assert node_ids(scene) == before and volume.GetMTime() == modified
    deadline = time.monotonic() + 60
    while not run.settled and time.monotonic() < deadline:  # the panel's timer does this
        run.poll()
        time.sleep(0.05)
    assert run.settled and run.worker.returncode is not None
    assert not workdir.exists()


def test_scene_run_point_region_becomes_the_voxel_under_the_markup(files, scene_with_volume, tmp_path):
    import json

    from EsegetaLib.errors import EsegetaError
    from EsegetaLib.slicer.slicer_run import SceneRun

    scene, volume, _ = scene_with_volume
    affine = files["image"].ijk_to_ras
    point = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "here")
    point.AddControlPoint(*(affine @ np.array([5.2, 6.9, 7.0, 1.0]))[:3])
    request = {"model": str(files["model"]), "methods": ["Saliency"], "region": "point", "device": "cpu",
               "metrics": "none"}
    run = SceneRun(scene, volume, request, point_node=point, workdir=str(tmp_path)).start()
    try:
        job = json.loads((run.workdir / "job.json").read_text())
        assert job["request"]["region"] == "point:5,7,7"
        assert job["request"]["volume"] == str(run.workdir / "input.nrrd") and job["request"]["scene"] is False
    finally:
        run.cancel(wait=True)
    outside = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "outside")
    outside.AddControlPoint(*(affine @ np.array([-40.0, 6.0, 7.0, 1.0]))[:3])
    with pytest.raises(EsegetaError, match="outside the input volume|outside"):
        SceneRun(scene, volume, request, point_node=outside, workdir=str(tmp_path)).start()
    with pytest.raises(EsegetaError, match="needs a markup point"):
        SceneRun(scene, volume, request, point_node=None, workdir=str(tmp_path)).start()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left by the runs that failed to start


def test_a_job_may_set_every_field_of_the_cli_request_and_nothing_else():
    from dataclasses import fields

    from EsegetaLib.runner import ExplainRequest

    every = {f.name: getattr(ExplainRequest, f.name, None) for f in fields(ExplainRequest)}
    every["volume"] = "v.nrrd"
    job = make_job(every, "out")
    assert set(job["request"]) == set(every)
    assert make_job({"volume": "v.nrrd"}, "out")["request"]["compress"] is False  # exchange files
    with pytest.raises(ValueError, match="unknown request field"):
        make_job({"volume": "v.nrrd", "no_such_field": 1}, "out")


def test_a_new_region_choice_gets_what_it_needs_from_the_scene(files, scene_with_volume, monkeypatch):
    """The extension point for more targets: a choice appended to REGION_CHOICES that needs a point
    gets `word:I,J,K` (a segment: `word:MASKFILE`), as the command line spells them."""
    from EsegetaLib.slicer import slicer_logic
    from EsegetaLib.slicer.slicer_run import SceneRun

    scene, volume, _ = scene_with_volume
    monkeypatch.setattr(slicer_logic, "REGION_CHOICES", slicer_logic.REGION_CHOICES + (
        slicer_logic.RegionChoice("the vessel at a point", "component", "point"),))
    point = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "here")
    point.AddControlPoint(*(files["image"].ijk_to_ras @ np.array([5.0, 7.0, 7.0, 1.0]))[:3])
    run = SceneRun(scene, volume, {"methods": ["Saliency"]}, point_node=point)
    assert run._region_word("component") == "component:5,7,7"
    assert run._region_word("point") == "point:5,7,7"
    assert run._region_word("whole") == "whole" and run._region_word("component:1,2,3") == "component:1,2,3"
