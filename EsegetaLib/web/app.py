"""The `esegeta view` page: Slicer's slice and 3D views (trame-slicer) with the run's overlays.

Layout as in Slicer (axial, coronal, sagittal, 3D; or one of them large) with slice sliders; the
input as background, the segmentation as an outline, the selected attribution map as a foreground
overlay and as a volume rendering in 3D; method, opacity and threshold controls; the run's metrics
table, deletion/insertion plot and parameters beside the views. All rendering is Slicer's own
displayable managers, served as images by trame-slicer's remote-controlled areas.
"""
from __future__ import annotations

import base64
import json
from typing import Dict, List

from trame.app import TrameApp
from trame.widgets import client, html
from trame.widgets import vuetify3 as v3
from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

from .result import ViewerResult, flatten, format_value
from .scene_setup import LoadedScene, MapLayer, load_directory, load_mrb, set_threshold

DEFAULT_OPACITY = 0.5  # the foreground opacity the exported .mrb starts with
# run.json entries not worth a line on the page (the list of written files and their checksums).
HIDDEN_RUN_KEYS = ("outputs", "schema")

LAYOUT_NAMES = ["Four views", "Axial", "Coronal", "Sagittal", "3D"]


def viewer_layouts() -> Dict[str, Layout]:
    """Slicer's "Four-up" arrangement and each view alone (the "one large view" choice)."""
    axial, coronal = ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view()
    sagittal, threed = ViewLayoutDefinition.sagittal_view(), ViewLayoutDefinition.threed_view()
    four = Layout(LayoutDirection.Vertical, [
        Layout(LayoutDirection.Horizontal, [axial, threed]),
        Layout(LayoutDirection.Horizontal, [coronal, sagittal]),
    ])
    alone = {name: Layout(LayoutDirection.Vertical, [view])
             for name, view in zip(LAYOUT_NAMES[1:], (axial, coronal, sagittal, threed))}
    return {"Four views": four, **alone}


SOFTWARE_OPENGL = ("llvmpipe", "softpipe", "swrast", "software rasterizer")


def choose_volume_rendering_method(slicer_app) -> str:
    """GPU ray casting where there is a GPU; CPU ray casting on software OpenGL (Mesa llvmpipe on a
    server without one), where it is about ten times faster (measured: 0.4 s instead of 4 s for a
    500x400 view of a 32^3 map on 2 cores)."""
    method = "vtkMRMLGPURayCastVolumeRenderingDisplayNode"
    views = slicer_app.view_manager.get_threed_views()
    if views:
        capabilities = views[0].render_window().ReportCapabilities() or ""
        renderer = next((line for line in capabilities.splitlines() if "renderer string" in line.lower()), "")
        if any(name in renderer.lower() for name in SOFTWARE_OPENGL):
            method = "vtkMRMLCPURayCastVolumeRenderingDisplayNode"
    slicer_app.volume_rendering.SetDefaultRenderingMethod(method)
    return method


_LETTER_STYLE = ("position:absolute;color:#fff;font:bold 13px sans-serif;text-shadow:0 0 3px #000,0 0 2px #000;"
                 "pointer-events:none;")


def mark_view(server, view_id, view) -> None:
    """An invisible box covering each view, tagged with its Slicer name, so tests and users'
    scripts can find a view on the page (`.esegeta-view[data-view=Red]`); on slice views it carries
    the view's name and the orientation letters at its edges (state `view_marks`, from the views'
    slice-to-RAS axes once the scene is loaded)."""
    tag = view.get_singleton_tag()
    with html.Div(classes="esegeta-view", raw_attrs=[f'data-view="{tag}"'],
                  style="position:absolute;inset:0;pointer-events:none;"):
        if tag == "ThreeD" or not hasattr(view, "get_orientation"):
            return
        mark = f"(view_marks['{tag}'] || {{}})"
        html.Div(f"{{{{ {mark}.name }}}}", classes="esegeta-view-name",
                 style=_LETTER_STYLE + "top:4px;left:30px;font-weight:normal;")
        for edge, where in (("left", "left:30px;top:50%;"), ("right", "right:44px;top:50%;"),
                            ("top", "top:4px;left:50%;"), ("bottom", "bottom:30px;left:50%;")):
            html.Div(f"{{{{ {mark}.{edge} }}}}", classes=f"esegeta-letter esegeta-letter-{edge}",
                     style=_LETTER_STYLE + where)


def plane_name(right, up) -> str:
    """Axial, Coronal or Sagittal: the standard plane nearest to a view (Slicer calls a view turned
    to an oblique volume's axes "Reformat", which tells a reader nothing)."""
    import numpy as np

    normal = np.abs(np.cross(np.asarray(right, float), np.asarray(up, float)))
    return ("Sagittal", "Coronal", "Axial")[int(np.argmax(normal))]


# Columns of metrics.csv that say what a map is worth, in the order shown, with the short header
# the side panel has room for (the full name is the header's tooltip). Everything else (timings,
# memory, device, standard errors, raw variants) is behind the "details" switch.
QUALITY_COLUMNS = {
    "deletion_auc": "Del. AUC", "insertion_auc": "Ins. AUC", "infidelity_rel": "Infid. (rel)",
    "sensitivity_max": "Sens. max", "relevance_mass": "Mass", "relevance_rank": "Rank",
    "sparseness": "Gini", "complexity_rel": "Entropy (rel)", "relative_convergence_delta": "Compl. err",
    "randomisation_spearman": "Rand. rho", "randomisation_pass": "Rand. pass",
}


def split_metrics(columns: List[str], rows: List[List[str]]):
    """(quality, details): each {"headers": [{"key", "label", "title"}], "rows": [[method, ...]]},
    methods as rows. Quality holds the QUALITY_COLUMNS the run has; details every other column."""
    if "method" not in columns or not rows:
        return {"headers": [], "rows": []}, {"headers": [], "rows": []}
    index = columns.index("method")
    quality = [c for c in QUALITY_COLUMNS if c in columns]
    details = [c for c in columns if c != "method" and c not in quality]

    def table(names, labels):
        headers = [{"key": "method", "label": "Method", "title": "method"}] + [
            {"key": n, "label": labels.get(n, n.replace("_", " ")), "title": n} for n in names]
        body = [[row[index]] + [_short(row[columns.index(n)]) for n in names] for row in rows]
        return {"headers": headers, "rows": body}

    return table(quality, QUALITY_COLUMNS), table(details, {})


def _short(cell: str) -> str:
    """A number to 3 significant digits (the table is for reading; metrics.csv has them all)."""
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return cell
    return cell if value != value else f"{value:.3g}"


class EsegetaViewer(TrameApp):
    """One result on one page. Build with a scene already loaded (errors come before serving)."""

    def __init__(self, result: ViewerResult, server=None):
        super().__init__(server=server, client_type="vue3")
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.app.ui import create_vertical_slice_view_gutter_ui, create_vertical_view_gutter_ui

        self.server.enable_module(trame_slicer_module)
        self.result = result
        self.slicer_app = SlicerApp()
        register_rca_factories(
            self.slicer_app.view_manager, self.server,
            slice_view_ui_f=lambda s, i, v: (create_vertical_slice_view_gutter_ui(s, i, v), mark_view(s, i, v)),
            three_d_view_ui_f=lambda s, i, v: (create_vertical_view_gutter_ui(s, i, v), mark_view(s, i, v)),
        )
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout_dict(viewer_layouts())
        self.layout_manager.set_layout(LAYOUT_NAMES[0])
        choose_volume_rendering_method(self.slicer_app)
        self.scene: LoadedScene = self._load_scene()
        self._show_scene()
        self._init_state()
        self._build_ui()

    # -- scene -------------------------------------------------------------------------------
    def _load_scene(self) -> LoadedScene:
        if self.result.mrb_path is not None:
            return load_mrb(self.slicer_app, self.result)
        return load_directory(self.slicer_app, self.result)

    @property
    def slice_views(self):
        return self.slicer_app.view_manager.get_slice_views()

    def _show_scene(self) -> None:
        display = self.slicer_app.display_manager
        display.show_volume_in_slice_background(self.scene.input_node)
        for view in self.slice_views:
            view.fit_view_to_content()
        self.select_method(self.methods[0])
        self.set_opacity(DEFAULT_OPACITY)
        display.reset_views()

    @property
    def methods(self) -> List[str]:
        return list(self.scene.maps)

    @property
    def targets(self) -> List[str]:
        """Several targets: their names ("<target>/<method>" map keys), in run order; else []."""
        names: List[str] = []
        for key in self.scene.maps:
            target, several, _ = key.rpartition("/")
            if several and target not in names:
                names.append(target)
        return names

    def methods_of(self, target: str) -> List[str]:
        return [key.rpartition("/")[2] for key in self.scene.maps if key.rpartition("/")[0] == target]

    def map_key(self, method: str) -> str:
        """The map shown for `method` under the selected target."""
        target = self.state.target if self.state.has("target") else ""
        return f"{target}/{method}" if target else method

    @property
    def current(self) -> MapLayer:
        if not self.state.has("method"):
            return self.scene.maps[self.methods[0]]
        return self.scene.maps[self.map_key(self.state.method)]

    def select_method(self, name: str) -> None:
        """Show map `name` as the slices' foreground and alone in 3D."""
        layer = self.scene.maps[name]
        self.slicer_app.display_manager.show_volume_in_slice_foreground(layer.node)
        for other in self.scene.maps.values():
            if other.vr_display is not None:
                other.vr_display.SetVisibility(other is layer and self._show_3d())
            if other.legend is not None:
                other.legend.SetVisibility(other is layer)
        self._render()

    def _show_3d(self) -> bool:
        return bool(self.state.show_3d) if self.state.has("show_3d") else True

    def set_opacity(self, opacity: float) -> None:
        for view in self.slice_views:
            view.set_foreground_opacity(float(opacity))
        self._render(slices_only=True)  # the 3D view does not change: spare its (slow) re-render

    def _render(self, slices_only: bool = False) -> None:
        views = self.slice_views if slices_only else self.slicer_app.view_manager.get_views()
        for view in views:
            view.schedule_render()

    # -- state -------------------------------------------------------------------------------
    def _init_state(self) -> None:
        state, layer = self.state, self.scene.maps[self.methods[0]]
        state.trame__title = f"Esegeta: {self.result.title}"
        state.targets = self.targets
        state.target = self.targets[0] if self.targets else ""
        state.methods = self.methods_of(state.target) if self.targets else self.methods
        state.method = state.methods[0]
        state.layout_names = LAYOUT_NAMES
        state.layout_name = LAYOUT_NAMES[0]
        state.opacity = DEFAULT_OPACITY
        state.show_3d = True
        state.metrics, state.metrics_details = self._metrics()
        state.show_details = False
        state.show_curves = False
        state.view_marks = self._view_marks()
        state.plot_src = self._plot_src(state.target)
        state.parameters = self._parameters()
        self._publish_layer(layer)
        state.change("method")(self._on_method)
        state.change("opacity")(lambda opacity, **_: self.set_opacity(opacity))
        state.change("threshold")(self._on_threshold)
        state.change("layout_name")(lambda layout_name, **_: self.layout_manager.set_layout(layout_name))
        state.change("show_3d")(lambda **_: self.select_method(self.map_key(self.state.method)))
        state.change("target")(self._on_target)

    def _publish_layer(self, layer: MapLayer) -> None:
        self.state.update({
            "threshold": layer.threshold, "threshold_max": layer.top, "threshold_step": layer.top / 200.0,
            "legend": f"{layer.color_node.GetName()} over [{layer.low:.3g}, {layer.high:.3g}]",
            "color_node_id": layer.color_node.GetID(),
        })

    def _on_method(self, method, **_):
        key = self.map_key(method)
        if key in self.scene.maps:
            self.select_method(key)
            self._publish_layer(self.scene.maps[key])

    def _on_target(self, target, **_):
        methods = self.methods_of(target)
        if not methods:
            return
        self.state.plot_src = self._plot_src(target)
        self.state.methods = methods
        if self.state.method not in methods:
            self.state.method = methods[0]  # the method watcher shows it
        else:
            self._on_method(self.state.method)

    def _on_threshold(self, threshold, **_):
        layer = self.current
        if abs(float(threshold) - layer.threshold) > 1e-12:
            set_threshold(layer, float(threshold))
            self._render()

    def _metrics(self):
        columns, rows = self.result.metrics_columns, self.result.metrics_rows
        if not columns and self.scene.metrics is not None:
            columns, rows = self.scene.metrics
        return split_metrics(list(columns), [list(r) for r in rows])

    def _view_marks(self) -> Dict[str, Dict[str, str]]:
        """Each slice view's name and the anatomical letters at its edges, from its slice-to-RAS."""
        from ..slicer.previews import orientation_letters, screen_axes

        marks = {}
        for view in self.slice_views:
            node = view.mrml_view_node if hasattr(view, "mrml_view_node") else view._view_node
            right, up = screen_axes(node)
            marks[view.get_singleton_tag()] = dict(orientation_letters(right, up),
                                                   name=f"{plane_name(right, up)} ({node.GetLayoutLabel() or node.GetName()})")
        return marks

    def _plot_src(self, target: str = "") -> str:
        """The plot inline (one file, no static route to configure): with several targets, the
        chosen target's curves."""
        path = self.result.plot_paths.get(target) if target else None
        path = path or self.result.plot_path
        if path is None:
            return ""
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")

    def _parameters(self) -> List[List[str]]:
        run = self.result.run or {"parameters": self.scene.parameters or {}}
        run = {k: v for k, v in run.items() if k not in HIDDEN_RUN_KEYS}
        if isinstance(run.get("inputs"), list):  # one line per input file: role -> path
            run["inputs"] = {str(r.get("role", i)): r.get("path") for i, r in enumerate(run["inputs"])
                             if isinstance(r, dict)}
        return [[key, format_value(value) if not isinstance(value, list) else json.dumps(value)]
                for key, value in flatten(run).items()]

    # -- page --------------------------------------------------------------------------------
    def _build_ui(self) -> None:
        with SinglePageWithDrawerLayout(self.server, full_height=True) as self.ui:
            client.Style(".esegeta-table td, .esegeta-table th { font-size: 12px !important; "
                         "padding: 0 6px !important; height: 24px !important; } "
                         ".esegeta-metrics th, .esegeta-metrics-details th { white-space: normal; "
                         "line-height: 1.1; font-size: 11px !important; padding: 2px 4px !important; } "
                         ".esegeta-metrics td, .esegeta-metrics-details td { padding: 0 4px !important; "
                         "font-size: 11px !important; } "
                         ".esegeta-parameters table { table-layout: fixed; width: 100%; } "
                         ".esegeta-parameters td { overflow-wrap: anywhere; } "
                         ".esegeta-parameters td:first-child { width: 45%; color: #555; }")
            self.ui.title.set_text(f"Esegeta · {self.result.title}")
            self.ui.footer.hide()
            with self.ui.toolbar:
                v3.VSpacer()
                v3.VSelect(label="Target", v_model=("target",), items=("targets",), classes="esegeta-target mx-2",
                           density="compact", hide_details=True, style="max-width: 220px;",
                           v_show=("targets.length > 0",))
                v3.VSelect(label="Method", v_model=("method",), items=("methods",), classes="esegeta-method mx-2",
                           density="compact", hide_details=True, style="max-width: 280px;")
                v3.VSelect(label="Layout", v_model=("layout_name",), items=("layout_names",),
                           classes="esegeta-layout mx-2", density="compact", hide_details=True,
                           style="max-width: 180px;")
            with self.ui.drawer as drawer:
                drawer.width = 420
                self._build_controls()
                self._build_metrics()
                self._build_parameters()
            with self.ui.content:
                with html.Div(style="position: relative; width: 100%; height: calc(100vh - 64px);"):
                    self.layout_manager.initialize_layout_grid(self.ui)

    def _build_controls(self) -> None:
        with v3.VCard(flat=True, classes="pa-3"):
            v3.VCardSubtitle("Overlay")
            html.Div("{{ legend }}", classes="text-caption esegeta-legend mb-2")
            v3.VSlider(label="Opacity", v_model=("opacity",), min=0, max=1, step=0.05, thumb_label=True,
                       hide_details=True, density="compact", classes="esegeta-opacity")
            v3.VSlider(label="Hide |value| <", v_model=("threshold",), min=0, max=("threshold_max",),
                       step=("threshold_step",), hide_details=True, density="compact",
                       classes="esegeta-threshold")
            html.Div("{{ Number(threshold).toPrecision(3) }}", classes="text-caption text-right")
            v3.VCheckbox(label="Volume rendering of the map in 3D", v_model=("show_3d",), density="compact",
                         hide_details=True)

    def _build_metrics(self) -> None:
        with v3.VCard(flat=True, classes="pa-3", v_if=("metrics.rows.length || plot_src",)):
            v3.VCardSubtitle("Metrics")
            self._table("metrics", "esegeta-metrics")
            v3.VSwitch(label="Details: timings, memory, other statistics", v_model=("show_details",),
                       density="compact", hide_details=True, color="primary", classes="esegeta-details-switch",
                       v_if=("metrics_details.rows.length",))
            self._table("metrics_details", "esegeta-metrics-details", v_if="show_details")
            html.Img(src=("plot_src",), v_if=("plot_src",), classes="esegeta-plot mt-2",
                     style="width: 100%; cursor: zoom-in;", title="Click for the curves at full width",
                     click="show_curves = true")
            v3.VBtn("Curves at full width", v_if=("plot_src",), click="show_curves = true", size="small",
                    variant="tonal", classes="esegeta-curves-button mt-1")
        with v3.VDialog(v_model=("show_curves",), width="95vw", classes="esegeta-curves-dialog"):
            with v3.VCard():
                v3.VCardTitle("Deletion and insertion curves")
                html.Img(src=("plot_src",), classes="esegeta-plot-large",
                         style="display: block; margin: auto; width: 100%; max-height: 80vh; object-fit: contain;")
                with v3.VCardActions():
                    v3.VSpacer()
                    v3.VBtn("Close", click="show_curves = false")

    def _table(self, key: str, css: str, v_if: str = "") -> None:
        """Methods as rows; headers short, the full column name as tooltip; scrolls, never overflows."""
        condition = f"{key}.rows.length" + (f" && {v_if}" if v_if else "")
        with html.Div(style="overflow-x: auto;", v_if=(condition,)):
            with v3.VTable(density="compact", classes=f"esegeta-table {css}"):
                with html.Thead(), html.Tr():
                    html.Th("{{ h.label }}", v_for=f"h in {key}.headers", key="h.key", title=("h.title",))
                with html.Tbody():
                    with html.Tr(v_for=f"(row, i) in {key}.rows", key="i"):
                        html.Td("{{ cell }}", v_for="(cell, j) in row", key="j")

    def _build_parameters(self) -> None:
        with v3.VCard(flat=True, classes="pa-3", v_if=("parameters.length",)):
            v3.VCardSubtitle("Run")
            with v3.VTable(density="compact", classes="esegeta-table esegeta-parameters"):
                with html.Tbody():
                    with html.Tr(v_for="(p, i) in parameters", key="i"):
                        html.Td("{{ p[0] }}")
                        html.Td("{{ p[1] }}")
