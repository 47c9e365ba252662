"""Files for the method-specific outputs of a result (`MethodResult.outputs`), beside the maps:

    DIR/features/<Method>_<layer>_<channel>.nii.gz   a feature visualisation (model-level): the optimised
                                                     volume on the model's window grid, input's spacing
                                                     and orientation, centred on the input's centre
    DIR/features/<Method>_<layer>_<channel>.png      its maximum-intensity projections (three planes)
    DIR/rois/<Method>_<layer>_<channel>.json         top activating windows: boxes in IJK and RAS (mm)
    DIR/rois/<Method>_<layer>_<channel>_<rank>.mrk.json   one Slicer markups ROI per box (LPS, as Slicer
                                                     writes markups)

With several targets the stem starts with the target's folder ("<target>/<Method>_..."), as the maps'.
One markups file per box: Slicer's markups JSON storage node reads the first markup of a file
(vtkMRMLMarkupsJsonStorageNode::ReadDataInternal), so several boxes in one file would load as one.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

# The schema id Slicer itself writes into markups files (vtkMRMLMarkupsJsonStorageNode.cxx: kept at
# "master" for Slicer < 5.1; files are accepted by the pattern markups-schema-v1.x.y.json).
MARKUPS_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
                  "Schema/markups-schema-v1.0.3.json#")
PANEL_PIXELS = 192.0  # the longer side of each projection panel in the PNG


def _stem(key: str, layer: str, channel: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", str(layer)) or "layer"
    return f"{key}_{safe}_{int(channel)}"


def feature_affine(ijk_to_ras: np.ndarray, input_shape: Sequence[int], window: Sequence[int]) -> np.ndarray:
    """4x4: the input's spacing and orientation, the window's centre voxel at the input's centre."""
    affine = np.array(ijk_to_ras, dtype=np.float64).copy()
    centre_in = affine[:3, :3] @ ((np.asarray(input_shape[:3], float) - 1) / 2) + affine[:3, 3]
    affine[:3, 3] = centre_in - affine[:3, :3] @ ((np.asarray(window[:3], float) - 1) / 2)
    return affine


def write_feature_volume(path: Path, volume: np.ndarray, affine: np.ndarray) -> None:
    """NIfTI (one channel: I,J,K; several: I,J,K,C), sform and qform = affine (scanner), the header's
    description saying that it is a model-level visualisation."""
    import nibabel as nib

    data = volume[0] if volume.shape[0] == 1 else np.moveaxis(volume, 0, -1)
    image = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header["descrip"] = b"Esegeta model-level feature visualisation"
    nib.save(image, str(path))


def mip_png(path: Path, volume: np.ndarray, spacing: Sequence[float], title: str) -> None:
    """Maximum-intensity projections along K, J and I (one row per input channel), each panel
    resampled to square millimetres, grey levels over the volume's range, a title line."""
    from PIL import Image as PILImage, ImageDraw

    spacing = np.asarray(spacing, dtype=float)
    rows = []
    for channel in volume:
        low, high = float(channel.min()), float(channel.max())
        span = high - low if high > low else 1.0
        panels = []
        for axis in (2, 1, 0):
            mip = channel.max(axis=axis)  # the two remaining axes, in order
            kept = [a for a in range(3) if a != axis]
            grey = np.clip((mip - low) / span * 255.0, 0, 255).astype(np.uint8)
            # rows = the second kept axis flipped (superior/anterior up), columns = the first kept axis
            picture = PILImage.fromarray(np.ascontiguousarray(grey.T[::-1]))
            # nearest-neighbour enlargement: one voxel stays one block (no invented detail)
            mm = spacing[kept] * np.asarray(mip.shape)
            pixel = float(max(mm)) / PANEL_PIXELS  # square millimetres, the longer side PANEL_PIXELS
            size = (max(1, int(round(mm[0] / pixel))), max(1, int(round(mm[1] / pixel))))
            panels.append(picture.resize(size, PILImage.NEAREST))
        rows.append(panels)
    gap, head = 4, 16
    width = max(max(sum(p.width for p in row) + gap * (len(row) - 1) for row in rows), 6 * len(title) + 4)
    height = head + sum(max(p.height for p in row) for row in rows) + gap * (len(rows) - 1)
    sheet = PILImage.new("L", (width, height), 0)
    y = head
    for row in rows:
        x = 0
        for panel in row:
            sheet.paste(panel, (x, y))
            x += panel.width + gap
        y += max(p.height for p in row) + gap
    ImageDraw.Draw(sheet).text((2, 2), title, fill=255)
    sheet.save(str(path))


def roi_records(rois: Sequence[Dict[str, Any]], ijk_to_ras: np.ndarray) -> List[Dict[str, Any]]:
    """The boxes with RAS millimetres added: centre through the affine, size along each IJK axis in
    mm, and the axes' directions (columns of the affine, normalised)."""
    affine = np.asarray(ijk_to_ras, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    axes = affine[:3, :3] / spacing
    out = []
    for roi in rois:
        record = dict(roi)
        centre = np.asarray(roi["centre_ijk"], dtype=np.float64)
        record["centre_ras"] = (affine[:3, :3] @ centre + affine[:3, 3]).tolist()
        record["peak_ras"] = (affine[:3, :3] @ np.asarray(roi["peak_ijk"], float) + affine[:3, 3]).tolist()
        record["size_mm"] = (np.asarray(roi["size_voxels"], float) * spacing).tolist()
        record["axes_ras"] = axes.T.tolist()  # one row per IJK axis: its direction in RAS
        out.append(record)
    return out


def markups_roi(record: Dict[str, Any], name: str, description: str) -> Dict[str, Any]:
    """One Slicer markups ROI (markups schema v1.0.3, "ROI", roiType "Box") with one control point at
    the box's centre; size in mm; orientation 3x3 row-major, its columns the box axes (the volume's
    IJK axes).  Written in LPS, as Slicer writes markups: Slicer's ROI reader converts the ROI's
    orientation with the storage node's coordinate system before it reads the file's
    "coordinateSystem" (vtkMRMLMarkupsROIJsonStorageNode.cxx), so a RAS file loads mirrored there."""
    flip = np.array([-1.0, -1.0, 1.0])
    centre = (np.asarray(record["centre_ras"], dtype=np.float64) * flip).tolist()
    axes = np.asarray(record["axes_ras"], dtype=np.float64).T * flip[:, None]  # columns = axes, in LPS
    orientation = axes.reshape(-1).tolist()  # row-major: [o0, o3, o6] is the first axis
    return {
        "type": "ROI", "name": name, "coordinateSystem": "LPS", "coordinateUnits": "mm",
        "locked": True, "fixedNumberOfControlPoints": False, "labelFormat": "%N-%d",
        "roiType": "Box", "center": centre, "orientation": orientation,
        "size": list(record["size_mm"]), "insideOut": False,
        "controlPoints": [{"id": "1", "label": name, "description": description, "associatedNodeID": "",
                           "position": centre, "orientation": orientation,
                           "selected": True, "locked": True, "visibility": True, "positionStatus": "defined"}],
        "measurements": [],
    }


def write_rois(folder: Path, stem: str, rois: Sequence[Dict[str, Any]], image, extra: Dict[str, Any]) -> Dict[str, str]:
    """rois/<stem>.json (every box, IJK and RAS) and rois/<stem>_<rank>.mrk.json (one per box)."""
    records = roi_records(rois, image.ijk_to_ras)
    base = folder / "rois" / stem
    base.parent.mkdir(parents=True, exist_ok=True)
    written = {}
    listing = {"kind": "top activating windows (activation-based, not an attribution of the target)",
               "coordinate_system": "RAS", "units": "mm",
               "ijk_note": "IJK are voxel indices of the input volume (0-based, box stop exclusive)",
               "input_ijk_to_ras": np.asarray(image.ijk_to_ras, float).tolist(), **extra, "rois": records}
    path = base.with_name(base.name + ".json")
    path.write_text(json.dumps(listing, indent=2))
    written["rois"] = path.relative_to(folder).as_posix()
    for record in records:
        name = f"{Path(stem).name}_{record['rank']}"
        description = (f"rank {record['rank']}: activation {record['activation']:.4g} of channel "
                       f"{extra.get('channel')} of layer '{extra.get('layer')}'")
        markup = {"@schema": MARKUPS_SCHEMA, "markups": [markups_roi(record, name, description)]}
        mrk = base.with_name(f"{base.name}_{record['rank']}.mrk.json")
        mrk.write_text(json.dumps(markup, indent=2))
        written[f"roi_{record['rank']}"] = mrk.relative_to(folder).as_posix()
    return written


def write_method_outputs(folder: Path, image, explanation) -> Dict[str, Dict[str, str]]:
    """Every result's outputs as files under `folder`; {result key: {what: relative path}}."""
    written: Dict[str, Dict[str, str]] = {}
    for key, result in explanation.results.items():
        outputs = getattr(result, "outputs", None) or {}
        files: Dict[str, str] = {}
        if "feature_volume" in outputs:
            volume = np.asarray(outputs["feature_volume"], dtype=np.float32)
            stem = _stem(key, outputs.get("layer", ""), outputs.get("channel", 0))
            base = folder / "features" / stem
            base.parent.mkdir(parents=True, exist_ok=True)
            nii = base.with_name(base.name + ".nii.gz")
            write_feature_volume(nii, volume, feature_affine(image.ijk_to_ras, image.array.shape[1:], volume.shape[1:]))
            png = base.with_name(base.name + ".png")
            mip_png(png, volume, image.spacing,
                    f"{result.name} '{outputs.get('layer')}' ch {outputs.get('channel')}: model-level, not this input")
            files.update(feature_volume=nii.relative_to(folder).as_posix(), feature_mip=png.relative_to(folder).as_posix())
        if "rois" in outputs:
            stem = _stem(key, outputs.get("layer", ""), outputs.get("channel", 0))
            files.update(write_rois(folder, stem, outputs["rois"], image,
                                    {"method": result.name, "layer": outputs.get("layer"),
                                     "channel": outputs.get("channel"), "rf_fraction": outputs.get("rf_fraction")}))
        if files:
            written[key] = files
    return written
