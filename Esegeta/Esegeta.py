"""Esegeta: explain 3D segmentation models with attribution maps, inside 3D Slicer.

The panel is thin: every decision lives in `EsegetaLib` (Qt-free and tested without Slicer):
`EsegetaLib.slicer.slicer_logic` (dependencies, method checklist and parameter editors from the method
registry, settings -> request, progress and error texts), `EsegetaLib.slicer.slicer_run` (inputs written
from the scene, the background worker process, results imported through the scene bridge
`EsegetaLib.slicer.scene`) and `EsegetaLib.slicer.worker` (the process itself, `python -m EsegetaLib.slicer.worker`).

Nothing heavy is imported when Slicer loads this module: torch, Captum and the methods load on the
first Apply (after one confirmation to install what is missing).
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
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
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

from EsegetaLib.slicer import slicer_logic  # noqa: E402  (needs the path above; imports no torch)
from EsegetaLib.errors import EsegetaError  # noqa: E402
from EsegetaLib.options import REGIONS  # noqa: E402

MODULE_NAME = "Esegeta"
SAMPLE_NAME = "EsegetaSyntheticTOF"
SAMPLE_FILE = "sample_tof.nii.gz"  # EsegetaLib/resources/, made by scripts/make_sample.py
# Checked by Testing/slicer_module (the bundled file's SHA-256); SampleData verifies the copy with it.
SAMPLE_SHA256 = "SHA256:846547b02809338c0d5a1d6517d1c90e2ffa11989cfea47638e33340151d4e63"
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


#
# Esegeta
#


class Esegeta(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Esegeta"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["Esegeta developers"]
        self.parent.helpText = (
            "Explain what a 3D segmentation model looks at: attribution maps (Saliency, Integrated Gradients, "
            "GradCAM, Occlusion, ...) computed over the model's own sliding windows, shown over the input, "
            "with metrics of how faithful they are. Choose a volume and a model (the bundled vessel model "
            "works on the 'EsegetaSyntheticTOF' sample in Sample Data), tick methods and press Apply.")
        self.parent.acknowledgementText = (
            "Built on PyTorch, Captum and MONAI. Inspired by TorchEsegeta (Chatterjee et al.).")
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
        category="Esegeta",
        sampleName=SAMPLE_NAME,
        thumbnailFileName=resourcePath(os.path.join("Icons", MODULE_NAME + ".png")),
        uris=qt.QUrl.fromLocalFile(path).toString(),
        fileNames=SAMPLE_NAME + ".nii.gz",
        nodeNames=SAMPLE_NAME,
        checksums=SAMPLE_SHA256,
    )


#
# Parameter node: the panel's state, saved with the scene.
#


@parameterNodeWrapper
class EsegetaParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    modelPath: str = ""
    targetClass: Annotated[int, WithinRange(0, 255)] = 1
    region: Annotated[str, Choice(list(REGIONS))] = "predicted"
    roiSegmentation: vtkMRMLSegmentationNode
    roiSegmentId: str = ""
    regionPoint: vtkMRMLMarkupsFiducialNode
    methods: str = ",".join(SELF_TEST_METHODS)
    methodParams: str = "{}"
    device: Annotated[str, Choice(list(slicer_logic.DEVICE_CHOICES))] = "auto"
    precision: Annotated[str, Choice(["auto", "fp32", "bf16", "fp16"])] = "auto"
    patchSize: Annotated[int, WithinRange(0, 1024)] = 0
    overlap: Annotated[float, WithinRange(0.0, 0.9)] = 0.25
    metrics: str = ""
    shownMap: vtkMRMLScalarVolumeNode
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    showIn3D: bool = False
    metricsTable: vtkMRMLTableNode


#
# EsegetaWidget
#


class EsegetaWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.run = None
        self.catalog = None
        self.methodCheckBoxes = {}
        self.methodParamBoxes = {}
        self.metricCheckBoxes = {}
        self.pollTimer = None
        self._shownState = None
        self._shownModelPath = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(resourcePath("UI/Esegeta.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = EsegetaLogic()

        self.ui.methodsFrame.setLayout(qt.QGridLayout())
        self.ui.methodParamsFrame.setLayout(qt.QVBoxLayout())
        self.ui.metricsFrame.setLayout(qt.QVBoxLayout())
        self.ui.shownMapSelector.addAttribute("vtkMRMLScalarVolumeNode", "Esegeta.method")
        self.ui.progressBar.setVisible(False)

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_MILLISECONDS)
        self.pollTimer.connect("timeout()", self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.modelBrowseButton.connect("clicked(bool)", self.onBrowseModel)
        self.ui.modelPathLineEdit.connect("editingFinished()", self.updateModelCard)
        self.ui.roiSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateSegmentList)
        self.ui.roiSegmentComboBox.connect("currentIndexChanged(int)", self.onSegmentChosen)
        self.ui.exportSceneButton.connect("clicked(bool)", self.onExportScene)

        self.initializeParameterNode()
        self.populateMethodPanel(loadCatalog=self.logic.catalogAvailable())
        self.updateModelCard()

    def cleanup(self) -> None:
        self.cancelRun()
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

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

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
        region = pn.region
        for widget in (self.ui.roiSegmentationSelector, self.ui.roiSegmentComboBox):
            widget.enabled = region == "roi"
        self.ui.regionPointSelector.enabled = region == "point"
        self.ui.resultsCollapsibleButton.enabled = pn.shownMap is not None or pn.metricsTable is not None
        self.ui.metricsTableView.setMRMLTableNode(pn.metricsTable)
        if pn.modelPath != self._shownModelPath:  # e.g. restored from a saved scene
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
        self._shownState = state
        slicer.util.setSliceViewerLayers(foreground=pn.shownMap, foregroundOpacity=pn.overlayOpacity)
        self.logic.showIn3D(pn.shownMap, pn.showIn3D)

    def updateModelCard(self) -> None:
        self._shownModelPath = self.ui.modelPathLineEdit.text
        summary = self.logic.modelSummary(self._shownModelPath)
        self.ui.modelCardLabel.text = summary["text"]
        classes = summary.get("classes")
        self.ui.targetClassSpinBox.toolTip = (
            "Output class whose score is explained: " + ", ".join(f"{i} = {c}" for i, c in enumerate(classes))
            if classes else "Index of the output class whose score is explained.")

    def onBrowseModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), "Choose a segmentation model", "",
            "Models (*.pt *.ts *.pt2 *.json);;All files (*)")
        if path:
            self.ui.modelPathLineEdit.text = path
            self._parameterNode.modelPath = path
            self.updateModelCard()

    def updateSegmentList(self, node=None) -> None:
        combo = self.ui.roiSegmentComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem("(all segments)", "")
        chosen = self._parameterNode.roiSegmentId if self._parameterNode else ""
        if node is not None:
            segmentation = node.GetSegmentation()
            for index in range(segmentation.GetNumberOfSegments()):
                segmentId = segmentation.GetNthSegmentID(index)
                combo.addItem(segmentation.GetSegment(segmentId).GetName(), segmentId)
                if segmentId == chosen:
                    combo.setCurrentIndex(combo.count - 1)
        combo.blockSignals(wasBlocked)

    def onSegmentChosen(self, index) -> None:
        if self._parameterNode is not None and index >= 0:
            self._parameterNode.roiSegmentId = self.ui.roiSegmentComboBox.itemData(index) or ""

    # ------------------------------------------------------------------ generated method panel
    def populateMethodPanel(self, loadCatalog=True) -> None:
        """Checklist and parameter editors from the method registry's metadata."""
        if not loadCatalog:
            self.ui.methodsPlaceholderLabel.visible = True
            self.ui.installDependenciesButton.visible = True
            self.ui.methodParamsGroupBox.visible = False
            return
        self.catalog = self.logic.methodCatalog()
        self.ui.methodsPlaceholderLabel.visible = False
        self.ui.installDependenciesButton.visible = False
        self.ui.methodParamsGroupBox.visible = True
        grid = self.ui.methodsFrame.layout()
        paramsLayout = self.ui.methodParamsFrame.layout()
        for widget in list(self.methodCheckBoxes.values()) + list(self.methodParamBoxes.values()):
            widget.setParent(None)
        self.methodCheckBoxes, self.methodParamBoxes = {}, {}
        for index, method in enumerate(self.catalog):
            checkBox = qt.QCheckBox(method["name"])
            checkBox.toolTip = slicer_logic.method_tooltip(method)
            checkBox.connect("toggled(bool)", self.onMethodsToggled)
            grid.addWidget(checkBox, index // 2, index % 2)
            self.methodCheckBoxes[method["name"]] = checkBox
            if method["params"]:
                box = qt.QGroupBox(method["name"])
                form = qt.QFormLayout(box)
                for param in method["params"]:
                    editor = slicer_logic.param_editor(param)
                    form.addRow(editor["label"] + ":", self.makeEditor(method["name"], editor))
                paramsLayout.addWidget(box)
                self.methodParamBoxes[method["name"]] = box
        self.populateMetrics()
        self.syncGeneratedWidgets()

    def makeEditor(self, methodName, editor):
        kind = editor["widget"]
        if kind == "QSpinBox":
            widget = qt.QSpinBox()
            widget.setRange(editor["minimum"], editor["maximum"])
            widget.value = editor["value"]
            widget.connect("valueChanged(int)", lambda value: self.onParamEdited(methodName, editor["name"], value))
        elif kind == "QDoubleSpinBox":
            widget = qt.QDoubleSpinBox()
            widget.decimals = editor["decimals"]
            widget.setRange(editor["minimum"], editor["maximum"])
            widget.singleStep = editor["step"]
            widget.value = editor["value"]
            widget.connect("valueChanged(double)", lambda value: self.onParamEdited(methodName, editor["name"], value))
        elif kind == "QCheckBox":
            widget = qt.QCheckBox()
            widget.checked = editor["value"]
            widget.connect("toggled(bool)", lambda value: self.onParamEdited(methodName, editor["name"], value))
        elif kind == "QComboBox":
            widget = qt.QComboBox()
            widget.addItems(editor["choices"])
            widget.currentText = editor["value"]
            widget.connect("currentTextChanged(QString)", lambda value: self.onParamEdited(methodName, editor["name"], value))
        else:
            widget = qt.QLineEdit(editor["value"])
            widget.placeholderText = "default"
            widget.connect("textChanged(QString)", lambda value: self.onParamEdited(methodName, editor["name"], value))
        widget.toolTip = editor["tooltip"]
        widget.setProperty("EsegetaParameter", editor["name"])
        return widget

    def populateMetrics(self) -> None:
        layout = self.ui.metricsFrame.layout()
        for checkBox in self.metricCheckBoxes.values():
            checkBox.setParent(None)
        self.metricCheckBoxes = {}
        names = self.logic.metricNames()
        self.ui.metricsPlaceholderLabel.visible = not names
        for name in names:
            checkBox = qt.QCheckBox(name)
            checkBox.connect("toggled(bool)", self.onMetricsToggled)
            layout.addWidget(checkBox)
            self.metricCheckBoxes[name] = checkBox

    def syncGeneratedWidgets(self) -> None:
        """Generated checkboxes and editors from the parameter node (a reopened scene restores them)."""
        pn = self._parameterNode
        if pn is None:
            return
        chosen = slicer_logic.split_names(pn.methods)
        stored = slicer_logic.load_params_json(pn.methodParams)
        for name, checkBox in self.methodCheckBoxes.items():
            wasBlocked = checkBox.blockSignals(True)
            checkBox.checked = name in chosen
            checkBox.blockSignals(wasBlocked)
        for name, box in self.methodParamBoxes.items():
            box.visible = name in chosen
            for widget in box.findChildren(qt.QWidget):
                paramName = widget.property("EsegetaParameter")
                if paramName and paramName in stored.get(name, {}):
                    self.writeEditor(widget, stored[name][paramName])
        metrics = slicer_logic.split_names(pn.metrics)
        for name, checkBox in self.metricCheckBoxes.items():
            wasBlocked = checkBox.blockSignals(True)
            checkBox.checked = name in metrics
            checkBox.blockSignals(wasBlocked)
        self.updateSegmentList(pn.roiSegmentation)

    @staticmethod
    def writeEditor(widget, value) -> None:
        wasBlocked = widget.blockSignals(True)
        try:
            if isinstance(widget, qt.QCheckBox):
                widget.checked = bool(value)
            elif isinstance(widget, (qt.QSpinBox, qt.QDoubleSpinBox)):
                widget.value = value
            elif isinstance(widget, qt.QComboBox):
                widget.currentText = str(value)
            elif isinstance(widget, qt.QLineEdit):
                widget.text = "" if value is None else (value if isinstance(value, str) else json.dumps(value))
        finally:
            widget.blockSignals(wasBlocked)

    def onMethodsToggled(self, checked=None) -> None:
        names = [name for name, checkBox in self.methodCheckBoxes.items() if checkBox.checked]
        self._parameterNode.methods = slicer_logic.join_names(names)
        for name, box in self.methodParamBoxes.items():
            box.visible = name in names

    def onMetricsToggled(self, checked=None) -> None:
        names = [name for name, checkBox in self.metricCheckBoxes.items() if checkBox.checked]
        self._parameterNode.metrics = slicer_logic.join_names(names)

    def onParamEdited(self, methodName, paramName, value) -> None:
        stored = slicer_logic.load_params_json(self._parameterNode.methodParams)
        stored.setdefault(methodName, {})[paramName] = value
        self._parameterNode.methodParams = json.dumps(stored, sort_keys=True)

    # ------------------------------------------------------------------ dependencies
    def onInstallDependencies(self) -> None:
        if not self.ensureDependencies():
            return
        try:
            self.populateMethodPanel()
        except Exception as error:
            showError("The packages are installed but the methods could not be loaded; restart Slicer.", error)

    def ensureDependencies(self) -> bool:
        try:
            ready = self.logic.ensureDependencies(askConfirmation=True)
        except Exception as error:
            showError("Esegeta could not install its Python packages.", error)
            return False
        if not ready:
            self.ui.statusLabel.text = "Esegeta needs PyTorch and Captum; nothing was installed."
        return ready

    # ------------------------------------------------------------------ run
    def onApplyButton(self) -> None:
        if self.run is not None and self.run.state == "running":
            self.cancelRun()
            return
        if not self.ensureDependencies():
            return
        pn = self._parameterNode
        try:
            if self.catalog is None:
                self.populateMethodPanel()
            self.run = self.logic.startRun(pn, self.catalog)
        except EsegetaError as error:
            slicer.util.errorDisplay(str(error), windowTitle="Esegeta")
            return
        except Exception as error:
            showError("Esegeta could not start the run.", error)
            return
        self.ui.applyButton.text = "Cancel"
        self.ui.progressBar.value = 0
        self.ui.progressBar.setVisible(True)
        self.ui.statusLabel.text = "Starting (loading the model and PyTorch)..."
        self.pollTimer.start()
        self.onParameterNodeModified()

    def onPoll(self) -> None:
        run = self.run
        if run is None:
            self.pollTimer.stop()
            return
        for event in run.poll():
            if event["event"] == "progress":
                view = slicer_logic.progress_view(event, run.elapsed)
                self.ui.progressBar.value = view.percent
                self.ui.statusLabel.text = view.text
            elif event["event"] == "warning":
                self.ui.statusLabel.text = "Note: " + event.get("message", "")
        if run.state == "running":
            return
        self.pollTimer.stop()
        if run.state == "done":
            try:
                nodes = self.logic.importRun(run, self._parameterNode)
                self.ui.statusLabel.text = (
                    f"Done in {run.elapsed:.0f} s: {len(nodes['maps'])} map(s) in the folder "
                    f"'{slicer.mrmlScene.GetSubjectHierarchyNode().GetItemName(nodes['folder'])}'.")
            except Exception as error:
                showError("Esegeta computed the maps but could not add them to the scene.", error)
        else:
            failure = slicer_logic.failure_view(run.failure or {})
            self.ui.statusLabel.text = failure.message
            if not failure.cancelled:
                slicer.util.errorDisplay(failure.message, windowTitle="Esegeta", detailedText=failure.details)
        self.finishRun()

    def cancelRun(self) -> None:
        if self.run is not None and self.run.state == "running":
            self.run.cancel()
            self.ui.statusLabel.text = slicer_logic.failure_view({"kind": "cancelled"}).message
        self.finishRun()

    def finishRun(self) -> None:
        if self.pollTimer is not None:
            self.pollTimer.stop()
        self.run = None
        if hasattr(self, "ui"):
            self.ui.applyButton.text = "Apply"
            self.ui.progressBar.setVisible(False)
            self.onParameterNodeModified()

    # ------------------------------------------------------------------ export
    def onExportScene(self) -> None:
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Export review scene", "esegeta-review.mrb",
                                              "Slicer data bundle (*.mrb)")
        if not path:
            return
        try:
            written = self.logic.exportReviewScene(path)
        except Exception as error:
            showError("Esegeta could not write the review scene.", error)
            return
        self.ui.statusLabel.text = f"Review scene written: {written}"


def _pipEnsure():
    """`slicer.packaging.pip_ensure` (named `slicer.pydeps.pip_ensure` in some 5.11 previews), or None."""
    import importlib

    for name in ("slicer.packaging", "slicer.pydeps"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "pip_ensure"):
            return module.pip_ensure
    return None


def showError(message, error) -> None:
    """A plain message; the technical details (traceback) behind 'Show Details'."""
    import traceback

    if isinstance(error, EsegetaError):
        slicer.util.errorDisplay(str(error), windowTitle="Esegeta")
        return
    details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    logging.error(details)
    slicer.util.errorDisplay(f"{message}\n\n{error}", windowTitle="Esegeta", detailedText=details)


#
# EsegetaLogic
#


class EsegetaLogic(ScriptedLoadableModuleLogic):
    """What the panel does, callable from the Python console and the self-test without the widget."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return EsegetaParameterNode(super().getParameterNode())

    # ---- dependencies (never at import; on the first Apply)
    def requirements(self):
        return slicer_logic.load_requirements(resourcePath(slicer_logic.REQUIREMENTS_FILE))

    def catalogAvailable(self) -> bool:
        plan = slicer_logic.dependency_plan(self.requirements())
        return plan.nothing_to_do and slicer_logic.catalog_available()

    def ensureDependencies(self, askConfirmation=True) -> bool:
        """Install what is missing after one confirmation listing it all; False if the user declined."""
        plan = slicer_logic.dependency_plan(self.requirements())
        if plan.nothing_to_do:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(plan.confirmation(), windowTitle="Esegeta"):
            return False
        with slicer.util.WaitCursor():
            if plan.torch_needed:
                self.installTorch(plan.torch_requirement)
            if plan.pip_missing:
                self.installPackages(plan.pip_missing)
        remaining = slicer_logic.dependency_plan(self.requirements())
        if not remaining.nothing_to_do:
            raise EsegetaError("Some packages are still missing after installing ("
                               + ", ".join(remaining.pip_missing + (["torch"] if remaining.torch_needed else []))
                               + "); restart Slicer and press Apply again.")
        return True

    @staticmethod
    def installTorch(requirement) -> None:
        """PyTorch through the PyTorch extension, which picks the CUDA/CPU build for this computer."""
        try:
            import PyTorchUtils
        except ImportError:
            raise EsegetaError("Esegeta needs the PyTorch extension: install 'PyTorch' from the Extensions Manager "
                               "and restart Slicer.") from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=requirement)
        if torch is None:
            raise EsegetaError("PyTorch could not be installed; use the 'PyTorch Util' module to install it, "
                               "then press Apply again.")

    @staticmethod
    def installPackages(requirements) -> None:
        """Everything else with pip, Slicer's own numpy/SimpleITK/requests pinned by a constraints file."""
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix="-constraints.txt", delete=False) as handle:
            handle.write(slicer_logic.protection_constraints())
            constraints = handle.name
        try:
            pipEnsure = _pipEnsure()
            if pipEnsure is not None:  # Slicer >= 5.11: checks, installs, offers a restart if needed
                pipEnsure(list(requirements), constraints=constraints, prompt_install=False, requester="Esegeta")
            else:
                slicer.util.pip_install(list(requirements) + ["-c", constraints])
        finally:
            os.remove(constraints)

    # ---- panel contents
    def methodCatalog(self):
        return slicer_logic.method_catalog()

    def metricNames(self):
        return slicer_logic.metric_names()

    def modelSummary(self, path):
        return slicer_logic.model_card_summary(path)

    # ---- run
    def panelSettings(self, pn):
        summary = slicer_logic.model_card_summary(pn.modelPath)
        classes = summary.get("classes")
        point = pn.regionPoint
        return slicer_logic.PanelSettings(
            methods=slicer_logic.split_names(pn.methods),
            method_params=slicer_logic.load_params_json(pn.methodParams),
            model_path=pn.modelPath,
            class_index=pn.targetClass,
            region=pn.region,
            has_roi=pn.roiSegmentation is not None,
            has_point=point is not None and point.GetNumberOfControlPoints() > 0,
            device=pn.device,
            precision=pn.precision,
            patch_size=pn.patchSize,
            overlap=pn.overlap,
            metrics=slicer_logic.split_names(pn.metrics),
            n_classes=len(classes) if classes else None,
            activation=getattr(pn, "activation", "auto"),  # advanced settings, where the panel has them
            fold=getattr(pn, "fold", ""),
        )

    def startRun(self, pn, catalog=None):
        """Write the inputs and start the background worker; returns the `SceneRun` to poll."""
        from EsegetaLib.slicer.slicer_run import SceneRun

        if pn.inputVolume is None:
            raise EsegetaError("Choose an input volume first.")
        request = slicer_logic.request_fields(self.panelSettings(pn), catalog)
        classes = slicer_logic.model_card_summary(pn.modelPath).get("classes")
        className = str(classes[pn.targetClass]) if classes and pn.targetClass < len(classes) else None
        run = SceneRun(slicer.mrmlScene, pn.inputVolume, request,
                       segmentation_node=pn.roiSegmentation, segment_id=pn.roiSegmentId or None,
                       point_node=pn.regionPoint, class_name=className,
                       env=slicer.util.startupEnvironment())
        return run.start()

    def importRun(self, run, pn):
        """Add a finished run's nodes to the scene (main thread) and point the panel at them."""
        nodes = run.import_result(opacity=pn.overlayOpacity, show_3d=pn.showIn3D)
        if nodes["shown"] is not None:
            pn.shownMap = nodes["shown"]
        pn.metricsTable = nodes["table"]
        return nodes

    def showIn3D(self, mapNode, visible) -> None:
        from EsegetaLib.slicer import scene as bridge

        if visible:
            bridge.show_volume_rendering(slicer.mrmlScene, mapNode)
        vrLogic = slicer.modules.volumerendering.logic()
        for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if node.GetAttribute("Esegeta.method") is None:
                continue
            display = vrLogic.GetFirstVolumeRenderingDisplayNode(node)
            if display is not None:
                display.SetVisibility(bool(visible) and node is mapNode)

    def exportReviewScene(self, path) -> str:
        """The whole scene (input, segmentation, maps with their colour tables, table, parameters) as .mrb."""
        if not path.lower().endswith(".mrb"):
            path += ".mrb"
        if not slicer.util.saveScene(path):
            raise EsegetaError(f"Slicer could not write {path}; choose another folder.")
        return path


#
# EsegetaTest
#


class EsegetaTest(ScriptedLoadableModuleTest):
    """Self-test: bundled sample + bundled model, two cheap methods, the created nodes checked;
    then a cancelled run must leave the scene exactly as it was."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ExplainSample()
        self.setUp()
        self.test_CancelLeavesSceneUnchanged()

    def loadSample(self):
        import SampleData

        registerSampleData()
        volume = SampleData.SampleDataLogic().downloadSample(SAMPLE_NAME)
        self.assertIsNotNone(volume, "the bundled sample did not load")
        return volume

    def configuredParameterNode(self, volume):
        logic = EsegetaLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        pn = logic.getParameterNode()
        pn.inputVolume = volume
        pn.modelPath = ""
        pn.methods = ",".join(SELF_TEST_METHODS)
        pn.methodParams = "{}"
        pn.region = "predicted"
        pn.device = "auto"
        pn.metrics = ""
        return logic, pn

    def test_ExplainSample(self):
        import numpy as np

        self.delayDisplay("Loading the bundled sample")
        volume = self.loadSample()
        logic, pn = self.configuredParameterNode(volume)
        self.delayDisplay("Explaining with " + " and ".join(SELF_TEST_METHODS) + " (a minute on a CPU)")
        run = logic.startRun(pn, logic.methodCatalog())
        self.assertEqual(run.wait(timeout=1800), "done", (run.failure or {}).get("details", ""))
        nodes = logic.importRun(run, pn)

        self.assertEqual(sorted(nodes["maps"]), sorted(SELF_TEST_METHODS))
        inputArray = slicer.util.arrayFromVolume(volume)
        inputMatrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(inputMatrix)
        for method, node in nodes["maps"].items():
            self.assertIn(method, node.GetName())
            values = slicer.util.arrayFromVolume(node)
            self.assertEqual(values.shape, inputArray.shape)
            self.assertEqual(values.dtype, np.float32)
            self.assertTrue(np.isfinite(values).all() and np.abs(values).max() > 0, method)
            matrix = vtk.vtkMatrix4x4()
            node.GetIJKToRASMatrix(matrix)
            for r in range(4):
                for c in range(4):
                    self.assertAlmostEqual(matrix.GetElement(r, c), inputMatrix.GetElement(r, c), places=5)
            colorID = node.GetDisplayNode().GetColorNodeID()
            self.assertIn(colorID, ("vtkMRMLColorTableNodeFileInferno.txt",
                                    "vtkMRMLColorTableNodeFileDivergingBlueRed.txt"))
        segmentation = nodes["segmentation"]
        self.assertIsNotNone(segmentation, "the bundled model found no vessels in the bundled sample")
        self.assertGreater(segmentation.GetSegmentation().GetNumberOfSegments(), 0)
        table = nodes["table"]
        self.assertEqual(table.GetNumberOfRows(), len(SELF_TEST_METHODS))
        composite = slicer.app.layoutManager().sliceWidget("Red").sliceLogic().GetSliceCompositeNode()
        self.assertEqual(composite.GetForegroundVolumeID(), pn.shownMap.GetID())
        self.delayDisplay("Explained: maps, segmentation and metrics table created")

    def test_CancelLeavesSceneUnchanged(self):
        volume = self.loadSample()
        logic, pn = self.configuredParameterNode(volume)
        before = sorted(node.GetID() for node in slicer.util.getNodes().values())
        run = logic.startRun(pn, logic.methodCatalog())
        for _ in range(20):  # let it start working, then cancel
            run.poll()
            slicer.app.processEvents()
            qt.QThread.msleep(100)
        run.cancel()
        self.assertEqual(run.state, "cancelled")
        after = sorted(node.GetID() for node in slicer.util.getNodes().values())
        self.assertEqual(before, after)
        self.delayDisplay("Cancel left the scene unchanged")
