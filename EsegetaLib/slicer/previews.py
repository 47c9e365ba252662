"""PNG previews of a review scene, rendered by Slicer's own slice logic (no OpenGL needed).

`vtkMRMLSliceLogic` composites background, foreground (with its opacity, colour table and
threshold) and a label outline in software, exactly as a Slicer slice view does, so a preview shows
what the radiologist will see. The 3D preview needs offscreen OpenGL (EGL); it is probed in a
subprocess first (a failing driver can abort the process) and skipped with a note when missing.
"""
from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import EsegetaError
from .slicer_env import logic, slicer_module

VIEWS = (("axial", "Axial"), ("coronal", "Coronal"), ("sagittal", "Sagittal"))
_EGL_ENV = {"VTK_DEFAULT_OPENGL_WINDOW": "vtkEGLRenderWindow"}


def _vtk():
    import vtk

    return vtk


def _node_to_world(node):
    """vtkGeneralTransform from `node`'s local RAS to world RAS (identity without a transform)."""
    slicer = slicer_module()
    transform = _vtk().vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(node.GetParentTransformNode(), None, transform)
    return transform


def strongest_point(map_node, region: Optional[np.ndarray] = None
                    ) -> Tuple[Tuple[int, int, int], Tuple[float, float, float]]:
    """Voxel (i, j, k) and world RAS of the strongest attribution: the maximum of |map| smoothed
    over 3x3x3 voxels, so a single noisy voxel does not decide where the previews cut; inside
    `region` ((I,J,K) bool, e.g. the explained region) when it has any voxel."""
    from scipy.ndimage import uniform_filter

    from .scene import array_from_volume

    values, ijk_to_ras = array_from_volume(map_node)
    magnitude = np.abs(np.nan_to_num(values.astype(np.float32, copy=False)))
    strength = uniform_filter(magnitude, size=3, mode="constant")
    if region is not None and np.shape(region) == strength.shape and np.any(region):
        strength = np.where(np.asarray(region, bool), strength, -1.0)
    ijk = tuple(int(v) for v in np.unravel_index(int(np.argmax(strength)), strength.shape))
    local = ijk_to_ras @ np.array([*ijk, 1.0])
    world = _node_to_world(map_node).TransformPoint(local[:3])
    return ijk, tuple(float(v) for v in world)


def _image_to_rgb(image) -> np.ndarray:
    """vtkImageData (w, h) RGB(A) -> (h, w, 3) uint8, top row first."""
    from vtk.util import numpy_support

    w, h, _ = image.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    rgba = scalars.reshape(h, w, -1)[::-1]
    return np.ascontiguousarray(rgba[..., :3]).astype(np.uint8)


def render_slice(scene, orientation: str, background, foreground=None, opacity: float = 0.5,
                 label=None, center_ras: Optional[Sequence[float]] = None,
                 size: Tuple[int, int] = (384, 384), align_to_volume: bool = True) -> np.ndarray:
    """One slice view as an (h, w, 3) uint8 image: `background` with `foreground` at `opacity`
    and `label` (a label map volume) as outline, through `center_ras`, the whole volume in view.
    With `align_to_volume` the plane follows the volume's axes nearest to `orientation`.
    A private slice node is used and removed, so the scene's own views are untouched."""
    with _private_slice_view(scene, f"EsegetaPreview{orientation}") as (slice_logic, slice_node, composite):
        slice_node.SetOrientation(orientation)
        slice_node.SetDimensions(int(size[0]), int(size[1]), 1)
        slice_node.SetUseLabelOutline(True)
        composite.SetBackgroundVolumeID(background.GetID())
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(float(opacity))
        composite.SetLabelVolumeID(label.GetID() if label is not None else None)
        composite.SetLabelOpacity(1.0)
        if align_to_volume:
            # Cut along the volume's own axes (the acquisition planes), as Slicer's "Rotate to
            # volume plane" does: an oblique scan fills the view instead of a tilted diamond.
            slice_logic.RotateSliceToLowestVolumeAxes(True)
        slice_logic.FitSliceToAll(int(size[0]), int(size[1]))
        if center_ras is not None:
            slice_node.JumpSliceByOffsetting(*[float(v) for v in center_ras])
        slice_logic.UpdatePipeline()
        connection = slice_logic.GetImageDataConnection()
        producer = connection.GetProducer()
        producer.Update()
        image = producer.GetOutputDataObject(connection.GetIndex())
        return _image_to_rgb(image)


@contextlib.contextmanager
def _private_slice_view(scene, layout: str):
    """(slice logic, slice node, composite node) of a slice view of our own, removed afterwards,
    so the scene's own views are untouched."""
    slicer = slicer_module()
    slice_logic = slicer.vtkMRMLSliceLogic()
    app_logic = logic(scene, "ApplicationLogic")
    if app_logic is not None:
        slice_logic.SetMRMLApplicationLogic(app_logic)
    slice_logic.SetMRMLScene(scene)
    slice_node = slice_logic.AddSliceNode(layout)
    composite = slice_logic.GetSliceCompositeNode()
    try:
        if slice_node is None or composite is None:  # pragma: no cover - MRML always makes them
            raise EsegetaError("could not create a slice view for the preview")
        yield slice_logic, slice_node, composite
    finally:
        slice_logic.SetMRMLScene(None)
        for node in (composite, slice_node):
            if node is not None and node.GetScene() is scene:
                scene.RemoveNode(node)


def screen_axes(slice_node) -> Tuple[List[float], List[float]]:
    """(right, up): the RAS directions of a slice view's screen right and screen up."""
    matrix = slice_node.GetSliceToRAS()
    return [matrix.GetElement(r, 0) for r in range(3)], [matrix.GetElement(r, 1) for r in range(3)]


_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))  # (negative, positive) end of each RAS axis


def orientation_letters(right: Sequence[float], up: Sequence[float]) -> Dict[str, str]:
    """Letters at the left, right, top and bottom edges of a view whose screen-right and screen-up
    directions are `right` and `up` (RAS vectors): the anatomical direction nearest to each."""
    def letter(vector) -> str:
        axis = int(np.argmax(np.abs(vector)))
        return _LETTERS[axis][1 if vector[axis] > 0 else 0]

    right, up = np.asarray(right, float), np.asarray(up, float)
    return {"right": letter(right), "left": letter(-right), "top": letter(up), "bottom": letter(-up)}


def plane_extent(volume_node, right: Sequence[float], up: Sequence[float]) -> Tuple[float, float]:
    """Width and height in mm of `volume_node`'s box seen in a plane with screen directions
    `right` and `up` (RAS unit vectors): the sum of each voxel axis's length projected on them."""
    from .scene import array_from_volume

    values, ijk_to_ras = array_from_volume(volume_node)
    edges = [ijk_to_ras[:3, a] * values.shape[a] for a in range(3)]
    return (float(sum(abs(np.dot(e, right)) for e in edges)), float(sum(abs(np.dot(e, up)) for e in edges)))


def view_size(width_mm: float, height_mm: float, long_side: int = 384, min_side: int = 128,
              max_side: int = 1024) -> Tuple[int, int]:
    """Viewport pixels with the plane's physical aspect: the longer side `long_side`, grown (up to
    `max_side`) so that the shorter one gets at least `min_side` pixels (a thin slab stays readable)."""
    width_mm, height_mm = max(width_mm, 1e-6), max(height_mm, 1e-6)
    aspect = width_mm / height_mm
    long = max(long_side, min(max_side, int(np.ceil(min_side * max(aspect, 1.0 / aspect)))))
    if aspect >= 1:
        return long, max(8, int(round(long / aspect)))
    return max(8, int(round(long * aspect))), long


def render_view(scene, orientation: str, background, foreground=None, opacity: float = 0.5, label=None,
                center_ras: Optional[Sequence[float]] = None, long_side: int = 384) -> Dict[str, Any]:
    """Like `render_slice`, in a viewport shaped like the volume's extent in this plane (mm), so
    anisotropic and thin volumes keep their proportions. Returns {"rgb", "right", "up", "letters"
    (R/L, A/P, S/I at each edge), "size"}."""
    with _private_slice_view(scene, f"EsegetaProbe{orientation}") as (slice_logic, probe, composite):
        probe.SetOrientation(orientation)
        composite.SetBackgroundVolumeID(background.GetID())
        slice_logic.RotateSliceToLowestVolumeAxes(True)
        right, up = screen_axes(probe)
    size = view_size(*plane_extent(background, right, up), long_side=long_side)
    rgb = render_slice(scene, orientation, background, foreground, opacity, label, center_ras, size)
    return {"rgb": rgb, "right": right, "up": up, "letters": orientation_letters(right, up), "size": size}


def _save_png(rgb: np.ndarray, path: Path) -> str:
    """Write atomically (temporary name, then rename)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    Image.fromarray(rgb).save(temporary, format="PNG")
    os.replace(temporary, path)
    return str(path)


def _labelmap_for_outline(scene, segmentation, reference):
    """A temporary label map of the segmentation on the reference grid, coloured like its segments
    (the slice logic draws label maps, not segmentations, without displayable managers)."""
    slicer = slicer_module()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__esegeta_preview_labels__")
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportVisibleSegmentsToLabelmapNode(
        segmentation, labelmap, reference)
    if not ok:
        scene.RemoveNode(labelmap)
        return None
    return labelmap


def outline_labelmap(scene, segmentation, reference):
    """The segmentation as a temporary label map for slice outlines (None without one);
    remove it with `remove_outline`."""
    return _labelmap_for_outline(scene, segmentation, reference) if segmentation is not None else None


def remove_outline(scene, labelmap) -> None:
    if labelmap is None:
        return
    color = labelmap.GetDisplayNode().GetColorNode() if labelmap.GetDisplayNode() else None
    scene.RemoveNode(labelmap)
    if color is not None and color.GetScene() is scene and not color.GetSingletonTag():
        scene.RemoveNode(color)


@functools.lru_cache(maxsize=1)
def egl_available(timeout: float = 60.0) -> Tuple[bool, str]:
    """Can this machine render offscreen with OpenGL (EGL)? Probed once per process, in a
    subprocess because a broken driver may abort the process instead of raising."""
    code = ("import vtk\n"
            "w = vtk.vtkRenderWindow(); w.SetOffScreenRendering(1); w.SetSize(8, 8)\n"
            "r = vtk.vtkRenderer(); w.AddRenderer(r); w.Render()\n"
            "print(w.GetClassName())\n")
    env = dict(os.environ, **_EGL_ENV)
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"offscreen OpenGL probe failed: {exc}"
    if done.returncode != 0 or "vtkEGLRenderWindow" not in done.stdout:
        tail = (done.stderr or done.stdout).strip().splitlines()
        return False, "offscreen OpenGL (EGL) not available" + (f": {tail[-1]}" if tail else "")
    return True, "EGL"


def render_3d(scene, map_node, segmentation=None, size: Tuple[int, int] = (512, 512)) -> np.ndarray:
    """Volume rendering of `map_node` with its volume rendering display node's transfer functions
    (see `scene.show_volume_rendering`), the segmentation as a translucent surface, offscreen.
    Call only where `egl_available()` said yes."""
    vtk = _vtk()
    from .scene import array_from_volume

    os.environ.update(_EGL_ENV)  # read by VTK's render window factory at creation
    vr_logic = logic(scene, "VolumeRendering")
    display = vr_logic.GetFirstVolumeRenderingDisplayNode(map_node) if vr_logic else None
    if display is None:
        raise EsegetaError("the map has no volume rendering settings; call show_volume_rendering first")
    to_world = vtk.vtkMatrix4x4()
    map_node.GetIJKToRASMatrix(to_world)
    parent = map_node.GetParentTransformNode()
    if parent is not None and parent.IsTransformToWorldLinear():
        world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(world)
        vtk.vtkMatrix4x4.Multiply4x4(world, to_world, to_world)
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0.0, 0.0, 0.0)
    mapper = vtk.vtkSmartVolumeMapper()
    mapper.SetRequestedRenderModeToRayCast()
    mapper.SetInputData(map_node.GetImageData())
    volume = vtk.vtkVolume()
    volume.SetMapper(mapper)
    volume.SetProperty(display.GetVolumePropertyNode().GetVolumeProperty())
    volume.SetUserMatrix(to_world)
    renderer.AddVolume(volume)
    if segmentation is not None:
        labels, ijk_to_ras = None, None
        labelmap = _labelmap_for_outline(scene, segmentation, map_node)
        if labelmap is not None:
            try:
                labels, ijk_to_ras = array_from_volume(labelmap)
                surface = vtk.vtkDiscreteFlyingEdges3D()
                surface.SetInputData(labelmap.GetImageData())
                surface.GenerateValues(int(labels.max()), 1, int(labels.max()))
                surface.Update()
                smooth = vtk.vtkWindowedSincPolyDataFilter()
                smooth.SetInputConnection(surface.GetOutputPort())
                smooth.SetNumberOfIterations(15)
                poly_mapper = vtk.vtkPolyDataMapper()
                poly_mapper.SetInputConnection(smooth.GetOutputPort())
                poly_mapper.ScalarVisibilityOff()
                actor = vtk.vtkActor()
                actor.SetMapper(poly_mapper)
                seg = segmentation.GetSegmentation()
                color = seg.GetNthSegment(0).GetColor() if seg.GetNumberOfSegments() else (0.2, 0.8, 0.2)
                actor.GetProperty().SetColor(*color)
                actor.GetProperty().SetOpacity(0.25)
                m = vtk.vtkMatrix4x4()
                labelmap.GetIJKToRASMatrix(m)
                if parent is not None and parent.IsTransformToWorldLinear():
                    vtk.vtkMatrix4x4.Multiply4x4(world, m, m)
                actor.SetUserMatrix(m)
                renderer.AddActor(actor)
            finally:
                scene.RemoveNode(labelmap)
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(int(size[0]), int(size[1]))
    window.AddRenderer(renderer)
    camera = renderer.GetActiveCamera()
    camera.SetViewUp(0, 0, 1)  # superior up
    camera.SetPosition(0, 1, 0)  # looking from anterior, like Slicer's default 3D view
    camera.SetFocalPoint(0, 0, 0)
    renderer.ResetCamera()
    camera.Azimuth(30)
    camera.Elevation(15)
    camera.Zoom(1.4)
    renderer.ResetCameraClippingRange()
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    rgb = _image_to_rgb(grab.GetOutput())
    window.Finalize()
    return rgb


def write_previews(scene, out_dir, background, foreground, segmentation=None, opacity: float = 0.5,
                   size: Tuple[int, int] = (384, 384), three_d: bool = True) -> Dict[str, Any]:
    """previews/axial.png, coronal.png, sagittal.png through the strongest attribution of
    `foreground`, and 3d.png where offscreen OpenGL works. Returns {"paths", "notes", "center"}."""
    out = Path(out_dir)
    _, center = strongest_point(foreground)
    labelmap = outline_labelmap(scene, segmentation, background)
    paths: List[str] = []
    notes: List[str] = []
    try:
        for name, orientation in VIEWS:
            rgb = render_slice(scene, orientation, background, foreground, opacity, labelmap, center, size)
            paths.append(_save_png(rgb, out / f"{name}.png"))
    finally:
        remove_outline(scene, labelmap)
    if three_d:
        if logic(scene, "VolumeRendering") is None:
            notes.append("3D preview skipped: no volume rendering logic in this Slicer build")
        else:
            ok, why = egl_available()
            if ok:
                from .scene import show_volume_rendering

                vr = logic(scene, "VolumeRendering").GetFirstVolumeRenderingDisplayNode(foreground)
                if vr is None:
                    show_volume_rendering(scene, foreground)
                paths.append(_save_png(render_3d(scene, foreground, segmentation), out / "3d.png"))
            else:
                notes.append(f"3D preview skipped: {why}")
    return {"paths": paths, "notes": notes, "center": center}
