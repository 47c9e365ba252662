"""The review bundle `esegeta explain` writes: `esegeta.mrb` (the scene bridge) plus `previews/*.png`.

It sits above `scene` (the MRML bridge) and `panels` (labelled pictures from `previews`, the
off-screen renderer), so none of those needs to import the others.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from . import panels
from . import scene as scene_bridge

__all__ = ["write_review", "write_result_scene"]


def write_review(out_dir, image, explanation, metrics_rows: Sequence[Mapping[str, Any]] = (),
                 run_parameters: Optional[Mapping[str, Any]] = None, *, previews: bool = True,
                 three_d: bool = True, **options) -> Dict[str, Any]:
    """What `esegeta explain` calls: `out_dir/esegeta.mrb` and `out_dir/previews/*.png`.

    image: `EsegetaLib.io.Image` or `(array (C,I,J,K), ijk_to_ras)`; explanation:
    `EsegetaLib.results.Explanation`; metrics_rows: one dict per method (`method`, metric values,
    `runtime_s`, `device`); options: those of `build_review_scene` (volume_name, class_name,
    segment_names, show_method, opacity, include_segmentation). Previews: one panel per method
    (`previews/<Method>.png`: axial, coronal, sagittal through its strongest attribution inside the
    region, and 3D) and `previews/overview.png` (every method on the same slices), see
    `panels.write_panels`; `three_d=False` skips the OpenGL rendering.
    Returns {"mrb": path, "previews": [paths], "notes": [...]} (notes say what was skipped)."""
    out = Path(out_dir)
    built = scene_bridge.build_review_scene(image, explanation, metrics_rows, run_parameters, **options)
    scene = built["scene"]
    try:
        result: Dict[str, Any] = {"mrb": scene_bridge.export_review(scene, out / "esegeta.mrb"), "previews": [],
                                  "notes": []}
        if previews and built["maps"]:
            target = getattr(explanation, "target", {}) or {}
            rendered = panels.write_panels(
                scene, out / "previews", built["input"], built["maps"], built["segmentation"],
                region=getattr(explanation, "region", None),
                metadata={name: r.metadata for name, r in explanation.results.items()},
                score=target.get("score", "logit"), opacity=options.get("opacity", 0.5), three_d=three_d)
            result["previews"], result["notes"] = rendered["paths"], rendered["notes"]
        return result
    finally:
        scene_bridge.release_scene(scene)


# The name the CLI runner looks for (`EsegetaLib.runner`); same function.
write_result_scene = write_review
