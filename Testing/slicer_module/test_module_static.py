"""Static checks of the Slicer module (the application cannot run here): it compiles, calls only
`slicer.util` functions that exist, names only widgets the .ui has, stores every panel setting in
its parameter node with a widget type the parameter-node wrapper can connect, and imports nothing
heavy when Slicer loads it."""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import py_compile

import pytest

from module_source import (IN_SLICER_TESTS, MODULE, REPO, UI, base_type, eager_import_closure, has_annotation,
                           module_tree, parameter_node_fields, slicer_side_tree, slicer_util_calls,
                           ui_parameter_names, ui_widget_names, ui_widgets)

# Which widget classes the parameter-node wrapper connects to which field types
# (Slicer: Base/Python/slicer/parameterNodeWrapper/guiConnectors.py, read for this table).
CONNECTABLE = {
    "QCheckBox": {"bool"},
    "QPushButton": {"bool"},
    "QSpinBox": {"int"},
    "QSlider": {"int"},
    "QDoubleSpinBox": {"float"},
    "ctkSliderWidget": {"float"},
    "QComboBox": {"str", "int", "float", "bool"},  # with a Choice annotation
    "QLineEdit": {"str"},
    "QTextEdit": {"str"},
    "ctkPathLineEdit": {"Path"},
    "ctkDirectoryButton": {"Path"},
}
HEAVY = ("torch", "captum", "monai", "skimage", "sklearn", "matplotlib", "nibabel", "nrrd", "SimpleITK")


def test_module_compiles(tmp_path):
    py_compile.compile(str(MODULE), cfile=str(tmp_path / "Esegeta.pyc"), doraise=True)


def test_every_slicer_util_function_exists_in_slicer_core():
    spec = importlib.util.find_spec("slicer")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("slicer-core is not installed (pip install esegeta[scene])")
    util_path = next(iter(spec.submodule_search_locations)) + "/util.py"
    util_tree = ast.parse(open(util_path, encoding="utf-8").read())
    defined = {n.name for n in util_tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    used = slicer_util_calls(slicer_side_tree())
    assert used, "no slicer.util calls found: the AST walk is broken"
    assert {"loadUI", "childWidgetVariables", "errorDisplay", "pip_install"} <= used
    assert sorted(used - defined) == []


def test_every_widget_the_module_uses_is_in_the_ui():
    widgets = ui_widgets()
    used = ui_widget_names(slicer_side_tree())
    assert {"applyButton", "progressBar", "regionPointSelector", "methodsFrame", "metricsFrame",
            "roiSegmentSelector", "regionPointPlaceWidget", "logTextEdit", "presetComboBox"} <= used
    assert sorted(used - set(widgets)) == []


def test_segment_and_point_pickers_are_slicers_own_widgets():
    widgets = ui_widgets()
    assert widgets["roiSegmentSelector"] == "qMRMLSegmentSelectorWidget"  # follows segments as they change
    assert widgets["regionPointPlaceWidget"] == "qSlicerMarkupsPlaceWidget"  # place the point from the panel
    assert widgets["patchSizeComboBox"] == "QComboBox"  # only valid sizes
    assert widgets["logTextEdit"] == "QPlainTextEdit"
    assert "roiSegmentComboBox" not in widgets and "targetClassSpinBox" not in widgets


def test_in_slicer_widget_test_uses_real_widgets_and_the_panels_entry_points():
    """Esegeta/EsegetaTesting/widget_test.py cannot run here: every widget it names exists, and it
    exercises connectGui (a connected combo), the generated panel, Apply and the poll loop."""
    widget_test = next(p for p in IN_SLICER_TESTS if p.name == "widget_test.py")
    tree = ast.parse(widget_test.read_text(encoding="utf-8"))
    used = ui_widget_names(tree)
    assert used and sorted(used - set(ui_widgets())) == []
    assert "presetComboBox" in used and "preset" in ui_parameter_names()  # a connectGui round trip
    source = widget_test.read_text(encoding="utf-8")
    widget_methods = {n.name for n in ast.walk(module_tree()) if isinstance(n, ast.FunctionDef)}
    called = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
              and isinstance(n.value, ast.Attribute) and n.value.attr == "widget"}
    assert {"setup", "onApplyButton", "cleanup", "methodCheckBoxes", "metricCheckBoxes", "run"} <= called
    assert sorted(c for c in called if c not in widget_methods and not c.startswith("_")
                  and c not in ("ui", "logic", "run", "methodCheckBoxes", "metricCheckBoxes")) == []
    assert "EsegetaWidget(" in source and "processEvents" in source
    cmake = (REPO / "Esegeta" / "CMakeLists.txt").read_text(encoding="utf-8")
    for path in IN_SLICER_TESTS:
        assert f"EsegetaTesting/{path.name}" in cmake, f"{path.name} is not installed with the module"


def test_ui_parameter_names_map_to_parameter_node_fields_with_connectable_types():
    fields = parameter_node_fields(module_tree())
    names = ui_parameter_names()
    assert len(names) >= 10
    for name, (widget, cls) in names.items():
        assert name in fields, f"{widget} stores '{name}', which the parameter node does not have"
        kind = base_type(fields[name])
        if cls == "qMRMLNodeComboBox":
            assert kind.startswith("vtkMRML"), f"{widget} ({cls}) needs a node field, '{name}' is {kind}"
            continue
        assert kind in CONNECTABLE[cls], f"{widget} ({cls}) cannot show '{name}' of type {kind}"
        if cls == "QComboBox":
            assert has_annotation(fields[name], "Choice"), f"'{name}' on a combo box needs Choice([...])"
        if cls in ("ctkSliderWidget", "QSlider"):
            assert has_annotation(fields[name], "WithinRange"), f"'{name}' on a slider needs WithinRange"


def test_every_panel_setting_is_saved_in_the_parameter_node():
    """Settings with a fixed widget are connected through the .ui; the generated method/metric
    checklists and the segment choice are written by the widget into these fields."""
    fields = set(parameter_node_fields(module_tree()))
    connected = set(ui_parameter_names())
    generated = {"methods", "methodParams", "metrics", "roiSegmentId", "roiSegmentation", "targetClass", "region",
                 "patchSize", "modelPathRelative"}
    assert fields == connected | generated | {"metricsTable"}
    source = MODULE.read_text()
    for name in generated:
        assert any(f in source for f in (f"_parameterNode.{name} =", f'"{name}"', f"pn.{name} =")), \
            f"the widget never writes {name}"


def test_ui_is_well_formed_with_unique_names_and_a_scene_for_every_mrml_widget():
    import xml.etree.ElementTree as ET

    root = ET.parse(UI).getroot()
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names))
    assert root.find("widget").get("class") == "qMRMLWidget"
    receivers = {c.find("receiver").text for c in root.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"}
    mrml = {n for n, c in ui_widgets().items() if c.startswith("qMRML") and c != "qMRMLWidget"}
    assert mrml and mrml <= receivers
    declared = {c.find("class").text for c in root.iter("customwidget")}
    assert {c for c in ui_widgets().values() if not c.startswith("Q")} <= declared


def test_loading_the_module_imports_nothing_heavy():
    """Slicer imports Esegeta.py at startup: torch & co. must load on first Apply, never then."""
    closure = eager_import_closure(MODULE)
    assert "EsegetaLib/slicer/slicer_logic.py" in closure
    offenders = {f: sorted(m for m in mods if m.split(".")[0] in HEAVY) for f, mods in closure.items()}
    assert {f: m for f, m in offenders.items() if m} == {}


def test_icon_is_128_square_png():
    from PIL import Image

    with Image.open(REPO / "Resources" / "Icons" / "Esegeta.png") as image:
        assert image.format == "PNG" and image.size == (128, 128)


def test_sample_data_checksum_matches_the_bundled_sample():
    sample = REPO / "EsegetaLib" / "resources" / "sample_tof.nii.gz"
    if not sample.is_file():
        pytest.skip("the bundled sample is not generated yet")
    tree = module_tree()
    constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                 for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)}
    assert constants["SAMPLE_FILE"] == sample.name
    digest = hashlib.sha256(sample.read_bytes()).hexdigest()
    assert constants["SAMPLE_SHA256"] == f"SHA256:{digest}", (
        "EsegetaLib/resources/sample_tof.nii.gz changed: set SAMPLE_SHA256 in Esegeta/Esegeta.py to "
        f"'SHA256:{digest}'")


def test_self_test_methods_are_registered_and_cheap():
    pytest.importorskip("captum")
    from EsegetaLib.methods import get_method

    tree = module_tree()
    methods = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                   and any(isinstance(t, ast.Name) and t.id == "SELF_TEST_METHODS" for t in n.targets))
    assert len(methods) == 2
    for name in methods:
        spec = get_method(name)
        assert spec.family == "gradient" and spec.cost <= 1.0


def _attributes_used_on(tree, *owners):
    """Attribute names used on `owner` expressions (e.g. `pn`, `self.logic`) anywhere in the module."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) in owners:
            found.add(node.attr)
    return found


def test_names_the_module_uses_exist_where_it_looks_for_them():
    """Typos in calls the desktop application would only reveal at run time."""
    from EsegetaLib.slicer import slicer_logic
    from EsegetaLib.slicer.slicer_run import SceneRun

    tree = module_tree()
    assert sorted(n for n in _attributes_used_on(tree, "slicer_logic") if not hasattr(slicer_logic, n)) == []

    fields = set(parameter_node_fields(tree))
    used = _attributes_used_on(tree, "pn", "self._parameterNode")
    wrapper_api = {"connectGui", "disconnectGui"}
    assert sorted(used - fields - wrapper_api) == []

    logic = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "EsegetaLogic")
    methods = {n.name for n in logic.body if isinstance(n, ast.FunctionDef)} | {"getParameterNode"}
    assert sorted(_attributes_used_on(tree, "self.logic", "logic") - methods) == []

    instance = set()
    import inspect

    init = next(n for n in ast.walk(ast.parse(inspect.getsource(SceneRun)))
                if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    for node in ast.walk(init):
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "self":
            instance.add(node.attr)
    run_used = _attributes_used_on(tree, "run", "self.run")
    assert sorted(n for n in run_used if not hasattr(SceneRun, n) and n not in instance) == []
