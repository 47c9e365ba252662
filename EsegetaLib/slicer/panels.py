"""Labelled preview panels: one per method and one overview sheet of every method on the same slices.

Each slice is rendered by Slicer's own slice logic (`previews.render_view`: background, the map
with its colour table, window and threshold, the segmentation outline), in a viewport shaped like the
volume's physical extent in that plane, so a thin anisotropic volume is shown at its true
proportions and not as a strip in a square. matplotlib lays the renders out with what a picture
needs to be read on its own: the method's name, orientation letters (R/L, A/P, S/I, from each view's
slice-to-RAS axes), and a colour bar with the map's units and display range.

Files: `previews/<Method>.png` (axial, coronal, sagittal through the method's strongest attribution
inside the region, and the 3D view where offscreen OpenGL works) and `previews/overview.png` (one
row per method, all cut through the same point: the first method's strongest attribution).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import colors
from .previews import (VIEWS, egl_available, outline_labelmap, remove_outline, render_3d,
                       render_view, strongest_point)

PANEL_DPI = 100
TEXT_OUTLINE = "black"


def file_name(method: str) -> str:
    """A file name for a method's panel (`GradCAM++` -> `GradCAM++.png`; path separators replaced)."""
    return re.sub(r"[^A-Za-z0-9+#._-]", "_", method) + ".png"


def map_units(method: str, metadata: Optional[Mapping[str, Any]], score: str = "logit") -> str:
    """What a map's values are, for its colour bar. The target score F is a sum of `score`s over the
    region (DESIGN: "What a patched run explains"); gradients are per unit of input intensity."""
    meta = dict(metadata or {})
    family = meta.get("family", "")
    name = method.split("#")[0].split(":")[-1]
    if family == "layer":
        return "layer relevance (arbitrary units)"
    if name in ("Saliency", "SmoothGrad", "GuidedBackprop", "Deconvolution"):
        return f"gradient of the {score} sum (per intensity unit)"
    if name in ("SmoothGradSquared", "VarGrad"):
        return f"squared gradient of the {score} sum (per intensity unit squared)"
    return f"contribution to the {score} sum"


def colour_bar_of(node) -> Tuple[Any, float, float]:
    """(matplotlib colormap, low, high) of a map node's display: its colour table and fixed window."""
    import matplotlib
    from matplotlib.colors import ListedColormap

    display = node.GetScalarVolumeDisplayNode() or node.GetDisplayNode()
    low, high = float(display.GetWindowLevelMin()), float(display.GetWindowLevelMax())
    color_id = display.GetColorNodeID() or ""
    for name, (cmap_name, _) in colors.TABLES.items():
        if color_id == colors.color_node_id(name):
            return matplotlib.colormaps[cmap_name], low, high
    table = display.GetColorNode().GetLookupTable()  # any other table: its own colours
    rgba = np.array([table.GetTableValue(i) for i in range(table.GetNumberOfTableValues())])
    return ListedColormap(rgba[:, :3]), low, high


def _show(ax, view: Mapping[str, Any], title: str, fontsize: int = 9) -> None:
    import matplotlib.patheffects as effects

    ax.imshow(view["rgb"], interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=fontsize)
    letters = view.get("letters")
    if not letters:
        return
    style = dict(color="white", fontsize=fontsize + 1, fontweight="bold",
                 path_effects=[effects.withStroke(linewidth=2, foreground=TEXT_OUTLINE)])
    ax.text(0.02, 0.5, letters["left"], transform=ax.transAxes, ha="left", va="center", **style)
    ax.text(0.98, 0.5, letters["right"], transform=ax.transAxes, ha="right", va="center", **style)
    ax.text(0.5, 0.98, letters["top"], transform=ax.transAxes, ha="center", va="top", **style)
    ax.text(0.5, 0.02, letters["bottom"], transform=ax.transAxes, ha="center", va="bottom", **style)


def _colour_bar(fig, cax, cmap, low: float, high: float, units: str):
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar = fig.colorbar(ScalarMappable(norm=Normalize(low, high), cmap=cmap), cax=cax)
    bar.set_label(units, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    bar.set_ticks([low, 0.5 * (low + high), high])
    bar.ax.yaxis.set_major_formatter(_formatter())
    return bar


def _formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: f"{value:.3g}")


def _save(fig, path: Path) -> str:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    fig.savefig(temporary, dpi=PANEL_DPI, format="png", facecolor="white")
    os.replace(temporary, path)
    return str(path)


def _views(scene, background, node, labelmap, center, opacity) -> List[Dict[str, Any]]:
    return [dict(render_view(scene, orientation, background, node, opacity, labelmap, center), name=name)
            for name, orientation in VIEWS]


def method_panel(path: Path, method: str, views: Sequence[Mapping[str, Any]], three_d: Optional[np.ndarray],
                 colour: Tuple[Any, float, float], units: str, subtitle: str = "") -> Dict[str, Any]:
    """One method: axial, coronal, sagittal (+ 3D) in a 2x2 grid, its name, a colour bar."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cmap, low, high = colour
    fig = plt.figure(figsize=(7.6, 7.0), dpi=PANEL_DPI)
    grid = fig.add_gridspec(2, 3, width_ratios=[1, 1, 0.06], left=0.03, right=0.86, top=0.88, bottom=0.03,
                            wspace=0.08, hspace=0.16)
    for index, view in enumerate(views):
        ax = fig.add_subplot(grid[index // 2, index % 2])
        _show(ax, view, view["name"].capitalize())
    ax = fig.add_subplot(grid[1, 1])
    if three_d is not None:
        _show(ax, {"rgb": three_d}, "3D (volume rendering, segmentation translucent)")
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "3D view not rendered\n(no offscreen OpenGL)", ha="center", va="center", fontsize=9)
    title = fig.suptitle(method, fontsize=16, fontweight="bold", y=0.975)
    if subtitle:
        fig.text(0.5, 0.925, subtitle, ha="center", fontsize=9)
    bar = _colour_bar(fig, fig.add_subplot(grid[:, 2]), cmap, low, high, units)
    fig.canvas.draw()
    layout = {"title": _bbox(fig, title), "colour_bar": _bbox(fig, bar.ax),
              "size": fig.canvas.get_width_height()}
    saved = _save(fig, path)
    plt.close(fig)
    return {"path": saved, "layout": layout}


def overview_sheet(path: Path, rows: Sequence[Mapping[str, Any]], center_note: str) -> Dict[str, Any]:
    """All methods, one row each (axial, coronal, sagittal through the same point), each with its
    own colour bar (the methods' units and ranges differ)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(rows)
    height = 2.9 * n + 0.8
    fig = plt.figure(figsize=(8.5, height), dpi=PANEL_DPI)
    grid = fig.add_gridspec(n, 4, width_ratios=[1, 1, 1, 0.05], left=0.02, right=0.88, top=1.0 - 0.8 / height,
                            bottom=0.02, wspace=0.06, hspace=0.2)
    layout: Dict[str, Any] = {"rows": []}
    for r, row in enumerate(rows):
        name = None
        for c, view in enumerate(row["views"]):
            ax = fig.add_subplot(grid[r, c])
            _show(ax, view, "", fontsize=8)
            ax.set_title(view["name"].capitalize(), loc="right", fontsize=8)
            if c == 0:  # the row's method, left above its first view
                name = ax.set_title(row["method"], loc="left", fontsize=12, fontweight="bold")
        cmap, low, high = row["colour"]
        bar = _colour_bar(fig, fig.add_subplot(grid[r, 3]), cmap, low, high, row["units"])
        layout["rows"].append({"method": row["method"], "name": name, "colour_bar": bar.ax})
    fig.suptitle("Every method on the same slices", fontsize=14, fontweight="bold", y=1.0 - 0.2 / height)
    fig.text(0.5, 1.0 - 0.5 / height, center_note, ha="center", fontsize=8, wrap=True)
    fig.canvas.draw()
    layout["rows"] = [{"method": r["method"], "name": _bbox(fig, r["name"]), "colour_bar": _bbox(fig, r["colour_bar"])}
                      for r in layout["rows"]]
    layout["size"] = fig.canvas.get_width_height()
    saved = _save(fig, path)
    plt.close(fig)
    return {"path": saved, "layout": layout}


def _bbox(fig, artist) -> Tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in the saved image's pixels, top-left origin, of `artist` (text or axes)."""
    box = artist.get_window_extent(fig.canvas.get_renderer())
    height = fig.canvas.get_width_height()[1]
    return (int(box.x0), int(height - box.y1), int(np.ceil(box.x1)), int(np.ceil(height - box.y0)))


def write_panels(scene, out_dir, background, maps: Mapping[str, Any], segmentation=None,
                 region: Optional[np.ndarray] = None, metadata: Optional[Mapping[str, Mapping]] = None,
                 score: str = "logit", opacity: float = 0.5, three_d: bool = True) -> Dict[str, Any]:
    """`<out_dir>/<Method>.png` for every map and `<out_dir>/overview.png`.

    maps: method -> map node (on `background`'s grid); segmentation: the segmentation node
    (outlined in the slices, a translucent surface in 3D); region: (I,J,K) bool, where the
    strongest attribution is looked for; metadata: method -> MethodSpec metadata (family: units).
    Returns {"paths", "notes", "layouts" (pixel boxes of titles and colour bars), "centers"}."""
    labelmap = outline_labelmap(scene, segmentation, background)
    try:
        return _write_panels(scene, Path(out_dir), background, maps, labelmap, segmentation, region, metadata,
                             score, opacity, three_d)
    finally:
        remove_outline(scene, labelmap)


def _write_panels(scene, out, background, maps, labelmap, segmentation, region, metadata, score, opacity,
                  three_d) -> Dict[str, Any]:
    notes: List[str] = []
    render_3d_ok = False
    if three_d:
        from .slicer_env import logic

        if logic(scene, "VolumeRendering") is None:
            notes.append("3D views skipped: no volume rendering logic in this Slicer build")
        else:
            render_3d_ok, why = egl_available()
            if not render_3d_ok:
                notes.append(f"3D views skipped: {why}")
    paths, layouts, centers, rows = [], {}, {}, []
    first_center = None
    for method, node in maps.items():
        meta = (metadata or {}).get(method, {})
        units = map_units(method, meta, score)
        colour = colour_bar_of(node)
        ijk, center = strongest_point(node, region)
        centers[method] = {"ijk": list(ijk), "ras": list(center)}
        if first_center is None:
            first_center = (method, ijk, center)
        views = _views(scene, background, node, labelmap, center, opacity)
        rendered_3d = None
        if render_3d_ok:
            from .scene import show_volume_rendering
            from .slicer_env import logic

            if logic(scene, "VolumeRendering").GetFirstVolumeRenderingDisplayNode(node) is None:
                show_volume_rendering(scene, node)
            rendered_3d = render_3d(scene, node, segmentation)
        family = f"{meta['family']} method; " if meta.get("family") else ""
        subtitle = (f"{family}slices through its strongest attribution inside the region, voxel "
                    f"({ijk[0]}, {ijk[1]}, {ijk[2]}); segmentation outlined")
        panel = method_panel(out / file_name(method), method, views, rendered_3d, colour, units, subtitle)
        paths.append(panel["path"])
        layouts[method] = panel["layout"]
        rows.append({"method": method, "units": units, "colour": colour})
    if first_center is not None:
        method, ijk, center = first_center
        for row in rows:
            row["views"] = _views(scene, background, maps[row["method"]], labelmap, center, opacity)
        sheet = overview_sheet(out / "overview.png", rows,
                               f"slices through the strongest attribution of {method} inside the region, voxel "
                               f"({ijk[0]}, {ijk[1]}, {ijk[2]}); segmentation outlined; each row has its own colour bar")
        paths.append(sheet["path"])
        layouts["overview"] = sheet["layout"]
    return {"paths": paths, "notes": notes, "layouts": layouts, "centers": centers}
