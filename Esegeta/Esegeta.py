"""Esegeta: explain 3D segmentation models with attribution maps, inside 3D Slicer.

A thin panel over `EsegetaLib.slicer` (decisions in `slicer_logic`, tested without Slicer; the run
in `slicer_run` + `worker`, a background process; results added by `result_import`). Nothing heavy
is imported here or when the panel opens (the method list is a JSON catalogue).
"""
import json
import logging
import os
import sys
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                          ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin


def _libraryFolder():
    """The folder holding `EsegetaLib`: beside this file when installed (the extension ships it
    there), the repository root when the module is loaded from source (Additional module paths)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(folder, "EsegetaLib", "__init__.py")):
            return folder
    raise ImportError(f"EsegetaLib was not found next to {here} or in its parent folder; reinstall Esegeta.")


if _libraryFolder() not in sys.path:
    sys.path.insert(0, _libraryFolder())

from EsegetaLib.slicer import dependencies, qt_panel, slicer_logic  # noqa: E402  (the path above; no torch)
from EsegetaLib.errors import EsegetaError  # noqa: E402

MODULE_NAME = "Esegeta"
SAMPLE_NAME = "EsegetaSyntheticTOF"
SAMPLE_FILE = "sample_tof.nii.gz"  # EsegetaLib/resources/, made by scripts/make_sample.py
# Checked by Testing/slicer_module (the bundled file's SHA-256); SampleData verifies the copy with it.
SAMPLE_SHA256 = "SHA256:846547b02809338c0d5a1d6517d1c90e2ffa11989cfea47638e33340151d4e63"
# As EXTENSION_CONTRIBUTORS in CMakeLists.txt, the one place (tests compare; scripts/check_catalog.py).
CONTRIBUTORS = ["Esegeta developers"]
SELF_TEST_METHODS = ("Saliency", "InputXGradient")
POLL_MILLISECONDS = 200


def resourcePath(relativePath):
    """A file under `Resources/`: beside this file when installed, in the repository root from source."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (here, os.path.dirname(here)):
        candidate = os.path.join(folder, "Resources", relativePath)
        if os.path.exists(candidate):
            return candidate
    return os.path.join(here, "Resources", relativePath)


def sampleFilePath():
    return os.path.join(_libraryFolder(), "EsegetaLib", "resources", SAMPLE_FILE)


class Esegeta(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Esegeta"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = list(CONTRIBUTORS)
        self.parent.helpText = (
            "Explain what a 3D segmentation model looks at: attribution maps computed over the model's own "
            "sliding windows, shown over the input, with metrics of how faithful they are. Choose a volume "
            "and a model (the bundled vessel model works on the 'EsegetaSyntheticTOF' sample in Sample Data), "
            "a preset and press Apply.")
        self.parent.acknowledgementText = "Built on PyTorch, Captum and MONAI. Inspired by TorchEsegeta (Chatterjee et al.)."
        iconPath = resourcePath(os.path.join("Icons", MODULE_NAME + ".png"))
        if os.path.isfile(iconPath):
            self.parent.icon = qt.QIcon(iconPath)
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The bundled synthetic TOF-MRA as a Sample Data entry (a local file, checked by SHA-256)."""
    import SampleData

    path = sampleFilePath()
    if not os.path.isfile(path):
        logging.warning(f"Esegeta: the bundled sample {path} is missing; not registered with Sample Data.")
        return
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Esegeta", sampleName=SAMPLE_NAME,
        thumbnailFileName=resourcePath(os.path.join("Icons", MODULE_NAME + ".png")),
        uris=qt.QUrl.fromLocalFile(path).toString(), fileNames=SAMPLE_NAME + ".nii.gz",
        nodeNames=SAMPLE_NAME, checksums=SAMPLE_SHA256)


@parameterNodeWrapper
class EsegetaParameterNode:
    """The panel's state, saved with the scene."""

    inputVolume: vtkMRMLScalarVolumeNode
    modelPath: str = ""
    modelPathRelative: str = ""  # the model relative to the scene's folder, written when the scene is saved
    targetClass: Annotated[int, WithinRange(0, 255)] = 1
    region: str = "predicted"
    roiSegmentation: vtkMRMLSegmentationNode
    roiSegmentId: str = ""
    regionPoint: vtkMRMLMarkupsFiducialNode
    preset: Annotated[str, Choice(list(slicer_logic.PRESETS))] = "Quick look"
    methods: str = ",".join(slicer_logic.PRESETS["Quick look"])
    methodParams: str = "{}"
    device: Annotated[str, Choice(list(slicer_logic.DEVICE_CHOICES))] = "auto"
    precision: Annotated[str, Choice(["auto", "fp32", "bf16", "fp16"])] = "auto"
    patchSize: int = 0
    overlap: Annotated[float, WithinRange(0.0, 0.9)] = 0.25
    activation: Annotated[str, Choice(list(slicer_logic.ACTIVATION_CHOICES))] = "auto"
    fold: str = ""  # nnU-Net folders: a fold or "all"; empty: every fold, ensembled
    metrics: str = ""
    shownMap: vtkMRMLScalarVolumeNode
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    showIn3D: bool = False
    metricsTable: vtkMRMLTableNode


class EsegetaWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.run = None
        self.closingRuns = []  # cancelled runs whose worker is still exiting
        self.catalog = slicer_logic.method_catalog()
        self.pollTimer = None
        self._shownState = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(resourcePath("UI/Esegeta.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = EsegetaLogic()
        self.ui.shownMapSelector.addAttribute("vtkMRMLScalarVolumeNode", "Esegeta.method")
        self.ui.progressBar.setVisible(False)
        self.ui.methodsPlaceholderLabel.visible = False
        self.ui.regionPointPlaceWidget.buttonsVisible = False
        self.ui.regionPointPlaceWidget.placeButton().show()
        qt_panel.fill_combo(self.ui.regionComboBox, [(c.value, c.label, c.tooltip) for c in slicer_logic.REGION_CHOICES])
        qt_panel.fill_combo(self.ui.patchSizeComboBox, [(size, slicer_logic.patch_size_label(size), "")
                                                        for size in slicer_logic.PATCH_SIZE_CHOICES])
        self.populateMethodPanel()

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_MILLISECONDS)
        self.pollTimer.connect("timeout()", self.onPoll)
        for event, handler in ((slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose),
                               (slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose),
                               (slicer.mrmlScene.StartSaveEvent, self.onSceneStartSave)):
            self.addObserver(slicer.mrmlScene, event, handler)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.modelBrowseButton.connect("clicked(bool)", lambda _=False: self.onBrowseModel(folder=False))
        self.ui.modelFolderButton.connect("clicked(bool)", lambda _=False: self.onBrowseModel(folder=True))
        self.ui.modelPathLineEdit.connect("editingFinished()", self.updateModelCard)
        for combo, name in ((self.ui.targetClassComboBox, "targetClass"), (self.ui.regionComboBox, "region"),
                            (self.ui.patchSizeComboBox, "patchSize")):
            combo.connect("currentIndexChanged(int)", lambda i, c=combo, n=name: self.setField(n, c.itemData(i)))
        self.ui.roiSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", lambda n: self.setField("roiSegmentation", n))
        self.ui.roiSegmentSelector.connect("currentSegmentChanged(QString)", lambda s: self.setField("roiSegmentId", s or ""))
        self.ui.regionPointSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.ui.regionPointPlaceWidget.setCurrentNode)
        self.ui.presetComboBox.connect("currentTextChanged(QString)", self.onPresetChosen)
        self.ui.exportSceneButton.connect("clicked(bool)", self.onExportScene)
        self.initializeParameterNode()  # fills the preset combo box (a Choice)
        for preset, tip in slicer_logic.PRESET_TOOLTIPS.items():
            self.ui.presetComboBox.setItemData(self.ui.presetComboBox.findText(preset), tip, qt.Qt.ToolTipRole)
        self.updateModelCard()

    def cleanup(self) -> None:
        self.cancelRun()  # returns at once; a worker left exiting stops by itself (it watches Slicer)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.cancelRun()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneStartSave(self, caller, event) -> None:
        pn = self._parameterNode
        if pn is not None:
            pn.modelPathRelative = slicer_logic.stored_model_path(self.logic.modelPath(pn), slicer.mrmlScene.GetRootDirectory())

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
                if node.GetAttribute("Esegeta.method") is None:  # not one of Esegeta's own maps
                    self._parameterNode.inputVolume = node
                    break

    def setParameterNode(self, inputParameterNode: Optional[EsegetaParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.syncGeneratedWidgets()
            self.onParameterNodeModified()

    # ------------------------------------------------------------------ panel state
    def onParameterNodeModified(self, caller=None, event=None) -> None:
        pn = self._parameterNode
        if pn is None:
            return
        running = self.run is not None and self.run.state == "running"
        self.ui.applyButton.enabled = running or pn.inputVolume is not None
        needs = {choice.value: choice.needs for choice in slicer_logic.REGION_CHOICES}.get(pn.region)
        self.ui.roiSegmentSelector.visible = self.ui.inputsFormLayoutLabel5.visible = needs == "segment"
        self.ui.pointRow.visible = self.ui.inputsFormLayoutLabel7.visible = needs == "point"
        self.ui.methodsFrame.visible = pn.preset == "Custom"
        self.ui.resultsCollapsibleButton.enabled = pn.shownMap is not None or pn.metricsTable is not None
        self.ui.metricsTableView.setMRMLTableNode(pn.metricsTable)
        if pn.modelPath != self.ui.modelPathLineEdit.text:
            self.updateModelCard()
        self.updateResultDisplay()

    def updateResultDisplay(self) -> None:
        """Map, opacity and 3D from the parameter node, applied only when one of them changed."""
        pn = self._parameterNode
        if pn is None or pn.shownMap is None:
            self._shownState = None
            return
        state = (pn.shownMap.GetID(), pn.overlayOpacity, pn.showIn3D)
        if state == self._shownState:
            return
        changed3D = self._shownState is None or state[::2] != self._shownState[::2]
        self._shownState = state
        source = pn.shownMap.GetNodeReference("Esegeta.input") or pn.inputVolume
        slicer.util.setSliceViewerLayers(background=source, foreground=pn.shownMap, foregroundOpacity=pn.overlayOpacity)
        if changed3D:  # not on opacity changes: edits made in Volume Rendering are kept
            self.logic.showIn3D(pn.shownMap, pn.showIn3D)

    def updateModelCard(self) -> None:
        pn = self._parameterNode
        summary = slicer_logic.model_card_summary(self.logic.modelPath(pn) if pn else self.ui.modelPathLineEdit.text)
        self.ui.modelCardLabel.text = summary["text"]
        qt_panel.fill_combo(self.ui.targetClassComboBox, [(i, text, "") for i, text in slicer_logic.class_choices(summary)],
                            pn.targetClass if pn else 1)

    def onBrowseModel(self, folder: bool = False) -> None:
        window = slicer.util.mainWindow()  # a folder: an nnU-Net trained-model folder or a MONAI bundle
        path = qt.QFileDialog.getExistingDirectory(window, "Choose an nnU-Net or MONAI bundle folder") if folder else \
            qt.QFileDialog.getOpenFileName(window, "Choose a segmentation model", "", slicer_logic.MODEL_FILE_FILTER)
        if path:
            self.ui.modelPathLineEdit.text = path
            self._parameterNode.modelPath = path
            self.updateModelCard()

    def setField(self, name, value) -> None:
        if self._parameterNode is not None and value is not None:
            setattr(self._parameterNode, name, value)

    # ------------------------------------------------------------------ generated method panel
    def populateMethodPanel(self) -> None:
        """The Custom list in families, the parameter editors and the metrics, from the catalogue."""
        self.methodCheckBoxes, self.methodParamBoxes, self.metricCheckBoxes = qt_panel.build_method_panel(
            self.ui, self.catalog, self.onMethodsToggled, self.onParamEdited, self.onMetricsToggled)

    def syncGeneratedWidgets(self) -> None:
        """Widgets the wrapper does not connect, from the parameter node (a reopened scene restores them)."""
        if self._parameterNode is not None:
            qt_panel.show_parameter_node(self.ui, self._parameterNode, self.methodCheckBoxes, self.methodParamBoxes,
                                         self.metricCheckBoxes)

    def onPresetChosen(self, preset) -> None:
        if self._parameterNode is None or preset not in slicer_logic.PRESETS:
            return
        if preset != "Custom":
            self._parameterNode.methods = slicer_logic.join_names(slicer_logic.preset_methods(preset, self.catalog))
            self.syncGeneratedWidgets()

    def onMethodsToggled(self, checked=None) -> None:
        self._parameterNode.methods = slicer_logic.join_names(n for n, c in self.methodCheckBoxes.items() if c.checked)
        self.syncGeneratedWidgets()

    def onMetricsToggled(self, checked=None) -> None:
        self._parameterNode.metrics = slicer_logic.join_names(n for n, c in self.metricCheckBoxes.items() if c.checked)

    def onParamEdited(self, methodName, paramName, value) -> None:
        stored = slicer_logic.load_params_json(self._parameterNode.methodParams)
        stored.setdefault(methodName, {})[paramName] = value
        self._parameterNode.methodParams = json.dumps(stored, sort_keys=True)

    # ------------------------------------------------------------------ dependencies
    def onInstallDependencies(self) -> None:
        self.ensureDependencies()

    def ensureDependencies(self) -> bool:
        try:
            ready = self.logic.ensureDependencies(askConfirmation=True, report=self.log)
        except Exception as error:
            qt_panel.show_error("Esegeta could not install its Python packages.", error)
            return False
        if not ready:
            self.ui.statusLabel.text = "Esegeta needs PyTorch and Captum; nothing was installed."
        return ready

    # ------------------------------------------------------------------ run
    def log(self, text, level="info") -> None:
        """A line in the panel's log and in Slicer's log."""
        getattr(logging, level)("Esegeta: " + text)
        self.ui.logTextEdit.appendPlainText(text)

    def onApplyButton(self) -> None:
        if self.run is not None and self.run.state == "running":
            self.cancelRun()
            return
        if not self.ensureDependencies():
            return
        self.ui.statusLabel.text = "Writing the input volume..."
        self.ui.logTextEdit.clear()
        slicer.app.processEvents()
        try:
            with slicer.util.WaitCursor():
                self.run = self.logic.startRun(self._parameterNode, self.catalog)
        except Exception as error:
            self.ui.statusLabel.text = ""
            qt_panel.show_error("Esegeta could not start the run.", error)
            return
        self.ui.applyButton.text = "Cancel"
        self.ui.progressBar.value = 0
        self.ui.progressBar.setVisible(True)
        self.ui.statusLabel.text = "Starting (loading the model and PyTorch)..."
        self.pollTimer.start()
        self.onParameterNodeModified()

    def onPoll(self) -> None:
        self.closingRuns = [run for run in self.closingRuns if not (run.poll() or run.settled)]
        run = self.run
        if run is None:
            if not self.closingRuns:
                self.pollTimer.stop()
            return
        events = run.poll()
        for level, text in slicer_logic.log_entries(events):
            self.log(text, level)
        for event in events:
            if event["event"] == "progress":
                view = slicer_logic.progress_view(event, run.elapsed)
                self.ui.progressBar.value, self.ui.statusLabel.text = view.percent, view.text
        if run.state == "running":
            return
        if run.state == "done":
            self.importRun(run)
        else:
            failure = slicer_logic.failure_view(run.failure or {})
            self.ui.statusLabel.text = failure.message
            if not failure.cancelled:
                slicer.util.errorDisplay(failure.message, windowTitle="Esegeta", detailedText=failure.details)
        self.finishRun()

    def importRun(self, run) -> None:
        self.ui.statusLabel.text = "Adding the maps to the scene..."

        def between(method):
            self.ui.statusLabel.text = f"Adding {method} to the scene..."
            slicer.app.processEvents()

        try:
            with slicer.util.WaitCursor():
                nodes = self.logic.importRun(run, self._parameterNode, between)
            folder = slicer.mrmlScene.GetSubjectHierarchyNode().GetItemName(nodes["folder"])
            self.ui.statusLabel.text = f"Done in {run.elapsed:.0f} s: {len(nodes['maps'])} map(s) in '{folder}'."
        except Exception as error:
            qt_panel.show_error("Esegeta computed the maps but could not add them to the scene (nothing was added).", error)

    def cancelRun(self) -> None:
        """Returns at once: the poll timer completes the bookkeeping of the cancelled run."""
        if self.run is not None and self.run.state == "running":
            self.run.cancel()
            self.ui.statusLabel.text = slicer_logic.failure_view({"kind": "cancelled"}).message
            self.closingRuns.append(self.run)
        self.finishRun()

    def finishRun(self) -> None:
        self.run = None
        if self.pollTimer is not None and not self.closingRuns:
            self.pollTimer.stop()
        if hasattr(self, "ui"):
            self.ui.applyButton.text = "Apply"
            self.ui.progressBar.setVisible(False)
            self.onParameterNodeModified()

    def onExportScene(self) -> None:
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Export review scene", "esegeta-review.mrb",
                                              "Slicer data bundle (*.mrb)")
        try:
            if path:
                self.ui.statusLabel.text = f"Review scene written: {self.logic.exportReviewScene(path)}"
        except Exception as error:
            qt_panel.show_error("Esegeta could not write the review scene.", error)


class EsegetaLogic(ScriptedLoadableModuleLogic):
    """What the panel does, callable from the Python console and the self-test without the widget."""

    def getParameterNode(self):
        return EsegetaParameterNode(super().getParameterNode())

    def requirements(self):
        return slicer_logic.load_requirements(resourcePath(slicer_logic.REQUIREMENTS_FILE))

    def dependenciesPresent(self) -> bool:
        return slicer_logic.dependency_plan(self.requirements()).nothing_to_do

    def ensureDependencies(self, askConfirmation=True, report=logging.info) -> bool:
        """Install what is missing after one confirmation listing it all; False if the user declined."""
        def confirm(text):
            return not askConfirmation or slicer.util.confirmOkCancelDisplay(text, windowTitle="Esegeta")

        with slicer.util.WaitCursor():
            return dependencies.ensure(self.requirements(), confirm, report, slicer.app.applicationVersion)

    def methodCatalog(self):
        return slicer_logic.method_catalog()

    def modelPath(self, pn) -> str:
        return slicer_logic.resolved_model_path(pn.modelPath, pn.modelPathRelative, slicer.mrmlScene.GetRootDirectory())

    def startRun(self, pn, catalog=None):
        """Write the inputs and start the background worker; returns the `SceneRun` to poll."""
        from EsegetaLib.slicer.slicer_run import SceneRun

        if pn.inputVolume is None:
            raise EsegetaError("Choose an 'Input volume' first.")
        settings = slicer_logic.panel_settings(pn, slicer.mrmlScene.GetRootDirectory())
        request = slicer_logic.request_fields(settings, catalog or self.methodCatalog())
        run = SceneRun(slicer.mrmlScene, pn.inputVolume, request, segmentation_node=pn.roiSegmentation,
                       segment_id=pn.roiSegmentId or None, point_node=pn.regionPoint,
                       class_name=slicer_logic.class_name(settings), env=slicer.util.startupEnvironment(),
                       workdir=slicer.util.tempDirectory(key="Esegeta", includeDateTime=False))
        return run.start()

    def importRun(self, run, pn, betweenMaps=None):
        """Add a finished run's nodes to the scene (main thread) and point the panel at them."""
        nodes = run.import_result(opacity=pn.overlayOpacity, show_3d=pn.showIn3D, between_maps=betweenMaps)
        if nodes["shown"] is not None:
            pn.shownMap = nodes["shown"]
        pn.metricsTable = nodes["table"]
        return nodes

    def showIn3D(self, mapNode, visible) -> None:
        from EsegetaLib.slicer import scene as bridge

        bridge.show_only_in_3d(slicer.mrmlScene, mapNode, visible)

    def exportReviewScene(self, path) -> str:
        """The whole scene (input, segmentation, maps with their colour tables, table, parameters) as .mrb."""
        if not path.lower().endswith(".mrb"):
            path += ".mrb"
        if not slicer.util.saveScene(path):
            raise EsegetaError(f"Slicer could not write {path}; choose another folder.")
        return path


class EsegetaTest(ScriptedLoadableModuleTest):
    """Reload and Test, and the ctest on the extension build machines: the panel test
    (EsegetaTesting/widget_test.py: connectGui, the generated panel, presets, Apply and the poll
    loop) and the logic test (bundled sample + model, two cheap methods, then a cancel). Both need
    PyTorch and Captum for the run itself: in testing mode (build machines) the run is skipped when
    they are absent, never installed there."""

    def runTest(self):
        import unittest

        from EsegetaTesting import logic_test, widget_test

        suite = unittest.TestSuite()
        for case in (widget_test.EsegetaWidgetTest, logic_test.EsegetaLogicTest):
            suite.addTests(unittest.defaultTestLoader.loadTestsFromTestCase(case))
        result = unittest.TextTestRunner(verbosity=2).run(suite)
        self.assertTrue(result.wasSuccessful(), f"{len(result.failures)} failure(s), {len(result.errors)} error(s)")
