"""A finished worker result (`worker.read_result`'s folder) added to an MRML scene, one map at a time.

Memory: a map is read by Slicer's storage node straight into the new node's VTK memory and its
display range comes from a view of those voxels, so the import needs about one map's size beyond
the nodes it creates (measured in Testing/slicer_module/test_result_import.py), whatever the
number of maps. Nothing is held in NumPy between maps.

Safety: the scene is in batch-processing state while nodes are added (one update at the end), and
a failure part-way removes every node and folder added so far: the scene is as it was before.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from ..errors import EsegetaError
from ..results import target_label, target_segment_names

RESULT_FILE = "run.json"


def _node_name(node) -> str:
    return node.GetName() if node is not None and node.GetName() else "volume"


def read_run(folder) -> Dict[str, Any]:
    """run.json and metrics.json of a result folder (small; no maps loaded)."""
    folder = Path(folder)
    try:
        run = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EsegetaError(f"no readable result in {folder}: {exc}") from exc
    metrics: List[Dict[str, Any]] = []
    metrics_path = folder / "metrics.json"
    if metrics_path.is_file():
        data = json.loads(metrics_path.read_text(encoding="utf-8"))
        table = data.get("methods", data.get("rows")) if isinstance(data, dict) else data
        metrics = list(table or [])
    return {"run": run, "metrics": metrics, "folder": str(folder)}


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


class SceneChanges:
    """Everything added to a scene inside a `with` block is removed again if the block fails
    (nodes and subject-hierarchy items); the scene is in batch-processing state meanwhile."""

    def __init__(self, scene, batch: bool = True):
        self.scene, self.batch = scene, batch

    def __enter__(self) -> "SceneChanges":
        scene = self.scene
        self.nodes_before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
        self.items_before = set(_sh_items(scene))
        if self.batch:
            scene.StartState(scene.BatchProcessState)
        return self

    def __exit__(self, kind, value, traceback) -> None:
        scene = self.scene
        try:
            if kind is not None:
                self.rollback()
        finally:
            if self.batch:
                scene.EndState(scene.BatchProcessState)

    def rollback(self) -> None:
        scene = self.scene
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())
                 if scene.GetNthNode(i).GetID() not in self.nodes_before]
        for node in added:
            if node.GetScene() is scene:
                scene.RemoveNode(node)
        sh = scene.GetSubjectHierarchyNode()
        for item in sorted(set(_sh_items(scene)) - self.items_before, reverse=True):
            if sh.GetItemName(item) is not None and item in set(_sh_items(scene)):
                sh.RemoveItem(item, False, False)


def _sh_items(scene) -> List[int]:
    import vtk

    sh = scene.GetSubjectHierarchyNode()
    ids = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
    return [ids.GetId(i) for i in range(ids.GetNumberOfIds())]


def import_result(scene, volume_node, folder, *, class_name: Optional[str] = None,
                  segment_names: Optional[Dict[int, str]] = None, show_method: Optional[str] = None,
                  opacity: float = 0.5, show_3d: bool = False, include_segmentation: bool = True,
                  between_maps: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Add the result in `folder` to `scene` next to `volume_node` (same grid, same parent
    transform): a subject-hierarchy folder beside the input (its patient/study), the maps one by
    one, the model's segmentation, the metrics table, the overlay and optional volume rendering.
    Returns {"folder", "maps", "segmentation", "table", "shown", "rendering", "run"}."""
    from ..io import read_image
    from . import colors, scene as bridge

    result = read_run(folder)
    run = result["run"]
    folder = Path(folder)
    target = run.get("target") or {}
    label = class_name or target_label(target)
    volume_name = _node_name(volume_node)
    with SceneChanges(scene):
        colors.ensure_color_tables(scene)
        parameters = {"parameters": run.get("parameters", {}), "target": target, "engine": run.get("engine", {}),
                      "versions": run.get("versions", {}), "timings": run.get("timings", {})}
        run_folder = bridge.add_run_folder(scene, f"Esegeta - {volume_name} - {label}", parameters,
                                           input_node=volume_node)
        segmentation = None
        if include_segmentation and run.get("segmentation"):
            labels = read_image(folder / run["segmentation"]).array[0].astype(np.uint8)  # uint8: 1/4 of a map
            if np.any(labels):
                names = dict(segment_names or {})
                explained = target_segment_names(target)
                for index, name in explained.items():  # a name given by the caller names a single class
                    names.setdefault(index, label if class_name and len(explained) == 1 else name)
                segmentation = bridge.add_segmentation(scene, labels, volume_node, f"{volume_name} - segmentation",
                                                       names, folder=run_folder)
            del labels
        maps = {}
        target_folders: Dict[str, int] = {}  # several targets: "<target>/<method>", a folder each
        extras: Dict[str, List[Any]] = {}
        for key, entry in (run.get("results") or {}).items():
            if entry.get("files"):  # feature visualisation volumes, top activating windows as ROIs
                extras[key] = _add_method_files(scene, folder, entry["files"], key, run_folder, volume_node)
            if not entry.get("file"):  # a model-level visualisation: no map on the input's grid (features/)
                continue
            if between_maps is not None:
                between_maps(key)
            method, where, who = bridge.place_by_target(scene, key, run_folder, label, target_folders)
            meta = entry.get("metadata") or {}
            attributes = {"method": method, "class": label, "target": who, "seconds": entry.get("seconds"),
                          "params": (run.get("parameters") or {}).get("methods", {}).get(method, {}),
                          "diagnostics": entry.get("diagnostics", {})}
            signed = bool(meta["signed"]) if "signed" in meta else None
            node = bridge.add_map_file(scene, folder / entry["file"], volume_node,
                                       bridge.map_node_name(volume_name, method, who), signed=signed,
                                       folder=where, attributes=attributes)
            maps[key] = node
        table = bridge.add_metrics_table(scene, metrics_rows(result), f"{volume_name} - metrics", folder=run_folder)
        shown = maps.get(show_method) if show_method in maps else next(iter(maps.values()), None)
    # Views after the batch: the overlay and rendering need the scene's normal updates.
    bridge.show_overlay(scene, volume_node, shown, opacity, segmentation)
    rendering = None
    if show_3d and shown is not None:
        rendering = bridge.show_volume_rendering(scene, shown)
    return {"folder": run_folder, "maps": maps, "segmentation": segmentation, "table": table, "shown": shown,
            "rendering": rendering, "run": run, "extras": extras}


def _add_method_files(scene, folder: Path, files: Dict[str, str], key: str, run_folder: int, volume_node) -> List[Any]:
    """Nodes for a result's method-specific files (EsegetaLib/method_outputs.py), read by Slicer's own
    storage nodes: each `.mrk.json` as a markups ROI, a feature visualisation volume as a volume on
    its own grid (the model's window, centred on the input; named as model-level), both under the
    input's parent transform and in the run's folder."""
    from .slicer_env import slicer_module

    slicer = slicer_module()
    nodes = []
    for what, relative in sorted(files.items()):
        path = folder / relative
        if relative.endswith(".mrk.json"):
            node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", Path(relative).name[:-len(".mrk.json")])
            storage = slicer.vtkMRMLMarkupsROIJsonStorageNode()
        elif what == "feature_volume":
            node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{key} (model-level, not this input)")
            storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
            storage.SetSingleFile(True)
        else:
            continue
        scene.AddNode(storage)
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            raise EsegetaError(f"Slicer could not read {path}; re-run the explanation.")
        node.SetAndObserveStorageNodeID(storage.GetID())
        node.CreateDefaultDisplayNodes()
        node.SetAttribute("Esegeta.method", key)
        if volume_node.GetTransformNodeID():
            node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
        sh = scene.GetSubjectHierarchyNode()
        sh.SetItemParent(sh.GetItemByDataNode(node) or sh.CreateItem(sh.GetSceneItemID(), node), run_folder)
        nodes.append(node)
    return nodes
