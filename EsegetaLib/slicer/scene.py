"""The MRML scene bridge: Esegeta arrays <-> Slicer nodes, map display, review scenes (.mrb).

Works on any vtkMRMLScene: desktop Slicer's `slicer.mrmlScene`, or one made by `new_scene()` from
the slicer-core wheel (the CLI, tests, `esegeta view`). Only MRML and VTK calls that exist in both
are used (no `slicer.app`, no Qt, no `slicer.util` helpers that need the application).

Conventions: Esegeta arrays are `(I, J, K)` (or `(C, I, J, K)`) with a 4x4 IJK->RAS affine; MRML
image data is stored K-slowest, i.e. a NumPy view of it is `(K, J, I)`. This module is the only place
that transposes between the two.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import colors
from ..errors import EsegetaError
from .slicer_env import SLICER_VERSION, logic, new_scene, release_scene, slicer_module

__all__ = [
    "new_scene", "release_scene", "volume_from_array", "array_from_volume", "add_image", "volume_grid",
    "segment_mask", "point_to_voxel", "add_map", "configure_map_display", "display_range",
    "add_run_folder", "add_segmentation", "show_overlay", "show_volume_rendering",
    "add_metrics_table", "table_rows", "export_review", "read_review", "build_review_scene",
    "map_node_name", "ensure_slice_views", "logic",
    "default_segment_colors", "ATTRIBUTE_PREFIX",
]

# Fraction of the display maximum below which an unsigned map is hidden in slice views.
DEFAULT_THRESHOLD_FRACTION = 0.1
# Robust upper end of the display range: this percentile of |map| over its non-zero voxels.
DEFAULT_PERCENTILE = 99.5
ATTRIBUTE_PREFIX = "Esegeta."
# Voxels beyond which the display percentile is estimated on a regular subsample (a strided view):
# a million samples place the 99.5th percentile well within what a display window needs.
_PERCENTILE_SAMPLE = 1_000_000


# ------------------------------------------------------------------------------------ geometry
def _vtk():
    import vtk

    return vtk


def _vtk_matrix(array: np.ndarray):
    matrix = _vtk().vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _numpy_matrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _check_affine(ijk_to_ras: np.ndarray) -> np.ndarray:
    """A Slicer volume stores spacing + orthonormal directions + origin; refuse what it cannot hold
    (a sheared or singular affine would be silently changed)."""
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)) or not np.allclose(m[3], [0, 0, 0, 1]):
        raise EsegetaError("ijk_to_ras must be a finite 4x4 affine with last row 0 0 0 1")
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise EsegetaError("ijk_to_ras has a zero voxel size; check the image header")
    directions = m[:3, :3] / spacing
    if not np.allclose(directions.T @ directions, np.eye(3), atol=1e-5):
        raise EsegetaError("ijk_to_ras is sheared (axes not perpendicular); Slicer volumes cannot "
                           "hold it: resample the image onto an orthogonal grid first")
    return m


def volume_from_array(scene, array: np.ndarray, ijk_to_ras: np.ndarray, name: str, *,
                      like=None, node_class: str = "vtkMRMLScalarVolumeNode", dtype=None):
    """A new volume node holding `array` (I, J, K) with IJK->RAS `ijk_to_ras`, exactly.

    `like`: a node whose parent transform the new node gets (results stay aligned with an input
    that sits under a transform). `dtype`: stored scalar type (default: the array's)."""
    from vtk.util import numpy_support

    data = np.asarray(array)
    if data.ndim != 3:
        raise EsegetaError(f"volume '{name}' must be 3-D (I, J, K), got shape {data.shape}")
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    m = _check_affine(ijk_to_ras)
    image = _vtk().vtkImageData()
    image.SetDimensions(*(int(n) for n in data.shape))
    # MRML/VTK image memory is I fastest, K slowest: a C-ordered (K, J, I) buffer.
    flat = np.ascontiguousarray(data.transpose(2, 1, 0)).reshape(-1)
    scalars = numpy_support.numpy_to_vtk(flat, deep=True)
    scalars.SetName("ImageScalars")
    image.GetPointData().SetScalars(scalars)
    node = scene.AddNewNodeByClass(node_class, name)
    node.SetIJKToRASMatrix(_vtk_matrix(m))
    node.SetAndObserveImageData(image)
    node.CreateDefaultDisplayNodes()
    if like is not None and like.GetTransformNodeID():
        node.SetAndObserveTransformNodeID(like.GetTransformNodeID())
    return node


def array_from_volume(node) -> Tuple[np.ndarray, np.ndarray]:
    """(array (I, J, K), IJK->RAS 4x4) of a volume node: a copy, in the node's own coordinates
    (its parent transform, if any, is not applied; see `node.GetParentTransformNode()`)."""
    from vtk.util import numpy_support

    image = node.GetImageData() if node is not None else None
    if image is None or image.GetPointData().GetScalars() is None:
        raise EsegetaError(f"volume '{node.GetName() if node else None}' has no voxels; load an image first")
    dims = image.GetDimensions()
    flat = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    components = image.GetNumberOfScalarComponents()
    shape = (dims[2], dims[1], dims[0]) + ((components,) if components > 1 else ())
    kji = flat.reshape(shape)
    ijk = np.moveaxis(kji, (0, 1, 2), (2, 1, 0)).copy()
    matrix = _vtk().vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return ijk, _numpy_matrix(matrix)


def volume_grid(node) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """(shape (I, J, K), IJK->RAS 4x4) of a volume node, without copying its voxels."""
    image = node.GetImageData() if node is not None else None
    if image is None:
        raise EsegetaError(f"volume '{node.GetName() if node else None}' has no voxels; load an image first")
    matrix = _vtk().vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return tuple(int(n) for n in image.GetDimensions()), _numpy_matrix(matrix)


def add_image(scene, image=None, name: str = "input", *, array=None, ijk_to_ras=None) -> List[Any]:
    """Volume nodes for an `EsegetaLib.io.Image` (or `array` (C,I,J,K)/(I,J,K) + `ijk_to_ras`):
    one node per channel, named `name` (and `name [c]` when there are several)."""
    if image is not None:
        array, ijk_to_ras = image.array, image.ijk_to_ras
    data = np.asarray(array)
    if data.ndim == 3:
        data = data[None]
    if data.ndim != 4:
        raise EsegetaError(f"image must be (C, I, J, K) or (I, J, K), got shape {data.shape}")
    nodes = []
    for c in range(data.shape[0]):
        label = name if data.shape[0] == 1 else f"{name} [{c}]"
        node = volume_from_array(scene, data[c], ijk_to_ras, label)
        display = node.GetScalarVolumeDisplayNode()
        if display is not None:
            display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
        nodes.append(node)
    return nodes


def _same_grid(node, reference) -> bool:
    a, b = node.GetImageData(), reference.GetImageData()
    if a is None or b is None or a.GetDimensions() != b.GetDimensions():
        return False
    ma, mb = _vtk().vtkMatrix4x4(), _vtk().vtkMatrix4x4()
    node.GetIJKToRASMatrix(ma)
    reference.GetIJKToRASMatrix(mb)
    return np.allclose(_numpy_matrix(ma), _numpy_matrix(mb), atol=1e-6)


def segment_mask(segmentation_node, volume_node, segment_id: Optional[str] = None) -> np.ndarray:
    """Bool mask (I, J, K) on `volume_node`'s grid: the union of all segments, or `segment_id`.

    Slicer's own exporter resamples the segments onto the volume's grid (through any transforms)."""
    slicer = slicer_module()
    vtk = _vtk()
    segmentation = segmentation_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    if segment_id is not None:
        if segmentation.GetSegment(segment_id) is None:
            names = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
            raise EsegetaError(f"segment '{segment_id}' is not in '{segmentation_node.GetName()}'; "
                               f"choose one of {names}")
        ids.InsertNextValue(segment_id)
    else:
        segmentation_node.GetSegmentation().GetSegmentIDs(ids)
    if ids.GetNumberOfValues() == 0:
        raise EsegetaError(f"segmentation '{segmentation_node.GetName()}' has no segments; draw one first")
    scene = volume_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__esegeta_mask__")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, volume_node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        if not ok or labelmap.GetImageData() is None:
            raise EsegetaError(f"could not export '{segmentation_node.GetName()}' onto "
                               f"'{volume_node.GetName()}'; check that they overlap")
        labels, _ = array_from_volume(labelmap)
        if not _same_grid(labelmap, volume_node):  # pragma: no cover - Slicer guarantees it
            raise RuntimeError("segment export did not follow the reference volume's grid")
        return labels > 0
    finally:
        scene.RemoveNode(labelmap)


def point_to_voxel(markups_node, volume_node, point_index: int = 0) -> Tuple[int, int, int]:
    """(i, j, k) voxel of `volume_node` nearest to control point `point_index` of a markups node,
    through both nodes' transforms."""
    vtk = _vtk()
    if point_index >= markups_node.GetNumberOfControlPoints():
        raise EsegetaError(f"markup '{markups_node.GetName()}' has no point {point_index + 1}; place one first")
    world = [0.0, 0.0, 0.0]
    markups_node.GetNthControlPointPositionWorld(point_index, world)
    to_local = vtk.vtkGeneralTransform()
    slicer = slicer_module()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, volume_node.GetParentTransformNode(), to_local)
    local = to_local.TransformPoint(world)
    ras_to_ijk = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(ras_to_ijk)
    ijk = ras_to_ijk.MultiplyPoint(list(local) + [1.0])[:3]
    voxel = tuple(int(np.floor(v + 0.5)) for v in ijk)
    dims = volume_node.GetImageData().GetDimensions()
    if any(v < 0 or v >= n for v, n in zip(voxel, dims)):
        raise EsegetaError(f"point {point_index + 1} of '{markups_node.GetName()}' lies outside "
                           f"'{volume_node.GetName()}'; move it into the volume")
    return voxel


# --------------------------------------------------------------------------------- map display
def display_range(values: np.ndarray, signed: bool, percentile: float = DEFAULT_PERCENTILE,
                  threshold_fraction: float = DEFAULT_THRESHOLD_FRACTION) -> Dict[str, float]:
    """Fixed display settings for a map: window [low, high] from a robust percentile of |map| over
    its non-zero voxels (symmetric for signed maps) and, for unsigned maps, a lower threshold that
    hides near-zero values. Robust so that a few extreme voxels do not wash out the rest.

    Memory: no copy of the whole map is made (a 1 GB map must not need 3 GB more to be shown).
    The percentile comes from a regular strided view of at most `_PERCENTILE_SAMPLE` voxels (exact
    below that size), the minimum and maximum from fixed-size chunks."""
    v = np.asarray(values).reshape(-1)  # a view for any contiguous array (VTK's included)
    step = -(-v.size // _PERCENTILE_SAMPLE) if v.size else 1
    sample = v[::step]  # a strided view: at most _PERCENTILE_SAMPLE voxels
    nonzero = sample[np.isfinite(sample) & (sample != 0)]  # the one copy, of the sample only
    np.abs(nonzero, out=nonzero)
    high = float(np.percentile(nonzero, percentile, overwrite_input=True)) if nonzero.size else 1.0
    if high <= 0:
        high = float(nonzero.max()) if nonzero.size else 1.0
    vmin, vmax = _finite_min_max(v)
    vmax = high if vmax is None else vmax
    vmin = -high if vmin is None else vmin
    if signed:
        return {"low": -high, "high": high, "threshold_low": min(vmin, -high),
                "threshold_high": max(vmax, high), "apply_threshold": False}
    return {"low": 0.0, "high": high, "threshold_low": threshold_fraction * high,
            "threshold_high": max(vmax, high), "apply_threshold": True}


def _finite_min_max(flat: np.ndarray, chunk: int = 1 << 20) -> Tuple[Optional[float], Optional[float]]:
    """Minimum and maximum of the finite values of a 1-D array, chunk by chunk (temporaries of
    `chunk` elements at most); (None, None) when there is none."""
    lows, highs = [], []
    for start in range(0, flat.size, chunk):
        part = flat[start:start + chunk]
        finite = part[np.isfinite(part)]
        if finite.size:
            lows.append(float(finite.min()))
            highs.append(float(finite.max()))
    return (min(lows), max(highs)) if lows else (None, None)


def scalars_view(node) -> np.ndarray:
    """The voxels of a volume node as a flat NumPy view of its VTK array (no copy; valid while the
    node keeps this image data)."""
    from vtk.util import numpy_support

    image = node.GetImageData() if node is not None else None
    if image is None or image.GetPointData().GetScalars() is None:
        raise EsegetaError(f"volume '{node.GetName() if node else None}' has no voxels; load an image first")
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())


def configure_map_display(node, signed: bool, settings: Optional[Mapping[str, float]] = None,
                          table: Optional[str] = None) -> Dict[str, float]:
    """Colour table (Inferno / DivergingBlueRed, desktop Slicer's IDs), fixed window (auto W/L off)
    and threshold on `node`'s display node; returns the settings used."""
    if settings is None:
        settings = display_range(scalars_view(node), signed)
    scene = node.GetScene()
    colors.ensure_color_tables(scene)
    table = table or (colors.SIGNED_TABLE if signed else colors.UNSIGNED_TABLE)
    display = node.GetScalarVolumeDisplayNode()
    if display is None:
        node.CreateDefaultDisplayNodes()
        display = node.GetScalarVolumeDisplayNode()
    was = display.StartModify()
    display.SetAndObserveColorNodeID(colors.color_node_id(table))
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(settings["low"], settings["high"])
    display.SetAutoThreshold(False)
    display.SetThreshold(settings["threshold_low"], settings["threshold_high"])
    display.SetApplyThreshold(bool(settings["apply_threshold"]))
    display.SetInterpolate(True)
    display.EndModify(was)
    node.SetAttribute(ATTRIBUTE_PREFIX + "signed", "true" if signed else "false")
    return dict(settings)


def map_node_name(volume_name: str, method: str, class_name: str) -> str:
    return f"{volume_name} - {method} - {class_name}"


def _json_ready(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 64 else f"array{tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def place_by_target(scene, key: str, folder: int, label: str, target_folders: Dict[str, int]):
    """Where a result keyed "<method>" or, with several targets, "<target>/<method>" goes.

    Returns (method, subject-hierarchy folder item, target name shown). Several targets get a
    folder each under `folder`, created once and remembered in `target_folders`.
    """
    target, several, method = key.rpartition("/")
    if not several:
        return method, folder, label
    if target not in target_folders:
        target_folders[target] = scene.GetSubjectHierarchyNode().CreateFolderItem(folder, target)
    return method, target_folders[target], target


def add_run_folder(scene, name: str, parameters: Mapping[str, Any], input_node=None) -> int:
    """A subject-hierarchy folder for one run, with the run's parameters as item attributes
    (`Esegeta.parameters` holds them all as JSON; each top-level key also as `Esegeta.<key>`).

    With `input_node`, the folder goes where the input volume sits (its patient/study for DICOM
    data, as desktop Slicer's modules place derived data) and names it (`Esegeta.input` = the
    input's node ID); otherwise under the scene."""
    sh = scene.GetSubjectHierarchyNode()
    parent = sh.GetSceneItemID()
    if input_node is not None:
        item = sh.GetItemByDataNode(input_node)
        if item and sh.GetItemParent(item):
            parent = sh.GetItemParent(item)
    folder = sh.CreateFolderItem(parent, name)
    ready = _json_ready(dict(parameters))
    sh.SetItemAttribute(folder, ATTRIBUTE_PREFIX + "parameters", json.dumps(ready, sort_keys=True))
    for key, value in ready.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        sh.SetItemAttribute(folder, ATTRIBUTE_PREFIX + key, text)
    if input_node is not None:
        sh.SetItemAttribute(folder, ATTRIBUTE_PREFIX + "input", input_node.GetID())
    return folder


def _put_in_folder(node, folder: Optional[int]) -> None:
    if folder is None:
        return
    sh = node.GetScene().GetSubjectHierarchyNode()
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(sh.GetSceneItemID(), node)
    sh.SetItemParent(item, folder)


def add_map(scene, values: np.ndarray, reference_node, name: str, *, signed: bool,
            folder: Optional[int] = None, attributes: Optional[Mapping[str, Any]] = None,
            settings: Optional[Mapping[str, float]] = None):
    """A float32 map volume on `reference_node`'s grid (and under its transform), displayed with
    fixed range and threshold, placed in the run's folder."""
    shape, ijk_to_ras = volume_grid(reference_node)
    data = np.asarray(values, dtype=np.float32)
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.shape != shape:
        raise EsegetaError(f"map '{name}' has shape {data.shape} but the input volume is "
                           f"{shape}; maps must be on the input's grid")
    node = volume_from_array(scene, data, ijk_to_ras, name, like=reference_node)
    configure_map_display(node, signed, settings if settings is not None else display_range(data, signed))
    for key, value in (attributes or {}).items():
        text = value if isinstance(value, str) else json.dumps(_json_ready(value), sort_keys=True)
        node.SetAttribute(ATTRIBUTE_PREFIX + key, text)
    _put_in_folder(node, folder)
    return node


def read_volume_file(scene, path, reference_node, name: str, node_class: str = "vtkMRMLScalarVolumeNode"):
    """A new node in `scene` holding the volume file `path` (NRRD/NIfTI, read by Slicer's own
    storage node straight into VTK memory: no NumPy copies), on `reference_node`'s grid and under
    its parent transform. The file must be on that grid (same size; its geometry is checked and
    then taken exactly from the reference). Raises `EsegetaError` otherwise; adds nothing then."""
    slicer = slicer_module()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetSingleFile(True)
    node = scene.AddNewNodeByClass(node_class, name)
    try:
        if not storage.ReadData(node) or node.GetImageData() is None:
            raise EsegetaError(f"Slicer could not read {path}")
        shape, ijk_to_ras = volume_grid(reference_node)
        if tuple(node.GetImageData().GetDimensions()) != shape:
            raise EsegetaError(f"{path} has size {node.GetImageData().GetDimensions()}, not the input's {shape}")
        matrix = _vtk().vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        if not np.allclose(_numpy_matrix(matrix), ijk_to_ras, atol=1e-4 * max(1.0, float(np.abs(ijk_to_ras).max()))):
            raise EsegetaError(f"{path} is not on the input volume's grid")
        node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras))  # exactly the input's (no float32 header round trip)
        if reference_node.GetTransformNodeID():
            node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
        node.CreateDefaultDisplayNodes()
    except BaseException:
        scene.RemoveNode(node)
        raise
    return node


def add_map_file(scene, path, reference_node, name: str, *, signed: Optional[bool],
                 folder: Optional[int] = None, attributes: Optional[Mapping[str, Any]] = None):
    """`add_map` for a map on disk: read by Slicer's storage node (`read_volume_file`), display
    range from a view of the node's own voxels; peak extra memory about one map (the reader's).
    `signed=None`: signed if any voxel is negative. The node references the input
    (`Esegeta.input`)."""
    node = read_volume_file(scene, path, reference_node, name)
    try:
        if signed is None:
            signed = bool(np.any(scalars_view(node) < 0))
        configure_map_display(node, signed)
        for key, value in (attributes or {}).items():
            text = value if isinstance(value, str) else json.dumps(_json_ready(value), sort_keys=True)
            node.SetAttribute(ATTRIBUTE_PREFIX + key, text)
        node.SetNodeReferenceID(ATTRIBUTE_PREFIX + "input", reference_node.GetID())
        _put_in_folder(node, folder)
    except BaseException:
        scene.RemoveNode(node)
        raise
    return node


# ------------------------------------------------------------------------------- segmentation
def default_segment_colors(n: int) -> List[Tuple[float, float, float]]:
    """Distinct colours for labels 1..n (matplotlib tab10), green first like vessel reviews."""
    from matplotlib import colormaps

    tab = colormaps["tab10"]
    order = [2, 3, 0, 1, 4, 5, 6, 8, 9, 7]
    return [tuple(float(c) for c in tab(order[i % len(order)])[:3]) for i in range(n)]


def add_segmentation(scene, labels: np.ndarray, reference_node, name: str,
                     segment_names: Optional[Mapping[int, str]] = None,
                     segment_colors: Optional[Mapping[int, Sequence[float]]] = None,
                     folder: Optional[int] = None):
    """A segmentation node from a label map (I, J, K) on `reference_node`'s grid: one named,
    coloured segment per non-zero label (binary labelmap master, outline in slice views)."""
    slicer = slicer_module()
    seg_logic = logic(scene, "Segmentations")
    if seg_logic is None:
        # The segmentation converters are registered when the logic is created.
        seg_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    labels = np.asarray(labels)
    shape, ijk_to_ras = volume_grid(reference_node)
    if labels.shape != shape:
        raise EsegetaError(f"segmentation '{name}' has shape {labels.shape} but the volume is {shape}")
    values = [int(v) for v in np.unique(labels) if v != 0]
    labelmap = volume_from_array(scene, labels.astype(np.int16), ijk_to_ras, "__esegeta_labels__",
                                 node_class="vtkMRMLLabelMapVolumeNode", like=reference_node)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    # The reference volume as a node reference too (what DICOM SEG export looks for).
    segmentation.SetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole(), reference_node.GetID())
    if reference_node.GetTransformNodeID():
        segmentation.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
        if not ok:
            raise RuntimeError("Slicer could not import the label map into a segmentation")
    finally:
        scene.RemoveNode(labelmap)
    seg = segmentation.GetSegmentation()
    palette = default_segment_colors(max(values) if values else 0)
    for i in range(seg.GetNumberOfSegments()):
        segment = seg.GetNthSegment(i)
        value = int(segment.GetLabelValue())
        segment.SetName((segment_names or {}).get(value, f"label {value}"))
        color = (segment_colors or {}).get(value) or palette[value - 1]
        segment.SetColor(*[float(c) for c in color[:3]])
    display = segmentation.GetDisplayNode()
    display.SetVisibility2DFill(False)
    display.SetVisibility2DOutline(True)
    display.SetSliceIntersectionThickness(2)
    _put_in_folder(segmentation, folder)
    return segmentation


# ----------------------------------------------------------------------------- views (MRML)
def show_overlay(scene, background, foreground, opacity: float = 0.5, segmentation=None) -> None:
    """Every slice view: `foreground` (a map) at `opacity` over `background` (the input), with the
    segmentation's outline on top (outline only, so the map stays visible inside it)."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        was = composite.StartModify()
        composite.SetBackgroundVolumeID(background.GetID() if background else None)
        composite.SetForegroundVolumeID(foreground.GetID() if foreground else None)
        composite.SetForegroundOpacity(float(opacity))
        composite.EndModify(was)
    if segmentation is not None:
        display = segmentation.GetDisplayNode()
        display.SetVisibility(True)
        display.SetVisibility2DOutline(True)
        display.SetVisibility2DFill(False)


def show_only_in_3d(scene, map_node, visible: bool = True):
    """Show `map_node` alone among Esegeta's maps in 3D (or hide them all): its volume rendering is
    created with `show_volume_rendering` the first time, and kept afterwards (edits the user made
    in the Volume Rendering module survive). Returns its display node, or None."""
    vr_logic = logic(scene, "VolumeRendering")
    if vr_logic is None:
        return None
    if visible and vr_logic.GetFirstVolumeRenderingDisplayNode(map_node) is None:
        show_volume_rendering(scene, map_node)
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        display = vr_logic.GetFirstVolumeRenderingDisplayNode(node) if node.GetAttribute(ATTRIBUTE_PREFIX + "method") else None
        if display is not None:
            display.SetVisibility(bool(visible) and node is map_node)
    return vr_logic.GetFirstVolumeRenderingDisplayNode(map_node)


def show_volume_rendering(scene, map_node, visible_fraction: float = 0.5, opacity: float = 0.8):
    """Volume-render `map_node` in every 3D view with a transfer function that shows only the
    strongest attributions: opacity 0 below `visible_fraction` of the display maximum (of |map| for
    signed maps), rising to `opacity` at the maximum; colours from the map's colour table.
    Returns the display node, or None where no volume rendering logic exists."""
    vr_logic = logic(scene, "VolumeRendering")
    if vr_logic is None:
        return None
    display = vr_logic.GetFirstVolumeRenderingDisplayNode(map_node)
    if display is None:
        display = vr_logic.CreateDefaultVolumeRenderingNodes(map_node)
    settings = map_node.GetScalarVolumeDisplayNode()
    low, high = settings.GetWindowLevelMin(), settings.GetWindowLevelMax()
    signed = map_node.GetAttribute(ATTRIBUTE_PREFIX + "signed") == "true"
    top = max(abs(low), abs(high)) if signed else high
    start = visible_fraction * top
    prop = display.GetVolumePropertyNode().GetVolumeProperty()
    opacity_tf = prop.GetScalarOpacity()
    opacity_tf.RemoveAllPoints()
    if signed:
        for x, y in ((-top, opacity), (-start, 0.0), (start, 0.0), (top, opacity)):
            opacity_tf.AddPoint(x, y)
    else:
        for x, y in ((min(0.0, low), 0.0), (start, 0.0), (top, opacity)):
            opacity_tf.AddPoint(x, y)
    color_tf = prop.GetRGBTransferFunction()
    color_tf.RemoveAllPoints()
    table = scene.GetNodeByID(settings.GetColorNodeID())
    lut = table.GetLookupTable()
    n = table.GetNumberOfColors()
    for i in range(n):
        r, g, b, _ = lut.GetTableValue(i)
        color_tf.AddRGBPoint(low + (high - low) * i / max(n - 1, 1), r, g, b)
    prop.ShadeOff()
    display.SetVisibility(True)
    map_node.SetAttribute(ATTRIBUTE_PREFIX + "volume_rendering_fraction", str(visible_fraction))
    return display


# ----------------------------------------------------------------------------------- tables
# Known columns: title, unit, description (keys as the CLI runner and `EsegetaLib.metrics` name them).
# Unknown metrics get their key as title and no unit.
COLUMN_INFO = {
    "method": ("Method", "", "Attribution method"),
    "runtime_s": ("Runtime", "s", "Wall-clock time of the method"),
    "attribution_s": ("Runtime", "s", "Wall-clock time of the attribution"),
    "attribution_peak_mb": ("Peak memory", "MB", "Peak memory while attributing"),
    "device": ("Device", "", "Where the method ran"),
    "convergence_delta": ("IG delta", "", "Integrated Gradients completeness error (max |delta|)"),
    "infidelity": ("Infidelity", "", "Captum infidelity (lower is better)"),
    "infidelity_rel": ("Infidelity (rel.)", "", "Infidelity / mean squared score change (0 best, 1 = "
                       "no better than predicting no change)"),
    "sensitivity_max": ("Max-sensitivity", "", "Captum sensitivity_max (lower is better)"),
    "sensitivity_avg": ("Avg-sensitivity", "", "Mean sensitivity (lower is better)"),
    "deletion_auc": ("Deletion AUC", "", "Area under the deletion curve (lower is better)"),
    "insertion_auc": ("Insertion AUC", "", "Area under the insertion curve (higher is better)"),
    "relevance_mass": ("Relevance mass", "", "Share of positive relevance inside the segmentation"),
    "relevance_rank": ("Relevance rank", "", "Share of top-ranked voxels inside the segmentation"),
    "sparseness": ("Sparseness", "", "Gini index of |map| (higher is sparser)"),
    "complexity": ("Complexity", "nats", "Entropy of |map| / sum |map| (lower is simpler)"),
    "randomisation_spearman": ("Randomisation rho", "", "Spearman rank correlation with the map of a "
                               "randomised model (lower is better)"),
    "randomisation_ssim": ("Randomisation SSIM", "", "SSIM with the map of a randomised model"),
    "randomisation_pass": ("Randomisation pass", "", "1 if the map changed under weight randomisation"),
    "trust": ("Trust report", "", "Each check of the map: name=pass|warn|fail|not_run (the number behind it): "
              "completeness, rectifier rule, layer gradient, determinism, randomisation"),
    "steps_used_mean": ("Steps used", "", "Integration steps per window (adaptive path methods), mean"),
    "relative_convergence_delta": ("Completeness error", "", "|sum(map) - (F(x) - F(baseline))| / |F(x) - F(baseline)|"),
}
_LAST_COLUMNS = ("runtime_s", "attribution_s", "attribution_peak_mb", "device")


def _six_digits(value: float) -> float:
    """Slicer's table files keep 6 significant digits; rounding when the table is made means the
    scene holds the same numbers before and after saving (full precision is in metrics.json)."""
    return float(f"{value:.6g}")


def _is_number(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, np.integer, np.floating))


def add_metrics_table(scene, rows: Sequence[Mapping[str, Any]], name: str = "Esegeta metrics",
                      columns: Optional[Mapping[str, Tuple[str, str, str]]] = None,
                      folder: Optional[int] = None):
    """A table node: one row per method (`rows[i]["method"]`), a column per metric (numbers), then
    runtime, memory and device. `columns`: key -> (title, unit, description), added to
    `COLUMN_INFO`. Missing values are NaN; text (or anything not a number) is a string column."""
    vtk = _vtk()
    info = dict(COLUMN_INFO)
    info.update(columns or {})
    keys: List[str] = []
    for row in rows:
        for key in row:
            if key not in keys:
                keys.append(key)
    front = [k for k in ("method",) if k in keys]
    back = [k for k in _LAST_COLUMNS if k in keys]
    keys = front + [k for k in keys if k not in front + back] + back
    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = table_node.GetTable()
    for key in keys:
        textual = not all(_is_number(row.get(key)) for row in rows)
        column = vtk.vtkStringArray() if textual else vtk.vtkDoubleArray()
        column.SetName(key)
        for row in rows:
            value = row.get(key)
            if textual:
                text = value if isinstance(value, str) else json.dumps(_json_ready(value))
                column.InsertNextValue("" if value is None else text)
            else:
                column.InsertNextValue(float("nan") if value is None else _six_digits(float(value)))
        table.AddColumn(column)
    for key in keys:
        title, unit, description = info.get(key, (key, "", ""))
        table_node.SetColumnTitle(key, title)
        table_node.SetColumnUnitLabel(key, unit)
        table_node.SetColumnDescription(key, description)
    table_node.SetUseColumnTitleAsColumnHeader(True)
    table_node.SetLocked(True)
    _put_in_folder(table_node, folder)
    return table_node


def table_rows(table_node) -> List[Dict[str, Any]]:
    """The table's cells as a list of dicts (numbers as float), for tests and the CLI."""
    table = table_node.GetTable()
    rows = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for c in range(table.GetNumberOfColumns()):
            column = table.GetColumn(c)
            value = column.GetValue(r)
            row[column.GetName()] = value if column.IsA("vtkStringArray") else float(value)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ .mrb bundles
def export_review(scene, path) -> str:
    """Write `scene` as a Slicer data bundle (.mrb) at `path`, atomically: written in a temporary
    folder beside it (the bundle's inner folder is named after the file, so the name must already
    be final there), then renamed. The scene carries a desktop Slicer version string."""
    vtk = _vtk()
    path = Path(path).resolve()
    if path.suffix.lower() != ".mrb":
        raise EsegetaError(f"{path}: a review scene must end in .mrb")
    path.parent.mkdir(parents=True, exist_ok=True)
    scene.SetVersion(SLICER_VERSION)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", dir=path.parent))
    root, url = scene.GetRootDirectory(), scene.GetURL()
    # vtkArchive reports every zipped file as an "Info" message; keep the user's terminal quiet.
    previous_output = vtk.vtkOutputWindow.GetInstance()
    previous_output.Register(None)
    vtk.vtkOutputWindow.SetInstance(vtk.vtkStringOutputWindow())
    try:
        temporary = staging / path.name
        scene.SetRootDirectory(str(staging))
        scene.SetURL(str(staging / f"{path.stem}.mrml"))
        ok = scene.WriteToMRB(str(temporary))
        if not ok or not zipfile.is_zipfile(temporary):
            raise EsegetaError(f"could not write {path}: Slicer failed to save the scene (disk full?)")
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        vtk.vtkOutputWindow.SetInstance(previous_output)
        previous_output.UnRegister(None)
        scene.SetRootDirectory(root or "")
        scene.SetURL(url or "")
        shutil.rmtree(staging, ignore_errors=True)
    return str(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_review(path, scene=None):
    """Load a .mrb into a new slicer-core scene (or `scene`) and return the scene."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise EsegetaError(f"{path}: not a Slicer .mrb bundle")
    scene = scene if scene is not None else new_scene()
    with tempfile.TemporaryDirectory(prefix="esegeta-mrb-") as workdir:
        with zipfile.ZipFile(path) as bundle:
            bundle.extractall(workdir)
        scenes = sorted(Path(workdir).rglob("*.mrml"))
        if not scenes:
            raise EsegetaError(f"{path}: the bundle holds no .mrml scene")
        scene.SetURL(str(scenes[0]))
        scene.SetRootDirectory(str(scenes[0].parent))
        if not scene.Import():
            raise EsegetaError(f"{path}: Slicer could not read the scene")
    return scene


# ------------------------------------------------------------------------- the review scene
def _class_name(explanation, class_name: Optional[str]) -> str:
    if class_name:
        return class_name
    from ..results import target_label

    return target_label(getattr(explanation, "target", {}) or {})


def _is_signed(result) -> bool:
    """Signed as the method declares it; a map declared unsigned that still has clearly negative
    values is shown as signed too, so the display never hides half of the evidence."""
    meta = getattr(result, "metadata", {}) or {}
    values = result.map
    peak = float(np.nanmax(np.abs(values))) if values.size else 0.0
    has_negative = peak > 0 and float(np.nanmin(values)) < -1e-3 * peak
    return bool(meta.get("signed", False)) or has_negative


def build_review_scene(image, explanation, metrics_rows: Sequence[Mapping[str, Any]] = (),
                       run_parameters: Optional[Mapping[str, Any]] = None, *, scene=None,
                       volume_name: str = "input", class_name: Optional[str] = None,
                       segment_names: Optional[Mapping[int, str]] = None, show_method: Optional[str] = None,
                       opacity: float = 0.5, include_segmentation: bool = True) -> Dict[str, Any]:
    """Fill a scene (new unless given) with the input, the segmentation, one map per method in a run
    folder, the metrics table, the overlay and volume rendering of one map. Returns a dict with the
    scene and the created nodes: input, segmentation, maps {method: node}, table, folder, shown."""
    scene = scene if scene is not None else new_scene()
    colors.ensure_color_tables(scene)
    if isinstance(image, tuple):
        array, affine = image
        inputs = add_image(scene, None, volume_name, array=array, ijk_to_ras=affine)
    else:
        inputs = add_image(scene, image, volume_name)
    reference = inputs[0]
    label = _class_name(explanation, class_name)
    parameters = dict(run_parameters or {})
    parameters.setdefault("target", getattr(explanation, "target", {}))
    parameters.setdefault("engine", getattr(explanation, "engine", {}))
    parameters.setdefault("methods", {n: r.params for n, r in explanation.results.items()})
    folder = add_run_folder(scene, f"Esegeta - {volume_name} - {label}", parameters)
    for node in inputs:
        _put_in_folder(node, folder)
    segmentation = None
    if include_segmentation and explanation.segmentation is not None and np.any(explanation.segmentation):
        from ..results import target_segment_names

        names = dict(segment_names or {})
        target = getattr(explanation, "target", {}) or {}
        explained = target_segment_names(target)
        for index, name in explained.items():  # a name given by the caller names a single class
            names.setdefault(index, label if class_name and len(explained) == 1 else name)
        segmentation = add_segmentation(scene, explanation.segmentation, reference,
                                        f"{volume_name} - segmentation", names, folder=folder)
    maps = {}
    target_folders: Dict[str, int] = {}
    for key, result in explanation.results.items():
        method, where, who = place_by_target(scene, key, folder, label, target_folders)
        attrs = {"method": method, "class": label, "target": who, "seconds": result.seconds,
                 "params": result.params, "diagnostics": result.diagnostics}
        maps[key] = add_map(scene, result.map, reference, map_node_name(volume_name, method, who),
                            signed=_is_signed(result), folder=where, attributes=attrs)
    table = None
    if metrics_rows:
        table = add_metrics_table(scene, metrics_rows, f"{volume_name} - metrics", folder=folder)
    shown = maps.get(show_method) if show_method else next(iter(maps.values()), None)
    ensure_slice_views(scene)
    show_overlay(scene, reference, shown, opacity, segmentation)
    if shown is not None:
        show_volume_rendering(scene, shown)
    return {"scene": scene, "input": reference, "inputs": inputs, "segmentation": segmentation,
            "maps": maps, "table": table, "folder": folder, "shown": shown}


def ensure_slice_views(scene) -> List[Any]:
    """Red/Yellow/Green slice nodes (axial, sagittal, coronal) with composite nodes, as desktop
    Slicer's default layout has, when the scene has none; returns the slice nodes."""
    slicer = slicer_module()
    if scene.GetNumberOfNodesByClass("vtkMRMLSliceNode") == 0:
        if scene.GetNumberOfNodesByClass("vtkMRMLViewNode") == 0:
            view = slicer.vtkMRMLViewNode()
            view.SetLayoutName("1")
            view.SetLayoutLabel("1")
            scene.AddNode(view)
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
        for layout, orientation, color in (("Red", "Axial", (0.95, 0.35, 0.31)),
                                           ("Yellow", "Sagittal", (0.93, 0.84, 0.33)),
                                           ("Green", "Coronal", (0.43, 0.69, 0.38))):
            node = slicer.vtkMRMLSliceLogic.CreateSliceNode(scene, layout) if hasattr(
                slicer.vtkMRMLSliceLogic, "CreateSliceNode") else None
            if node is None:
                node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
            node.SetName(layout)
            node.SetLayoutName(layout)
            node.SetLayoutColor(*color)
            node.SetOrientation(orientation)
            if node.GetScene() is None:
                scene.AddNode(node)
            composite = slicer.vtkMRMLSliceCompositeNode()
            composite.SetLayoutName(layout)
            scene.AddNode(composite)
    return [scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode"))]
