"""Colour tables with desktop Slicer's node IDs, built where the application's own are missing.

Desktop Slicer loads Inferno, Viridis, ColdToHotRainbow, DivergingBlueRed, ... from colour files
shipped with the application; the slicer-core wheel has none of them. A colour table node added with
the singleton tag "File<Name>.txt" gets the ID "vtkMRMLColorTableNodeFile<Name>.txt", so nodes
built here from matplotlib's colormaps carry exactly the IDs desktop Slicer uses. They are created
only when absent, so inside Slicer the application's own tables are used, and scenes that refer to
them by ID open the same way in both.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

# Slicer colour file name -> (matplotlib colormap it is built from, category shown in Slicer's
# Colors module). Inferno/Viridis are the same published maps. DivergingBlueRed is a ColorBrewer
# style blue-white-red map (RdBu reversed). ColdToHotRainbow runs blue-cyan-green-yellow-red (jet).
TABLES: Dict[str, Tuple[str, str]] = {
    "Inferno": ("inferno", "Continuous"),
    "Viridis": ("viridis", "Continuous"),
    "DivergingBlueRed": ("RdBu_r", "Continuous"),
    "ColdToHotRainbow": ("jet", "Continuous"),
}

UNSIGNED_TABLE = "Inferno"
N_COLORS = 256

# Signed maps: DivergingBlueRed with a transparent centre band. Its near-white centre at the usual
# 0.5 overlay opacity would lighten the whole slice by half wherever the map is near 0; with the
# band the image shows through there (as unsigned maps hide values below their threshold). The
# band covers |value| < BAND_FRACTION of the window's half-width, the unsigned maps' threshold.
BAND_TABLE = "EsegetaDivergingBlueRed"
BAND_SOURCE = "DivergingBlueRed"
BAND_FRACTION = 0.1
SIGNED_TABLE = BAND_TABLE


def color_node_id(name: str) -> str:
    """The node ID desktop Slicer gives the file-based table `name` (e.g. "Inferno"); Esegeta's
    own band table has the ID "vtkMRMLColorTableNode" + its name."""
    return f"vtkMRMLColorTableNode{_singleton_tag(name)}"


def _singleton_tag(name: str) -> str:
    return name if name == BAND_TABLE else f"File{name}.txt"


def band_alpha(n: int = N_COLORS, fraction: float = BAND_FRACTION) -> np.ndarray:
    """Opacity of each of `n` entries spread over a symmetric window [-h, h]: 0 where the entry's
    centre value lies within `fraction` * h of 0, else 1."""
    centres = (np.arange(n) + 0.5) / n * 2.0 - 1.0  # in units of h
    return np.where(np.abs(centres) < fraction, 0.0, 1.0)


def _build_band_table(scene):
    """The band table from the scene's DivergingBlueRed (desktop Slicer's own file table, or the
    one built here), so the colours are exactly Slicer's; saved with the scene (.mrb)."""
    import slicer

    source = scene.GetNodeByID(color_node_id(BAND_SOURCE)).GetLookupTable()
    count = source.GetNumberOfTableValues()
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(BAND_TABLE)
    node.SetSingletonTag(_singleton_tag(BAND_TABLE))
    node.SetTypeToUser()
    node.SetAttribute("Category", "Esegeta")
    node.SetDescription(f"Slicer's {BAND_SOURCE} with the entries within {BAND_FRACTION:g} of the centre "
                        "transparent (signed attribution maps)")
    node.SetNumberOfColors(count)
    node.GetLookupTable().SetTableRange(0, count - 1)
    for i, alpha in enumerate(band_alpha(count)):
        r, g, b, _ = source.GetTableValue(i)
        node.SetColor(i, f"{BAND_TABLE}{i:03d}", r, g, b, float(alpha))
    node.SetSaveWithScene(True)
    scene.AddNode(node)
    return node


def colormap_rgba(name: str, n: int = N_COLORS) -> np.ndarray:
    """(n, 4) float RGBA samples of the matplotlib colormap behind table `name`."""
    from matplotlib import colormaps

    cmap = colormaps[TABLES[BAND_SOURCE if name == BAND_TABLE else name][0]]
    rgba = np.asarray(cmap(np.linspace(0.0, 1.0, n)), dtype=np.float64)
    if name == BAND_TABLE:
        rgba[:, 3] = band_alpha(n)
    return rgba


def _build_table(scene, name: str):
    # `slicer` directly, not through `slicer_env` (which builds scenes with these tables: importing it
    # here would be a circle); a scene exists, so `slicer` (desktop or slicer-core) is importable.
    import slicer

    node = slicer.vtkMRMLColorTableNode()
    node.SetName(name)
    node.SetSingletonTag(_singleton_tag(name))
    node.SetTypeToUser()
    node.SetAttribute("Category", TABLES[name][1])
    node.SetDescription(f"{name} built by Esegeta from matplotlib's '{TABLES[name][0]}' colormap")
    rgba = colormap_rgba(name)
    node.SetNumberOfColors(len(rgba))
    node.GetLookupTable().SetTableRange(0, len(rgba) - 1)
    for i, (r, g, b, a) in enumerate(rgba):
        node.SetColor(i, f"{name}{i:03d}", float(r), float(g), float(b), float(a))
    # Saved with the scene (in a .mrb) so a viewer without these tables still shows the maps; on
    # loading, a scene that already has the singleton keeps a single node with this ID.
    node.SetSaveWithScene(True)
    scene.AddNode(node)
    return node


def ensure_color_tables(scene) -> Dict[str, str]:
    """Make sure every table in `TABLES` exists in `scene` under desktop Slicer's ID; returns
    name -> node ID. Existing nodes (desktop Slicer's own) are left untouched."""
    ids = {}
    for name in list(TABLES) + [BAND_TABLE]:
        node_id = color_node_id(name)
        if scene.GetNodeByID(node_id) is None:
            node = _build_band_table(scene) if name == BAND_TABLE else _build_table(scene, name)
            if node.GetID() != node_id:  # pragma: no cover - would mean MRML changed its ID rule
                raise RuntimeError(f"colour table {name} got ID {node.GetID()}, expected {node_id}")
        ids[name] = node_id
    return ids
