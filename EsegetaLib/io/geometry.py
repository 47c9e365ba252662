"""Checks every reader applies to a voxel grid before Esegeta uses it.

An IJK->RAS affine is accepted when it is what ITK (and so Slicer) would build for the file and it
describes a grid Slicer can show: finite numbers, positive voxel sizes and perpendicular axes (ITK
keeps a sheared direction matrix, Slicer volumes cannot hold one). Each message names the header
field that is wrong, so the user knows what to fix.
"""
from __future__ import annotations

import numpy as np

from ..errors import EsegetaError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# ITK checks orthonormality of a direction matrix to 1e-4 (itkNiftiImageIO.cxx, `is_identity(1.0e-4)`).
ORTHOGONALITY_TOLERANCE = 1e-4


def affine_from(direction: np.ndarray, spacing, origin) -> np.ndarray:
    """4x4 affine from a 3x3 direction (unit columns), per-axis spacing and an origin."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)
    affine[:3, 3] = np.asarray(origin, dtype=np.float64)
    return affine


def check_spacing(spacing, field: str) -> None:
    """Voxel sizes must be finite and positive; `field` names where the file stores them."""
    spacing = np.asarray(spacing, dtype=np.float64)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        shown = ", ".join(f"{v:g}" for v in spacing)
        raise EsegetaError(f"{field} gives voxel sizes ({shown}); every voxel size must be a positive number: "
                           "fix the header")


def check_orthogonal(matrix: np.ndarray, field: str) -> None:
    """The 3x3 part's columns must be perpendicular (to ITK's tolerance), after removing their lengths."""
    m = np.asarray(matrix, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    if np.any(norms <= 0):
        raise EsegetaError(f"{field} has a zero-length axis; fix the header")
    unit = m / norms
    if np.max(np.abs(unit.T @ unit - np.eye(3))) > ORTHOGONALITY_TOLERANCE:
        raise EsegetaError(f"{field} is not orthogonal (the voxel axes are sheared); a Slicer volume cannot hold "
                           "such a grid, so maps would not overlay it: resample the image onto a rotated grid first")


def check_grid(affine: np.ndarray, field: str) -> np.ndarray:
    """Finite, positive voxel sizes, perpendicular axes; returns the affine as float64."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise EsegetaError(f"{field} contains NaN or infinite numbers; fix the header")
    check_spacing(np.linalg.norm(affine[:3, :3], axis=0), field)
    check_orthogonal(affine, field)
    return affine
