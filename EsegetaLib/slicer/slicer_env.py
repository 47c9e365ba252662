"""Where MRML comes from: the desktop Slicer application, or the `slicer-core` wheel outside it.

Inside desktop Slicer the application owns the scene and every module logic. Outside it (the CLI,
tests, `esegeta view`) `new_scene()` builds the same pieces from `slicer-core` in the order that
works (application logic first; the colour logic gets the application logic before the scene and is
registered as "Colors" so the volumes logic finds it; a segmentations logic exists before anything
converts segmentations). The scene bridge asks `logic(scene, name)` and never cares which it got.
"""
from __future__ import annotations

import contextlib

import importlib
from typing import Any, Dict, Optional

from ..errors import EsegetaError

# Scenes made by `new_scene`, keyed by the scene's address: the logics must live as long as the
# scene (VTK would otherwise free them) and a vtkMRMLScene has no slot to hang them on.
_CONTEXTS: Dict[str, Dict[str, Any]] = {}

# The version string review scenes carry. Desktop Slicer's scene reader warns when a scene was
# saved by another application ("slicer-core", what the wheel writes) or by a newer Slicer than
# itself, so scenes claim "Slicer" 5.8.1: no warning in Slicer 5.8 or later (not checked against a
# desktop Slicer here; the reader's rule is in Slicer's qSlicerSceneReader).
SLICER_VERSION = "Slicer5.8.1 33241"


def slicer_module():
    """`import slicer`, or a one-line error saying how to get it outside Slicer."""
    try:
        return importlib.import_module("slicer")
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise EsegetaError(
            "MRML scenes need 3D Slicer or the slicer-core wheel; run `pip install esegeta[scene]` "
            f"outside Slicer ({exc})") from None


def in_desktop_slicer() -> bool:
    """True inside the Slicer application (it has `slicer.app`; slicer-core has not)."""
    slicer = slicer_module()
    return getattr(slicer, "app", None) is not None


def _register(app_logic, scene, logic, name: str):
    logic.SetMRMLApplicationLogic(app_logic)
    logic.SetMRMLScene(scene)
    app_logic.SetModuleLogic(name, logic)
    return logic


@contextlib.contextmanager
def _vtk_log_silenced():
    from vtkmodules.vtkCommonCore import vtkLogger

    previous = vtkLogger.GetCurrentVerbosityCutoff()
    vtkLogger.SetStderrVerbosity(vtkLogger.VERBOSITY_OFF)
    try:
        yield
    finally:
        vtkLogger.SetStderrVerbosity(previous)


def new_scene():
    """A fresh, independent scene with Slicer's logics (volumes, segmentations, subject hierarchy,
    tables, volume rendering, data IO for .mrb) and the colour tables. Inside desktop Slicer work
    on the application's scene instead: pass `slicer.mrmlScene` to the bridge's functions."""
    from . import colors

    slicer = slicer_module()
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    # The application logic's own colour logic makes the procedural tables (Grey, Labels, ...).
    app_logic.GetColorLogic().SetMRMLScene(scene)
    # vtkSlicerColorLogic would look for colour files in a Slicer install tree (absent from the
    # wheel, and it logs an error without one); the base colour logic is what the volumes logic
    # needs under the name "Colors". The file-based tables are built by `colors.ensure_color_tables`.
    color_logic = slicer.vtkMRMLColorLogic()
    color_logic.SetMRMLApplicationLogic(app_logic)
    color_logic.SetMRMLScene(scene)
    app_logic.SetModuleLogic("Colors", color_logic)
    logics = {"ApplicationLogic": app_logic, "Colors": color_logic}
    logics["Volumes"] = _register(app_logic, scene, slicer.vtkSlicerVolumesLogic(), "Volumes")
    logics["Segmentations"] = _register(app_logic, scene, slicer.vtkSlicerSegmentationsModuleLogic(),
                                        "Segmentations")
    logics["SubjectHierarchy"] = _register(app_logic, scene, slicer.vtkSlicerSubjectHierarchyModuleLogic(),
                                           "SubjectHierarchy")
    logics["Tables"] = _register(app_logic, scene, slicer.vtkSlicerTablesLogic(), "Tables")
    vr_class = getattr(slicer, "vtkSlicerVolumeRenderingLogic", None)
    if vr_class is not None:
        # Outside Slicer it logs "Failed to load presets: Share directory NOT set" (expected: the
        # wheel has no presets, Esegeta builds its transfer functions itself); keep the terminal clean.
        with _vtk_log_silenced():
            logics["VolumeRendering"] = _register(app_logic, scene, vr_class(), "VolumeRendering")
    # Reading a .mrb needs a data IO manager with a cache manager on the scene.
    remote_io = slicer.vtkMRMLRemoteIOLogic()
    remote_io.SetMRMLScene(scene)
    remote_io.SetMRMLApplicationLogic(app_logic)
    io_logic = slicer.vtkDataIOManagerLogic()
    io_logic.SetMRMLScene(scene)
    io_logic.SetMRMLApplicationLogic(app_logic)
    io_logic.SetAndObserveDataIOManager(remote_io.GetDataIOManager())
    remote_io.AddDataIOToScene()
    logics["RemoteIO"], logics["DataIO"] = remote_io, io_logic
    _CONTEXTS[scene.GetAddressAsString("vtkMRMLScene")] = logics
    scene.SetVersion(SLICER_VERSION)
    colors.ensure_color_tables(scene)
    return scene


def release_scene(scene) -> None:
    """Forget a scene made by `new_scene` (frees its logics); the scene must not be used after."""
    logics = _CONTEXTS.pop(scene.GetAddressAsString("vtkMRMLScene"), None)
    if logics:
        scene.Clear(1)
        # (The segmentations logic is left attached: detaching it logs a spurious warning.)
        for name in ("DataIO", "RemoteIO", "VolumeRendering", "Tables", "SubjectHierarchy", "Volumes",
                     "Colors"):
            if name in logics:
                logics[name].SetMRMLScene(None)
        logics["ApplicationLogic"].SetMRMLScene(None)


def logic(scene, name: str) -> Optional[Any]:
    """The module logic `name` ("Volumes", "Segmentations", "VolumeRendering", ...) serving `scene`,
    or None where it does not exist (e.g. volume rendering in a build without it)."""
    logics = _CONTEXTS.get(scene.GetAddressAsString("vtkMRMLScene"))
    if logics is not None:
        return logics.get(name)
    slicer = slicer_module()
    if in_desktop_slicer() and scene is slicer.mrmlScene:
        module = getattr(slicer.modules, name.lower(), None)
        if module is not None:
            return module.logic()
        if name == "ApplicationLogic":
            return slicer.app.applicationLogic()
    return None
