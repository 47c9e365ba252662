"""One explanation run started from an MRML scene: the Slicer module's Apply, without Qt.

`SceneRun` reads the chosen nodes (on the caller's thread: the main thread in Slicer), writes the
input volume and region mask as files with `EsegetaLib.io`, starts the background worker
(`EsegetaLib.slicer.worker`), reports its progress when polled, and on success imports the result into the
scene through the scene bridge (`EsegetaLib.slicer.scene`): a run folder with one map per method, the
model's segmentation, the metrics table, the overlay in the slice views and the strongest map in 3D.

Nothing is added to the scene before the worker has finished, so a cancelled or failed run leaves
the scene exactly as it was. Works on desktop Slicer's scene and on a slicer-core scene (tests).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import EsegetaError

STATES = ("new", "running", "done", "failed", "cancelled")


def _node_name(node) -> str:
    return node.GetName() if node is not None and node.GetName() else "volume"


def write_volume_node(node, path: str) -> str:
    """The node's voxels and IJK->RAS (its own coordinates) as an uncompressed NRRD, written by
    Slicer's own storage node straight from VTK memory (no NumPy copy; gzip would freeze Slicer
    for tens of seconds on a 50 M-voxel volume). Refuses multi-component and non-finite volumes."""
    from .scene import scalars_view
    from .slicer_env import slicer_module

    image = node.GetImageData() if node is not None else None
    if image is None:
        raise EsegetaError(f"'{_node_name(node)}' has no voxels; load an image first.")
    if image.GetNumberOfScalarComponents() != 1:
        raise EsegetaError(f"'{_node_name(node)}' has {image.GetNumberOfScalarComponents()} components per voxel; "
                           "Esegeta explains scalar volumes: pick a single-component volume.")
    flat = scalars_view(node)
    if flat.dtype.kind == "f":
        for start in range(0, flat.size, 1 << 20):  # chunk by chunk: no volume-sized temporary
            if not np.all(np.isfinite(flat[start:start + (1 << 20)])):
                raise EsegetaError(f"'{_node_name(node)}' contains NaN or infinite voxels; fix or mask them first.")
    storage = slicer_module().vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.UseCompressionOff()
    if not storage.WriteData(node):
        raise EsegetaError(f"Slicer could not write the input volume to {path}; check the free disk space.")
    return str(path)


# Run folders: RUN_PREFIX + the starting process's id + "-" + random; one per run, removed when the
# run ends, and swept at the next start when the process that made it is gone (a crash or kill).
RUN_PREFIX = "esegeta-run-"
_RUN_FOLDER = re.compile(re.escape(RUN_PREFIX) + r"(\d+)-")


def make_run_folder(parent: Optional[str] = None) -> Path:
    """A new run folder under `parent` (inside Slicer: `slicer.util.tempDirectory("Esegeta", ...)`),
    after sweeping the folders that crashed or killed sessions left there."""
    if parent is not None:
        os.makedirs(parent, exist_ok=True)
        sweep_stale_runs(parent)
    return Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-", dir=parent))


def sweep_stale_runs(parent) -> List[str]:
    """Remove run folders under `parent` whose starting process no longer runs (their worker
    stops by itself when that happens: `worker.watch_parent`). Returns the removed paths."""
    from .worker import process_alive

    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _RUN_FOLDER.match(entry.name)
        if match and entry.is_dir() and int(match.group(1)) != os.getpid() and not process_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(str(entry))
    return removed


@contextmanager
def _no_trace(scene):
    """Remove any node added to `scene` inside the block. Reading a segment onto the volume's grid
    goes through Slicer's exporter, which leaves helper nodes behind (a colour table for its
    temporary label map); the user's scene must not change until the results are imported."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())
                 if scene.GetNthNode(i).GetID() not in before]
        for node in added:
            if node.GetScene() is scene:
                scene.RemoveNode(node)


class SceneRun:
    """Apply -> poll ... -> import (or cancel). Every method is called on one thread (Slicer's main
    thread); the heavy work happens in the worker process."""

    def __init__(self, scene, volume_node, request: Dict[str, Any], *, segmentation_node=None,
                 segment_id: Optional[str] = None, point_node=None, class_name: Optional[str] = None,
                 segment_names: Optional[Dict[int, str]] = None, python: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None, workdir: Optional[str] = None):
        if volume_node is None:
            raise EsegetaError("Choose an input volume first.")
        self.scene = scene
        self.volume_node = volume_node
        self.request = dict(request)
        self.segmentation_node = segmentation_node
        self.segment_id = segment_id
        self.point_node = point_node
        self.class_name = class_name
        self.segment_names = dict(segment_names or {})
        self.python, self.env = python, env
        self._workdir_parent = workdir
        self.workdir: Optional[Path] = None
        self.worker = None
        self.state = "new"
        self.started = None
        self.result: Optional[Dict[str, Any]] = None
        self.nodes: Dict[str, Any] = {}
        self.failure: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ start
    def start(self) -> "SceneRun":
        """Write the inputs and start the worker (returns at once)."""
        from .worker import WorkerProcess, make_job, write_job

        self.workdir = make_run_folder(self._workdir_parent)
        try:
            request = dict(self.request)
            request["volume"] = str(self.workdir / "input.nrrd")
            write_volume_node(self.volume_node, request["volume"])
            request["region"] = self._region_word(str(request.get("region", "predicted")))
            job_path = str(self.workdir / "job.json")
            write_job(job_path, make_job(request, str(self.workdir / "result")))
            self.worker = WorkerProcess(job_path, python=self.python, env=self.env).start()
        except BaseException:
            self.cleanup()
            raise
        self.state, self.started = "running", time.monotonic()
        return self

    def _region_word(self, region: str) -> str:
        """The request's region with what its panel choice needs from the scene appended, as the
        command line spells it: a segment -> `roi:MASKFILE`, a point -> `point:I,J,K`. A new entry
        of `slicer_logic.REGION_CHOICES` that needs a segment or a point gets the same suffix
        (e.g. a connected component at a point: `component:I,J,K`)."""
        from .slicer_logic import REGION_CHOICES

        needs = {choice.region: choice.needs for choice in REGION_CHOICES}.get(region.split(":", 1)[0])
        if ":" in region or needs is None:
            return region
        if needs == "segment":
            with _no_trace(self.scene):
                return f"{region}:{self._write_roi_mask()}"
        if needs == "point":
            return f"{region}:" + ",".join(str(v) for v in self._point_voxel())
        raise EsegetaError(f"Region '{region}' needs '{needs}', which the panel cannot provide.")

    def _write_roi_mask(self) -> str:
        from ..io import Image, write_image
        from .scene import segment_mask, volume_grid

        if self.segmentation_node is None:
            raise EsegetaError("Region 'roi' needs a segmentation: choose one (and a segment) under Region.")
        mask = segment_mask(self.segmentation_node, self.volume_node, self.segment_id or None)
        if not np.any(mask):
            raise EsegetaError("The chosen segment is empty on this volume's grid; choose another segment.")
        _, ijk_to_ras = volume_grid(self.volume_node)
        path = str(self.workdir / "region.nrrd")
        reference = Image(array=mask[None].astype(np.uint8), ijk_to_ras=ijk_to_ras, format="nrrd")
        write_image(path, reference.array, reference, dtype=np.uint8, compress=False)
        return path

    def _point_voxel(self) -> Sequence[int]:
        from .scene import point_to_voxel

        if self.point_node is None or self.point_node.GetNumberOfControlPoints() < 1:
            raise EsegetaError("Region 'point' needs a markup point: place one on the vessel and choose it.")
        voxel = point_to_voxel(self.point_node, self.volume_node, 0)
        shape = self.volume_node.GetImageData().GetDimensions()
        if any(not 0 <= v < s for v, s in zip(voxel, shape)):
            raise EsegetaError("The markup point lies outside the input volume; move it onto the volume.")
        return voxel

    # ------------------------------------------------------------------ poll
    def poll(self) -> List[Dict[str, Any]]:
        """New worker events; the last one of a run is `done` or `error`. Does not touch the scene.
        After a cancel it completes the bookkeeping (the worker's exit, the folder's removal)."""
        if self.worker is None:
            return []
        if self.state != "running":
            if self.state in ("cancelled", "failed") and not self.settled:
                self.worker.poll()
                if self.worker.finished:
                    self.cleanup()
            return []
        events = self.worker.poll()
        final = self.worker.final_event
        if final is not None:
            if final["event"] == "done":
                self.state = "done"
            else:
                self.state = "cancelled" if final.get("kind") == "cancelled" else "failed"
                self.failure = final
                if self.worker.finished:
                    self.cleanup()
        return events

    @property
    def settled(self) -> bool:
        """Nothing left to do: the worker has exited and the run folder is gone."""
        return self.workdir is None and (self.worker is None or self.worker.finished)

    @property
    def elapsed(self) -> float:
        return 0.0 if self.started is None else time.monotonic() - self.started

    def cancel(self, wait: bool = False) -> None:
        """Stop the worker for real; the scene is untouched. Returns at once: `poll()` (the panel's
        timer) completes the bookkeeping, or `wait=True` blocks until the worker is gone and the
        temporary files are removed."""
        if self.worker is not None and self.state == "running":
            self.worker.cancel()
        if self.state in ("new", "running"):
            self.state = "cancelled"
            self.failure = {"event": "error", "kind": "cancelled", "message": "Cancelled.", "details": ""}
        if self.worker is None or self.worker.finished:
            self.cleanup()
        elif wait:
            self.worker.cancel(wait=True)
            self.cleanup()

    def wait(self, timeout: Optional[float] = None, interval: float = 0.1) -> str:
        """Poll until the run ends (scripts, tests and the module's self-test)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state == "running":
            self.poll()
            if self.state != "running":
                break
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise EsegetaError(f"the run did not finish within {timeout} s and was cancelled.")
            time.sleep(interval)
        return self.state

    # ------------------------------------------------------------------ import
    def import_result(self, show_method: Optional[str] = None, opacity: float = 0.5,
                      show_3d: bool = False, include_segmentation: bool = True,
                      between_maps: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
        """Add the finished result to the scene (call on the scene's thread), one map at a time;
        `between_maps(method)` is called before each (the panel processes events there). On a
        failure part-way nothing stays in the scene (see `result_import.import_result`)."""
        from .result_import import import_result

        if self.state != "done":
            raise EsegetaError("There is no finished run to import.")
        try:
            self.nodes = import_result(self.scene, self.volume_node, self.worker.final_event["output"],
                                       class_name=self.class_name, segment_names=self.segment_names,
                                       show_method=show_method, opacity=opacity, show_3d=show_3d,
                                       include_segmentation=include_segmentation, between_maps=between_maps)
        finally:
            self.cleanup()
        return self.nodes

    def cleanup(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
