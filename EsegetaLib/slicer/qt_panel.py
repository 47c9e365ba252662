"""Qt glue for the Slicer module's generated panel: the Custom method list in families, each
method's parameter editors and the metric checklist, built from the catalogue.

The only module of EsegetaLib that touches Qt, and only inside desktop Slicer (`qt` is imported in
the functions, so importing this module needs no Qt). What to build is decided by `slicer_logic`
(`method_families`, `method_tooltip`, `param_editor`), which is tested without Slicer; the widget
names used here are checked against the .ui by Testing/slicer_module/test_module_static.py.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Dict, Iterable, Sequence, Tuple

from . import slicer_logic


def build_method_panel(ui, catalog: Sequence[Dict[str, Any]], on_methods: Callable, on_param: Callable,
                       on_metrics: Callable) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """Fill `ui.methodsFrame`, `ui.methodParamsFrame` and `ui.metricsFrame`. Returns the method
    check boxes, the per-method parameter group boxes and the metric check boxes, by name.
    `on_param(method, parameter, value)` is called when an editor changes."""
    import qt

    checks, boxes, metrics = {}, {}, {}
    frame, params = qt.QVBoxLayout(ui.methodsFrame), qt.QVBoxLayout(ui.methodParamsFrame)
    for title, methods in slicer_logic.method_families(catalog):
        group = qt.QGroupBox(title)
        grid = qt.QGridLayout(group)
        frame.addWidget(group)
        for index, method in enumerate(methods):
            check = qt.QCheckBox(method["name"])
            check.toolTip = slicer_logic.method_tooltip(method)
            check.connect("toggled(bool)", on_methods)
            grid.addWidget(check, index // 2, index % 2)
            checks[method["name"]] = check
            if method["params"]:
                box = qt.QGroupBox(method["name"])
                form = qt.QFormLayout(box)
                for param in method["params"]:
                    editor = slicer_logic.param_editor(param)
                    form.addRow(editor["label"] + ":", make_editor(
                        editor, lambda value, m=method["name"], p=editor["name"]: on_param(m, p, value)))
                params.addWidget(box)
                boxes[method["name"]] = box
    layout = qt.QVBoxLayout(ui.metricsFrame)
    for name in slicer_logic.metric_names():
        check = qt.QCheckBox(name)
        check.connect("toggled(bool)", on_metrics)
        layout.addWidget(check)
        metrics[name] = check
    ui.metricsPlaceholderLabel.visible = not metrics
    return checks, boxes, metrics


def make_editor(editor: Dict[str, Any], edited: Callable):
    """The Qt widget `slicer_logic.param_editor` describes, reporting changes to `edited(value)`."""
    import qt

    kind = editor["widget"]
    if kind in ("QSpinBox", "QDoubleSpinBox"):
        widget = qt.QSpinBox() if kind == "QSpinBox" else qt.QDoubleSpinBox()
        if kind == "QDoubleSpinBox":
            widget.decimals, widget.singleStep = editor["decimals"], editor["step"]
        widget.setRange(editor["minimum"], editor["maximum"])
        widget.value = editor["value"]
        widget.connect("valueChanged(int)" if kind == "QSpinBox" else "valueChanged(double)", edited)
    elif kind == "QCheckBox":
        widget = qt.QCheckBox()
        widget.checked = editor["value"]
        widget.connect("toggled(bool)", edited)
    elif kind == "QComboBox":
        widget = qt.QComboBox()
        widget.addItems(editor["choices"])
        widget.currentText = editor["value"]
        widget.connect("currentTextChanged(QString)", edited)
    else:
        widget = qt.QLineEdit(editor["value"])
        widget.placeholderText = "default"
        widget.connect("textChanged(QString)", edited)
    widget.toolTip = editor["tooltip"]
    widget.setProperty("EsegetaParameter", editor["name"])
    return widget


def write_editor(widget, value) -> None:
    """Show a stored value in an editor made by `make_editor`, without signalling a change."""
    import qt

    was_blocked = widget.blockSignals(True)
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
        widget.blockSignals(was_blocked)


def show_choices(checks: Dict[str, Any], names: Iterable[str]) -> None:
    """Tick exactly `names` among `checks`, without signalling."""
    names = set(names)
    for name, check in checks.items():
        was_blocked = check.blockSignals(True)
        check.checked = name in names
        check.blockSignals(was_blocked)


def show_params(boxes: Dict[str, Any], chosen: Iterable[str], stored: Dict[str, Dict[str, Any]]) -> None:
    """Show the parameter boxes of the chosen methods, with the stored values."""
    import qt

    chosen = set(chosen)
    for name, box in boxes.items():
        box.visible = name in chosen
        for widget in box.findChildren(qt.QWidget):
            parameter = widget.property("EsegetaParameter")
            if parameter and parameter in stored.get(name, {}):
                write_editor(widget, stored[name][parameter])


def select_data(combo, value) -> None:
    """Select the item of `combo` whose data is `value` (the first item if none), without signalling."""
    was_blocked = combo.blockSignals(True)
    combo.setCurrentIndex(max(0, combo.findData(value)))
    combo.blockSignals(was_blocked)


def fill_combo(combo, items: Iterable[Tuple[Any, str, str]], selected: Any = None) -> None:
    """Replace `combo`'s items with (data, text, tooltip) entries and select `selected`'s item,
    without signalling (the parameter node already holds the value)."""
    import qt

    was_blocked = combo.blockSignals(True)
    combo.clear()
    for data, text, tooltip in items:
        combo.addItem(text, data)
        if tooltip:
            combo.setItemData(combo.count - 1, tooltip, qt.Qt.ToolTipRole)
    combo.setCurrentIndex(max(0, combo.findData(selected)))
    combo.blockSignals(was_blocked)


def show_parameter_node(ui, pn, checks: Dict[str, Any], boxes: Dict[str, Any], metrics: Dict[str, Any]) -> None:
    """The widgets the parameter-node wrapper does not connect, from the node `pn`: the method and
    metric ticks, the parameter values, the region / patch size / class menus, the segment and the
    point (a reopened scene restores them all)."""
    chosen = slicer_logic.split_names(pn.methods)
    show_choices(checks, chosen)
    show_choices(metrics, slicer_logic.split_names(pn.metrics))
    show_params(boxes, chosen, slicer_logic.load_params_json(pn.methodParams))
    select_data(ui.regionComboBox, pn.region)
    select_data(ui.patchSizeComboBox, pn.patchSize)
    select_data(ui.targetClassComboBox, pn.targetClass)
    ui.roiSegmentSelector.setCurrentNode(pn.roiSegmentation)
    if pn.roiSegmentId:
        ui.roiSegmentSelector.setCurrentSegmentID(pn.roiSegmentId)
    ui.regionPointPlaceWidget.setCurrentNode(pn.regionPoint)


def show_error(message: str, error: BaseException) -> None:
    """A plain message (an `EsegetaError` in the panel's words); the technical details (traceback)
    behind 'Show Details' and in Slicer's log."""
    import logging
    import traceback

    import slicer

    from ..errors import EsegetaError

    if isinstance(error, EsegetaError):
        slicer.util.errorDisplay(slicer_logic.panel_wording(str(error)), windowTitle="Esegeta")
        return
    details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    logging.error(details)
    slicer.util.errorDisplay(f"{message}\n\n{error}", windowTitle="Esegeta", detailedText=details)
