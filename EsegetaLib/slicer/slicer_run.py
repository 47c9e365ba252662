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

import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..errors import EsegetaError

STATES = ("new", "running", "done", "failed", "cancelled")


def _node_name(node) -> str:
    return node.GetName() if node is not None and node.GetName() else "volume"


def write_volume_node(node, path: str) -> Any:
    """The node's voxels and IJK->RAS (its own coordinates) as a file; returns the `io.Image`."""
    from ..io import Image, write_image
    from .scene import array_from_volume

    array, ijk_to_ras = array_from_volume(node)
    if array.ndim != 3:
        raise EsegetaError(f"'{_node_name(node)}' has {array.shape[3]} components per voxel; Esegeta "
                           "explains scalar volumes: pick a single-component volume.")
    if not np.all(np.isfinite(array)):
        raise EsegetaError(f"'{_node_name(node)}' contains NaN or infinite voxels; fix or mask them first.")
    image = Image(array=np.ascontiguousarray(array[None], dtype=np.float32), ijk_to_ras=ijk_to_ras, format="nrrd")
    write_image(path, image.array, image, dtype=np.float32)
    return image


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

        self.workdir = Path(tempfile.mkdtemp(prefix="esegeta-run-", dir=self._workdir_parent))
        try:
            request = dict(self.request)
            request["volume"] = str(self.workdir / "input.nrrd")
            write_volume_node(self.volume_node, request["volume"])
            region = str(request.get("region", "predicted"))
            if region == "roi":
                with _no_trace(self.scene):
                    request["region"] = "roi:" + self._write_roi_mask()
            elif region == "point":
                request["region"] = "point:" + ",".join(str(v) for v in self._point_voxel())
            job_path = str(self.workdir / "job.json")
            write_job(job_path, make_job(request, str(self.workdir / "result")))
            self.worker = WorkerProcess(job_path, python=self.python, env=self.env).start()
        except BaseException:
            self.cleanup()
            raise
        self.state, self.started = "running", time.monotonic()
        return self

    def _write_roi_mask(self) -> str:
        from ..io import Image, write_image
        from .scene import array_from_volume, segment_mask

        if self.segmentation_node is None:
            raise EsegetaError("Region 'roi' needs a segmentation: choose one (and a segment) under Region.")
        mask = segment_mask(self.segmentation_node, self.volume_node, self.segment_id or None)
        if not np.any(mask):
            raise EsegetaError("The chosen segment is empty on this volume's grid; choose another segment.")
        _, ijk_to_ras = array_from_volume(self.volume_node)
        path = str(self.workdir / "region.nrrd")
        reference = Image(array=mask[None].astype(np.uint8), ijk_to_ras=ijk_to_ras, format="nrrd")
        write_image(path, reference.array, reference, dtype=np.uint8)
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
        """New worker events; the last one of a run is `done` or `error`. Does not touch the scene."""
        if self.worker is None or self.state != "running":
            return []
        events = self.worker.poll()
        final = self.worker.final_event
        if final is not None:
            if final["event"] == "done":
                self.state = "done"
            else:
                self.state = "cancelled" if final.get("kind") == "cancelled" else "failed"
                self.failure = final
                self.cleanup()
        return events

    @property
    def elapsed(self) -> float:
        return 0.0 if self.started is None else time.monotonic() - self.started

    def cancel(self) -> None:
        """Stop the worker for real; the scene is untouched and the temporary files are removed."""
        if self.worker is not None and self.state == "running":
            self.worker.cancel()
            self.worker.poll()
        if self.state in ("new", "running"):
            self.state = "cancelled"
            self.failure = {"event": "error", "kind": "cancelled", "message": "Cancelled.", "details": ""}
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
                      show_3d: bool = False, include_segmentation: bool = True) -> Dict[str, Any]:
        """Read the finished result and add it to the scene (call on the scene's thread)."""
        from .worker import read_result

        if self.state != "done":
            raise EsegetaError("There is no finished run to import.")
        try:
            self.result = read_result(self.worker.final_event["output"])
            self.nodes = import_result(self.scene, self.volume_node, self.result, class_name=self.class_name,
                                       segment_names=self.segment_names, show_method=show_method,
                                       opacity=opacity, show_3d=show_3d,
                                       include_segmentation=include_segmentation)
        finally:
            self.cleanup()
        return self.nodes

    def cleanup(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def metrics_rows(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Rows for the metrics table: the metrics module's columns, runtime as `runtime_s`."""
    rows = []
    for row in result.get("metrics") or []:
        row = dict(row)
        if "seconds" in row and "runtime_s" not in row:
            row["runtime_s"] = row.pop("seconds")
        rows.append(row)
    if not rows:
        for name, entry in ((result.get("run") or {}).get("results") or {}).items():
            rows.append({"method": name, "runtime_s": entry.get("seconds")})
    return rows


def import_result(scene, volume_node, result: Dict[str, Any], *, class_name: Optional[str] = None,
                  segment_names: Optional[Dict[int, str]] = None, show_method: Optional[str] = None,
                  opacity: float = 0.5, show_3d: bool = False, include_segmentation: bool = True) -> Dict[str, Any]:
    """Add a worker result to `scene` next to `volume_node` (same grid, same parent transform):
    folder, maps, segmentation, metrics table, overlay, optional volume rendering. Returns the nodes."""
    from . import colors, scene as bridge

    run = result.get("run") or {}
    target = run.get("target") or {}
    label = class_name or target.get("class_name") or f"class {target.get('class_index', 1)}"
    volume_name = _node_name(volume_node)
    colors.ensure_color_tables(scene)
    parameters = {"parameters": run.get("parameters", {}), "target": target, "engine": run.get("engine", {}),
                  "versions": run.get("versions", {}), "timings": run.get("timings", {})}
    folder = bridge.add_run_folder(scene, f"Esegeta - {volume_name} - {label}", parameters)
    segmentation = None
    labels = result.get("segmentation")
    if include_segmentation and labels is not None and np.any(labels):
        names = dict(segment_names or {})
        names.setdefault(int(target.get("class_index", 1)), label)
        segmentation = bridge.add_segmentation(scene, labels, volume_node, f"{volume_name} - segmentation",
                                               names, folder=folder)
    maps = {}
    for method, values in result["maps"].items():
        entry = (run.get("results") or {}).get(method, {})
        attributes = {"method": method, "class": label, "seconds": entry.get("seconds"),
                      "params": (run.get("parameters") or {}).get("methods", {}).get(method, {}),
                      "diagnostics": entry.get("diagnostics", {})}
        maps[method] = bridge.add_map(scene, values, volume_node, bridge.map_node_name(volume_name, method, label),
                                      signed=bool(result["signed"].get(method)), folder=folder,
                                      attributes=attributes)
    table = bridge.add_metrics_table(scene, metrics_rows(result), f"{volume_name} - metrics", folder=folder)
    shown = maps.get(show_method) if show_method in maps else next(iter(maps.values()), None)
    bridge.show_overlay(scene, volume_node, shown, opacity, segmentation)
    rendering = None
    if show_3d and shown is not None:
        rendering = bridge.show_volume_rendering(scene, shown)
    return {"folder": folder, "maps": maps, "segmentation": segmentation, "table": table, "shown": shown,
            "rendering": rendering}
