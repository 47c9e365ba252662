"""NRRD read the way ITK's NrrdImageIO (and so Slicer's scalar-volume reader) reads it.

What ITK 5.4 does, checked against SimpleITK in Testing/io (`itkNrrdImageIO.cxx`, ReadImageInformation):
- `space` right-/left-anterior-superior and left-posterior-superior (and their short forms RAS, LAS,
  LPS) are converted to LPS; every other 3-D space (scanner-xyz, 3D-right-handed, 3D-left-handed)
  and `space dimension` without `space` are taken verbatim as LPS coordinates;
- the `-time` spaces are 4-D: ITK reads such a file as a 4-D image without converting it, so Esegeta
  refuses them;
- without `space origin` the origin is 0; with `spacings` instead of `space directions` the axes
  are L, P, S and the origin comes from `axis mins` (plus half a voxel for cell-centred axes);
- domain axes are those whose `kinds` is domain, space, time or absent; one other axis (vector,
  list, RGB-color, ...) holds channels, moved to the front.
The data come from pynrrd (raw, gzip, bzip2, ascii; attached or a detached `.nhdr`). Every header
form ITK rejects, and the few it reads in a way Slicer cannot show, are refused with the field named.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from ..errors import EsegetaError
from .geometry import LPS_TO_RAS, affine_from, check_grid, check_spacing

# Spaces and their map onto LPS (diagonal flips), as ITK converts them.
_TO_LPS = {"right-anterior-superior": (-1.0, -1.0, 1.0), "left-anterior-superior": (1.0, -1.0, 1.0),
           "left-posterior-superior": (1.0, 1.0, 1.0)}
_VERBATIM = ("scanner-xyz", "3d-right-handed", "3d-left-handed")  # ITK: numbers used as LPS as they are
_TIME = ("right-anterior-superior-time", "left-anterior-superior-time", "left-posterior-superior-time",
         "scanner-xyz-time", "3d-right-handed-time", "3d-left-handed-time")
_SHORT = {"ras": "right-anterior-superior", "las": "left-anterior-superior", "lps": "left-posterior-superior",
          "rast": "right-anterior-superior-time", "last": "left-anterior-superior-time",
          "lpst": "left-posterior-superior-time"}
_DOMAIN_KINDS = ("domain", "space", "time", "???", "none", "")


def _space(header) -> str:
    value = str(header.get("space", "")).strip().lower()
    value = _SHORT.get(value, value)
    if value in _TIME:
        raise EsegetaError(f"NRRD space '{header['space']}' is a 4-D (time) space; ITK reads it as a 4-D image "
                           "without converting it to patient coordinates: save the volume with a 3-D space "
                           "(left-posterior-superior)")
    if value and value not in _TO_LPS and value not in _VERBATIM:
        raise EsegetaError(f"NRRD space '{header['space']}' is not a space ITK knows")
    return value


def _domain_axes(header, ndim: int) -> List[int]:
    kinds = header.get("kinds")
    if kinds is None:
        return list(range(ndim))
    return [a for a, kind in enumerate(kinds) if str(kind).strip().lower() in _DOMAIN_KINDS]


def geometry(header, ndim: int) -> Tuple[np.ndarray, List[int]]:
    """IJK->RAS (mm) as ITK reads this header, and the file axes that are spatial (in order)."""
    space = _space(header)
    domain = _domain_axes(header, ndim)
    directions = header.get("space directions")
    space_dim = int(header.get("space dimension", 3 if space else 0) or 0)
    if directions is not None and "spacings" in header:
        raise EsegetaError("NRRD has both 'spacings' and 'space directions'; ITK refuses that: keep only "
                           "'space directions'")
    if len(domain) != 3:
        raise EsegetaError(f"NRRD has {len(domain)} spatial axes (kinds {header.get('kinds')}, dimension {ndim}); "
                           "Esegeta explains 3-D volumes, with at most one channel axis")
    if directions is not None:
        rows = np.asarray(directions, dtype=np.float64)
        if space_dim not in (0, 3) or rows.shape[-1] != 3:
            raise EsegetaError(f"NRRD 'space dimension' is {space_dim}; expected 3")
        columns = rows[domain].T  # world step of one voxel along I, J, K
        if not np.all(np.isfinite(columns)):
            raise EsegetaError("NRRD 'space directions' has 'none' or NaN for a spatial axis; fix the header")
        spacing = np.linalg.norm(columns, axis=0)
        check_spacing(spacing, "NRRD 'space directions'")
        flips = np.asarray(_TO_LPS.get(space, (1.0, 1.0, 1.0)))
        origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
        if origin.shape != (3,) or not np.all(np.isfinite(origin)):
            raise EsegetaError("NRRD 'space origin' must be three finite numbers; fix the header")
        lps = affine_from(flips[:, None] * columns / spacing, spacing, flips * origin)
        field = "NRRD 'space directions'"
    else:
        spacings = np.asarray(header.get("spacings", [1.0] * ndim), dtype=np.float64)[domain]
        check_spacing(spacings, "NRRD 'spacings'")
        origin = np.zeros(3)
        mins = header.get("axis mins")
        if mins is not None:
            mins = np.asarray(mins, dtype=np.float64)[domain]
            centers = header.get("centers") or header.get("centerings") or ["cell"] * ndim
            if isinstance(centers, str):  # pynrrd leaves this field unparsed
                centers = centers.split()
            half = np.array([0.0 if str(centers[a]).lower() == "node" else 0.5 for a in domain])
            if np.all(np.isfinite(mins)):
                origin = mins + half * spacings
        lps = affine_from(np.eye(3), spacings, origin)
        field = "NRRD 'spacings'"
    return check_grid(LPS_TO_RAS @ lps, field), domain


def read(path) -> Tuple[np.ndarray, np.ndarray, Dict]:
    """`(data (C,I,J,K), IJK->RAS as ITK reads it, header)`."""
    import nrrd

    data, header = nrrd.read(path)  # index order F: axes as the file lists them (fastest first)
    if data.ndim < 3:
        raise EsegetaError(f"{path} is a {data.ndim}-D image (NRRD dimension {data.ndim}); Esegeta explains 3-D "
                           "volumes: give the whole 3-D scan (not one slice), e.g. exported from Slicer as NIfTI")
    affine, domain = geometry(header, data.ndim)
    channel_axes = [a for a in range(data.ndim) if a not in domain]
    if len(channel_axes) > 1:
        raise EsegetaError(f"{path} has more than one non-spatial axis (kinds {header.get('kinds')}); expected a "
                           "3-D volume or 3-D + channels")
    data = np.transpose(data, channel_axes + domain) if channel_axes else data[None]
    return data, affine, header


def output_space(header) -> str:
    """The `space` an output of an NRRD input is written in: the input's own anatomical space (RAS,
    LAS or LPS, long names), so outputs read like their input in any NRRD reader; inputs whose space
    ITK takes verbatim as LPS numbers (scanner-xyz, 3D-right-handed, ...) or that have none, and
    non-NRRD inputs (header None), are written in LPS (Slicer's own convention)."""
    if not header:
        return "left-posterior-superior"
    space = _space(header)
    return space if space in _TO_LPS else "left-posterior-superior"


def write(path, array: np.ndarray, affine: np.ndarray, compress: bool = True,
          space: str = "left-posterior-superior") -> None:
    """Write `array` (C,I,J,K) with IJK->RAS `affine` in `space` (right-anterior-superior,
    left-anterior-superior or left-posterior-superior; default LPS, Slicer's own convention), gzip
    (raw with `compress=False`), channels first."""
    import nrrd

    if space not in _TO_LPS:
        raise EsegetaError(f"cannot write NRRD in space '{space}'; use one of {', '.join(_TO_LPS)}")
    lps = np.linalg.inv(LPS_TO_RAS) @ affine
    flips = np.asarray(_TO_LPS[space])  # space coordinates = flips * LPS coordinates (flips are +-1)
    columns, origin = flips[:, None] * lps[:3, :3], flips * lps[:3, 3]
    header = {"space": space, "space origin": origin, "encoding": "gzip" if compress else "raw"}
    if array.shape[0] == 1:
        data = array[0]
        header["space directions"] = columns.T  # one row per axis
        header["kinds"] = ["domain"] * 3
    else:
        data = array  # channel first = fastest axis, as Slicer stores vector volumes
        header["space directions"] = np.vstack([np.full(3, np.nan), columns.T])
        header["kinds"] = ["vector"] + ["domain"] * 3
    nrrd.write(path, data, header, detached_header=path.lower().endswith(".nhdr"), index_order="F")
