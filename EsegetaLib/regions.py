"""Target regions built from the model's segmentation: connected components, geodesic limits along
them and boundary bands (the questions "why this vessel?", "why here?", "why is the wall there?").

All functions work on boolean masks on the input grid (I, J, K) and take the voxel spacing in mm,
so that distances are physical on anisotropic volumes. Connectivity is 26 (full): thin vessels
often touch only along an edge or a corner, and a face-only (6) labelling would split one branch
into pieces. Libraries: SciPy (`ndimage.label`, `distance_transform_edt`) and scikit-image
(`graph.MCP_Geometric` for the geodesic distance).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .errors import EsegetaError

FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def _spacing(spacing: Optional[Sequence[float]]) -> Tuple[float, float, float]:
    return tuple(float(s) for s in (spacing if spacing is not None else (1.0, 1.0, 1.0)))  # type: ignore[return-value]


def label_components(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    """26-connected components of a boolean mask: (labels int32 (I,J,K), count); 0 = background."""
    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=FULL_CONNECTIVITY)
    return labels.astype(np.int32, copy=False), int(count)


def components_by_size(mask: np.ndarray, min_voxels: int = 1) -> List[np.ndarray]:
    """Every component with at least `min_voxels` voxels, largest first (ties by first voxel), as
    boolean masks. Index n in the list is the component called `component_{n+1}`."""
    labels, count = label_components(mask)
    if count == 0:
        return []
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    order = sorted((n for n in range(count) if sizes[n] >= min_voxels), key=lambda n: (-sizes[n], n))
    return [labels == n + 1 for n in order]


def nearest_voxel(mask: np.ndarray, point: Sequence[int], spacing=None) -> Tuple[Tuple[int, int, int], float]:
    """The voxel of `mask` nearest to `point` (Euclidean, in mm) and its distance in mm."""
    spacing = _spacing(spacing)
    idx = np.argwhere(mask)
    if idx.size == 0:
        raise EsegetaError("The segmentation is empty; there is no component to explain.")
    d2 = (((idx - np.asarray(point)[None]) * np.asarray(spacing)[None]) ** 2).sum(axis=1)
    best = int(np.argmin(d2))
    return tuple(int(v) for v in idx[best]), float(np.sqrt(d2[best]))  # type: ignore[return-value]


def check_point(point: Sequence[float], shape: Sequence[int]) -> Tuple[int, int, int]:
    if point is None or len(point) != 3:
        raise EsegetaError("This region needs a voxel index: pass Target(point=(i, j, k)) or --region component:I,J,K.")
    p = tuple(int(round(float(v))) for v in point)
    if any(not 0 <= v < s for v, s in zip(p, shape)):
        raise EsegetaError(f"Point {p} is outside the volume of shape {tuple(shape)}; pick a voxel inside it.")
    return p  # type: ignore[return-value]


def component_at(mask: np.ndarray, point: Sequence[float], spacing=None, what: str = "the segmentation") -> np.ndarray:
    """The connected component of `mask` that contains `point`.

    Raises a one-line EsegetaError naming the nearest segmented voxel (and its distance in mm) when
    the point is not in the mask."""
    p = check_point(point, mask.shape)
    if not mask[p]:
        if not mask.any():
            raise EsegetaError(f"Voxel {p} is not in {what}, which is empty on this volume; choose another class.")
        near, dist = nearest_voxel(mask, p, spacing)
        raise EsegetaError(
            f"Voxel {p} is not in {what}; the nearest segmented voxel is {near} ({dist:.2f} mm away): "
            f"click inside the vessel, e.g. component:{','.join(map(str, near))}."
        )
    labels, _ = label_components(mask)
    return labels == labels[p]


def geodesic_distance(region: np.ndarray, point: Sequence[int], spacing=None) -> np.ndarray:
    """Distance in mm from `point` to every voxel of `region` travelling inside it (26-neighbour
    steps weighted by their length; scikit-image `MCP_Geometric`); inf outside and unreachable."""
    try:
        from skimage.graph import MCP_Geometric
    except ImportError:
        raise EsegetaError("A geodesic limit needs scikit-image; install it (pip install 'esegeta[full]') "
                           "or drop the :MM limit.") from None
    spacing = _spacing(spacing)
    # Work on the region's bounding box: the path never leaves it.
    idx = np.argwhere(region)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    costs = np.where(region[box], 1.0, np.inf)
    start = tuple(int(p - a) for p, a in zip(point, lo))
    cumulative, _ = MCP_Geometric(costs, fully_connected=True, sampling=spacing).find_costs([start])
    out = np.full(region.shape, np.inf)
    out[box] = cumulative
    out[~region] = np.inf
    return out


def geodesic_limit(component: np.ndarray, point: Sequence[int], limit_mm: float, spacing=None) -> np.ndarray:
    """The part of `component` within `limit_mm` of `point` along the component."""
    if not limit_mm > 0:
        raise EsegetaError(f"The geodesic limit must be a positive number of mm; got {limit_mm}.")
    return geodesic_distance(component, point, spacing) <= float(limit_mm)


def boundary_band(region: np.ndarray, band_mm: float, spacing=None, outside_allowed: Optional[np.ndarray] = None,
                  within: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The band on each side of `region`'s boundary: (inside, outside) boolean masks.

    inside:  voxels of `region` whose Euclidean distance (mm, with spacing) to the nearest voxel
             outside it is <= band_mm (the boundary layer has distance = one voxel step);
    outside: voxels not in `region` (and in `outside_allowed`, e.g. not in another vessel) within
             band_mm of it.
    `within` (optional) restricts the inside band to a part of the region (a geodesic limit) and the
    outside band to the voxels whose nearest region voxel lies in that part.
    Raises EsegetaError when either side is empty (band thinner than a voxel)."""
    spacing = _spacing(spacing)
    if not band_mm > 0:
        raise EsegetaError(f"The boundary band must be a positive number of mm; got {band_mm}.")
    region = np.asarray(region, dtype=bool)
    # headers store spacings as float32 (0.4 -> 0.40000001): a band of one spacing must still count
    limit = float(band_mm) * (1 + 1e-5)
    depth = ndimage.distance_transform_edt(region, sampling=spacing)
    inside = region & (depth <= limit)
    reach, nearest = ndimage.distance_transform_edt(~region, sampling=spacing, return_indices=True)
    outside = ~region & (reach <= limit)
    if within is not None:
        inside &= within
        outside &= within[tuple(nearest)]
    if outside_allowed is not None:
        outside &= outside_allowed
    if not inside.any() or not outside.any():
        raise EsegetaError(
            f"The boundary band of {band_mm:g} mm is empty on one side (voxel spacing "
            f"{' x '.join(f'{s:.4g}' for s in spacing)} mm); use a band of at least {max(spacing):.4g} mm."
        )
    return inside, outside
