"""Put a result into the viewer's MRML scene and change how a map is shown.

Slicer's own readers load every file (the volumes logic's archetype reader: NIfTI/NRRD geometry
exactly as desktop Slicer reads it). Maps are styled by the scene bridge (`EsegetaLib.slicer.scene`): the
same colour table (desktop Slicer's IDs), fixed window and threshold rule the exported `.mrb` uses,
so the page and the Slicer scene agree. A `.mrb` arrives already styled. From there this module only
moves the threshold and keeps each map's volume rendering in step. Nothing here knows the web page.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..errors import EsegetaError
from .result import ViewerResult

LABELMAP_OPTION = 1  # vtkSlicerVolumesLogic::AddArchetypeVolume loading option bit: label map
VR_MAX_OPACITY = 0.8  # opacity of the strongest evidence in 3D


@dataclass
class MapLayer:
    """One attribution map in the scene and how it is displayed."""

    name: str
    node: Any  # vtkMRMLScalarVolumeNode
    color_node: Any  # the run's colour table
    low: float  # fixed window
    high: float
    signed: bool
    threshold: float = 0.0  # |value| below this is hidden
    band_node: Optional[Any] = None  # signed maps: the table with a transparent band around 0
    vr_display: Optional[Any] = None
    legend: Optional[Any] = None  # Slicer's colour legend (colour bar with the range) in the views

    @property
    def top(self) -> float:
        return max(abs(self.low), abs(self.high))


@dataclass
class LoadedScene:
    input_node: Any
    segmentation_node: Optional[Any]
    maps: Dict[str, MapLayer] = field(default_factory=dict)
    metrics: Optional[tuple] = None  # (columns, rows) from a table node (.mrb)
    parameters: Optional[Dict[str, Any]] = None  # the run folder's parameters (.mrb)


# ------------------------------------------------------------------------ result directory
def load_directory(slicer_app, result: ViewerResult) -> LoadedScene:
    """Read the plain files of a result directory into the app's scene (one-line errors)."""
    from ..slicer import scene as bridge

    input_node = read_volume(slicer_app, result.input_path, "input")
    input_node.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    segmentation = None
    if result.segmentation_path is not None:
        label = read_volume(slicer_app, result.segmentation_path, "segmentation labels", labelmap=True)
        segmentation = labelmap_to_outline(slicer_app, label, input_node)
    loaded = LoadedScene(input_node=input_node, segmentation_node=segmentation)
    for name, path in result.attribution_paths.items():
        node = read_volume(slicer_app, path, name)
        signed = recorded_signed(result.run, name)
        if signed is None:
            signed = bool(np.any(voxels(node) < 0))
        bridge.configure_map_display(node, signed)
        node.SetAttribute(bridge.ATTRIBUTE_PREFIX + "method", name)
        loaded.maps[name] = layer_from_node(slicer_app, name, node)
    return loaded


def recorded_signed(run: Dict[str, Any], name: str) -> Optional[bool]:
    """Whether the run said method `name` gives signed maps (run.json results.<name>.metadata)."""
    results = run.get("results") if isinstance(run.get("results"), dict) else {}
    entry = results.get(name) if isinstance(results.get(name), dict) else {}
    metadata = entry.get("metadata") if isinstance(entry.get("metadata"), dict) else {}
    return bool(metadata["signed"]) if isinstance(metadata.get("signed"), bool) else None


def read_volume(slicer_app, path: Path, name: str, labelmap: bool = False):
    node = slicer_app.volumes_logic.AddArchetypeVolume(str(path), name, LABELMAP_OPTION if labelmap else 0)
    if node is None or node.GetImageData() is None or node.GetImageData().GetPointData().GetScalars() is None:
        raise EsegetaError(f"Cannot read '{path}' (damaged or not a volume); re-run `esegeta explain`.")
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def voxels(node) -> np.ndarray:
    from vtkmodules.util.numpy_support import vtk_to_numpy

    return vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())


def labelmap_to_outline(slicer_app, label_node, reference_node):
    """The model's label map as a segmentation node drawn as an outline only (input and overlay
    stay visible inside it); the label volume itself leaves the scene."""
    scene = slicer_app.scene
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    ok = slicer_app.segmentations_logic.ImportLabelmapToSegmentationNode(label_node, segmentation)
    scene.RemoveNode(label_node)
    if not ok:
        raise EsegetaError("The segmentation could not be converted for display; re-run `esegeta explain`.")
    from ..slicer import scene as bridge

    segments = segmentation.GetSegmentation()
    palette = bridge.default_segment_colors(segments.GetNumberOfSegments())
    for index in range(segments.GetNumberOfSegments()):  # the colours the exported scene uses
        segments.GetNthSegment(index).SetColor(*palette[index])
    show_outline(segmentation)
    return segmentation


def show_outline(segmentation) -> None:
    display = segmentation.GetDisplayNode()
    display.SetVisibility(True)
    display.SetVisibility2DFill(False)
    display.SetVisibility2DOutline(True)
    display.SetSliceIntersectionThickness(2)
    display.SetVisibility3D(False)


# ------------------------------------------------------------------------------------- .mrb
def load_mrb(slicer_app, result: ViewerResult) -> LoadedScene:
    """A review scene written by the scene bridge, read by the bridge into the app's scene."""
    from ..slicer import scene as bridge

    scene = slicer_app.scene
    try:
        bridge.read_review(result.mrb_path, scene=scene)
    except EsegetaError as exc:
        raise EsegetaError(f"Cannot open '{result.mrb_path}': {exc}; re-export the scene.") from None
    # Volume renderings saved in the scene use the method chosen for this machine (CPU on llvmpipe).
    rendering = slicer_app.volume_rendering
    rendering.ChangeVolumeRenderingMethod(rendering.GetDefaultRenderingMethod())
    volumes = nodes_of(scene, "vtkMRMLScalarVolumeNode")
    maps = [n for n in volumes if n.GetAttribute(bridge.ATTRIBUTE_PREFIX + "method")]
    inputs = [n for n in volumes if n not in maps and not n.IsA("vtkMRMLLabelMapVolumeNode")]
    if not maps or not inputs or any(n.GetImageData() is None for n in maps + inputs[:1]):
        raise EsegetaError(f"'{result.mrb_path}' holds no Esegeta review (an input volume and attribution "
                           "maps); open it in 3D Slicer, or give the result directory instead.")
    segmentations = nodes_of(scene, "vtkMRMLSegmentationNode")
    for segmentation in segmentations:
        show_outline(segmentation)
    loaded = LoadedScene(input_node=inputs[0], segmentation_node=segmentations[0] if segmentations else None)
    result.title = inputs[0].GetName() or result.title  # the volume's name, not "esegeta" (the file's)
    for node in maps:
        name = node.GetAttribute(bridge.ATTRIBUTE_PREFIX + "method")
        target = node.GetAttribute(bridge.ATTRIBUTE_PREFIX + "target")
        if target and target != node.GetAttribute(bridge.ATTRIBUTE_PREFIX + "class"):
            name = f"{target}/{name}"  # several targets: "<target>/<method>", as in the result folder
        loaded.maps[name] = layer_from_node(slicer_app, name, node)
    tables = nodes_of(scene, "vtkMRMLTableNode")
    if tables:
        rows = bridge.table_rows(tables[0])
        columns = list(rows[0]) if rows else []
        loaded.metrics = (columns, [[_cell(row.get(c)) for c in columns] for row in rows])
    loaded.parameters = run_folder_parameters(scene, bridge.ATTRIBUTE_PREFIX + "parameters")
    return loaded


def nodes_of(scene, class_name: str) -> List[Any]:
    return [scene.GetNthNodeByClass(i, class_name) for i in range(scene.GetNumberOfNodesByClass(class_name))]


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if value != value else f"{value:.4g}"
    return "" if value is None else str(value)


def run_folder_parameters(scene, attribute: str) -> Optional[Dict[str, Any]]:
    """The run's parameters the bridge keeps on the run's subject-hierarchy folder."""
    hierarchy = scene.GetSubjectHierarchyNode()
    if hierarchy is None:
        return None
    from vtkmodules.vtkCommonCore import vtkIdList

    items = vtkIdList()
    hierarchy.GetItemChildren(hierarchy.GetSceneItemID(), items, True)
    for index in range(items.GetNumberOfIds()):
        text = hierarchy.GetItemAttribute(items.GetId(index), attribute)
        if text:
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                return {"parameters": text}
    return None


# ------------------------------------------------------------------------ display changes
def layer_from_node(slicer_app, name: str, node) -> MapLayer:
    """A `MapLayer` from a styled map node: its colour table, window and threshold as set."""
    from ..slicer import scene as bridge

    display = node.GetScalarVolumeDisplayNode()
    color_node = display.GetColorNode()
    if color_node is None:
        raise EsegetaError(f"Map '{name}' refers to a missing colour table ({display.GetColorNodeID()}); "
                           "re-export the scene.")
    signed_attribute = node.GetAttribute(bridge.ATTRIBUTE_PREFIX + "signed")
    low, high = display.GetWindowLevelMin(), display.GetWindowLevelMax()
    signed = signed_attribute == "true" if signed_attribute else low < -1e-6 * abs(high)
    # A scene file stores window and level: [min, max] comes back with rounding (an unsigned map's
    # window from -2e-08). Restore the range the run set: [0, top] or symmetric [-top, top].
    top = max(abs(low), abs(high))
    low, high = (-top, top) if signed else (0.0 if abs(low) <= 1e-6 * top else low, high)
    display.SetWindowLevelMinMax(low, high)
    layer = MapLayer(name=name, node=node, color_node=color_node, low=low, high=high, signed=signed)
    # The run's threshold for unsigned maps; for signed maps the same fraction of the window's top
    # (the exported scene shows all of a signed map, whose near-zero white would wash every slice).
    fraction = getattr(bridge, "DEFAULT_THRESHOLD_FRACTION", 0.1)
    layer.threshold = (display.GetLowerThreshold() if display.GetApplyThreshold() else 0.0) if not signed \
        else fraction * layer.top
    display.SetInterpolate(False)  # show voxels as computed (a voxel's evidence is one value)
    layer.vr_display = slicer_app.volume_rendering.create_display_node(node)
    layer.vr_display.SetVisibility(False)
    layer.legend = add_color_legend(node)
    set_threshold(layer, layer.threshold)
    return layer


def add_color_legend(node):
    """Slicer's colour legend for the map (hidden until the map is shown): the colour bar and the
    range a reader needs to read the overlay. None where the logic lacks it."""
    import slicer

    add = getattr(getattr(slicer, "vtkSlicerColorLogic", None), "AddDefaultColorLegendDisplayNode", None)
    if add is None:
        return None
    scene = node.GetScene()
    if not scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):  # Slicer's Colors module does this
        scene.RegisterNodeClass(slicer.vtkMRMLColorLegendDisplayNode())
    legend = add(node)
    if legend is not None:
        legend.SetVisibility(False)
        legend.SetTitleText("")  # the method's name is in the page's Method menu
        legend.SetLabelFormat("%.3g")
        legend.SetSize(0.1, 0.45)
    return legend


def set_threshold(layer: MapLayer, threshold: float) -> None:
    """Hide voxels with |attribution| below `threshold` in the slice views and in 3D."""
    layer.threshold = max(0.0, float(threshold))
    display = layer.node.GetScalarVolumeDisplayNode()
    if not layer.signed:
        display.SetAndObserveColorNodeID(layer.color_node.GetID())
        display.SetApplyThreshold(True)
        display.SetThreshold(layer.threshold, max(layer.high, float(voxels(layer.node).max())))
    elif layer.threshold <= 0.0:
        display.SetApplyThreshold(False)
        display.SetAndObserveColorNodeID(layer.color_node.GetID())
    else:
        # Slicer's threshold keeps one interval [lower, upper]; hiding |a| < t of a signed map
        # needs a transparent band in the middle of the table instead (slice layers honour alpha).
        display.SetApplyThreshold(False)
        display.SetAndObserveColorNodeID(transparent_band(layer).GetID())
    update_transfer_functions(layer)


def transparent_band(layer: MapLayer):
    """A copy of the run's table whose entries for |value| < threshold are fully transparent."""
    table = layer.color_node.GetLookupTable()
    count = table.GetNumberOfTableValues()
    if layer.band_node is None:
        scene = layer.node.GetScene()
        layer.band_node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", f"{layer.color_node.GetName()} "
                                                  f"(|{layer.name}| threshold)")
        layer.band_node.SetTypeToUser()
        layer.band_node.SetNumberOfColors(count)
        layer.band_node.SetHideFromEditors(True)
        layer.band_node.SetSaveWithScene(False)
    values = layer.low + (np.arange(count) + 0.5) / count * (layer.high - layer.low)
    for index in range(count):
        red, green, blue, alpha = table.GetTableValue(index)
        alpha = alpha if abs(values[index]) >= layer.threshold else 0.0
        layer.band_node.SetColor(index, str(index), red, green, blue, alpha)
    layer.band_node.Modified()
    return layer.band_node


def update_transfer_functions(layer: MapLayer) -> None:
    """3D: colours from the run's table over the window; opacity 0 up to the threshold (of |a|),
    rising to VR_MAX_OPACITY at the window's end, so the strongest evidence stands out."""
    volume_property = layer.vr_display.GetVolumePropertyNode().GetVolumeProperty()
    table = layer.color_node.GetLookupTable()
    count = table.GetNumberOfTableValues()
    color_tf = volume_property.GetRGBTransferFunction()
    color_tf.RemoveAllPoints()
    for index in range(count):
        value = layer.low + index / max(count - 1, 1) * (layer.high - layer.low)
        color_tf.AddRGBPoint(value, *table.GetTableValue(index)[:3])
    edge = max(layer.threshold, 1e-3 * layer.top)
    # At or above the window's top everything is hidden (a point at the same value would replace
    # the zero, not add a step).
    ramp = [(edge, 0.0), (layer.top, VR_MAX_OPACITY)] if edge < layer.top else [(edge, 0.0)]
    opacity = volume_property.GetScalarOpacity()
    opacity.RemoveAllPoints()
    opacity.AddPoint(0.0, 0.0)
    for value, alpha in ramp:
        opacity.AddPoint(value, alpha)
        if layer.signed:
            opacity.AddPoint(-value, alpha)
    volume_property.ShadeOff()
    layer.vr_display.GetVolumePropertyNode().Modified()
