"""The bundled sample: a synthetic time-of-flight MR angiogram that the project generates itself.

Why synthetic: a fresh clone must run the demo without downloading anything, and the volume must
carry a known vessel mask (to train and score the default model) and an oblique, anisotropic,
off-origin geometry (so that any geometry mistake downstream shows).

What it imitates: a branching arterial tree of bright tubes (radius tapering from parent to child,
smoothly curving paths) over darker textured tissue, a few bright non-vessel blobs (fat, skin), a
smooth multiplicative coil bias field, Rician noise and partial-volume edges (each tube's profile is
the fraction of the voxel it covers, approximated by a linear ramp one voxel wide).
"""
from __future__ import annotations

from importlib import resources
from typing import Sequence, Tuple

import numpy as np
from scipy import ndimage

from .errors import EsegetaError

SAMPLE_FILE = "sample_tof.nii.gz"
SAMPLE_LABELS_FILE = "sample_tof_vessels.nii.gz"
SAMPLE_SHAPE = (96, 96, 64)
SAMPLE_SPACING = (0.4, 0.4, 0.5)
SAMPLE_SEED = 2026


def resource_path(name: str):
    """Path of a file bundled in `EsegetaLib/resources` (works from a checkout and a wheel)."""
    return resources.files("EsegetaLib").joinpath("resources", name)


def load_sample():
    """The bundled synthetic TOF-MRA volume as an `io.Image` (1 channel, oblique, 0.4x0.4x0.5 mm)."""
    from .io import read_image

    path = resource_path(SAMPLE_FILE)
    if not path.is_file():
        raise EsegetaError(f"the bundled sample {path} is missing: reinstall esegeta or run "
                           "scripts/make_sample.py")
    return read_image(str(path))


def load_sample_labels():
    """The bundled sample's true vessel mask (uint8 `io.Image`, same grid): an ROI for demos/tests."""
    from .io import read_image

    path = resource_path(SAMPLE_LABELS_FILE)
    if not path.is_file():
        raise EsegetaError(f"the bundled sample mask {path} is missing: run scripts/make_sample.py")
    return read_image(str(path))


def oblique_affine(shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator,
                   max_angle_deg: float = 25.0) -> np.ndarray:
    """An IJK->RAS affine: random rotation (up to `max_angle_deg` about a random axis), one flipped
    axis, the given spacing, and an origin that puts the volume off-centre (non-zero)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(0.4, 1.0) * max_angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)  # Rodrigues
    rot = rot @ np.diag([-1.0, 1.0, 1.0])  # a flipped I axis, as in radiological LPS-ish storage
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(np.asarray(spacing, dtype=float))
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    affine[:3, 3] = rng.uniform(-30, 30, size=3) - centre
    return affine


def _smooth_noise(shape, sigma_vox, rng) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered noise (texture and bias fields)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox,
                                    mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-8)


def _grow_tree(shape, spacing, rng, n_roots, root_radius_mm, min_radius_mm):
    """Centre-line points (mm, in voxel-aligned space) with radius and branch brightness.

    Each branch is a smooth random walk: the direction turns by a small random rotation each step
    (curvature varies per branch); the radius tapers slowly; branches split into two children whose
    radii follow Murray-like ratios. Steps are a third of the smallest voxel size so that the
    rendered tube has no beads.
    """
    extent = (np.asarray(shape) - 1) * np.asarray(spacing)
    step = min(spacing) * 0.35
    points, radii, bright = [], [], []
    stack = []
    for _ in range(n_roots):
        # Roots enter from a face of the box, heading inwards.
        start = rng.uniform(0.15, 0.85, 3) * extent
        face = rng.integers(3)
        start[face] = 0.0 if rng.random() < 0.5 else extent[face]
        direction = extent / 2 - start + rng.normal(0, extent.mean() * 0.25, 3)
        direction /= np.linalg.norm(direction)
        stack.append((start, direction, root_radius_mm * rng.uniform(0.8, 1.2), rng.uniform(0.85, 1.0), 0))
    while stack:
        pos, direction, radius, brightness, depth = stack.pop()
        curvature = rng.uniform(0.02, 0.12)  # radians per step: straight to tortuous vessels
        length_mm = rng.uniform(6, 14) * (1.0 if depth == 0 else 0.7) + radius * 8
        n_steps = int(length_mm / step)
        drift = rng.normal(size=3)
        for s in range(n_steps):
            points.append(pos.copy())
            radii.append(radius)
            bright.append(brightness)
            # Smoothly varying direction: persistent drift plus jitter, renormalised.
            drift = 0.9 * drift + 0.1 * rng.normal(size=3)
            direction = direction + curvature * drift / (np.linalg.norm(drift) + 1e-8)
            direction /= np.linalg.norm(direction)
            pos = pos + step * direction
            radius *= 1.0 - 0.0015
            if np.any(pos < -radius * 2) or np.any(pos > extent + radius * 2):
                break
        else:
            if radius * 0.75 >= min_radius_mm and depth < 6:
                # Bifurcation: two children at +-20..50 degrees, radii r1^3 + r2^3 ~ r^3.
                share = rng.uniform(0.3, 0.7)
                for frac in (share, 1 - share):
                    child_r = radius * frac ** (1 / 3)
                    if child_r < min_radius_mm:
                        continue
                    turn = rng.normal(size=3)
                    turn -= turn.dot(direction) * direction
                    turn /= np.linalg.norm(turn) + 1e-8
                    angle = np.deg2rad(rng.uniform(20, 50))
                    child_dir = np.cos(angle) * direction + np.sin(angle) * turn
                    # Distal vessels are darker on TOF (inflow saturation).
                    stack.append((pos.copy(), child_dir, child_r, brightness * rng.uniform(0.85, 1.0),
                                  depth + 1))
    return np.asarray(points), np.asarray(radii), np.asarray(bright)


def _render_tubes(shape, spacing, points, radii, brightness):
    """Partial-volume occupancy (0..1) and brightness of the union of balls along the centre lines.

    Occupancy of a voxel at distance d (mm) from a centre line of radius r is clip((r - d)/h + 0.5,
    0, 1) with h the voxel size along the line to the centre: a box-filtered edge, so thin vessels
    come out dim and wide, as in a real acquisition. Each point updates only its own bounding box.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    occupancy = np.zeros(shape, np.float32)
    bright_map = np.zeros(shape, np.float32)
    h = float(np.mean(spacing))
    for p, r, b in zip(points, radii, brightness):
        reach = r + h
        lo = np.maximum(np.floor((p - reach) / spacing).astype(int), 0)
        hi = np.minimum(np.ceil((p + reach) / spacing).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        axes = [np.arange(lo[a], hi[a]) * spacing[a] - p[a] for a in range(3)]
        d = np.sqrt(axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2)
        occ = np.clip((r - d) / h + 0.5, 0.0, 1.0).astype(np.float32)
        box = tuple(slice(lo[a], hi[a]) for a in range(3))
        better = occ > occupancy[box]
        occupancy[box] = np.where(better, occ, occupancy[box])
        bright_map[box] = np.where(better, b, bright_map[box])
    return occupancy, bright_map


def generate_tof_like(shape: Sequence[int] = SAMPLE_SHAPE, spacing: Sequence[float] = SAMPLE_SPACING,
                      seed: int = SAMPLE_SEED, n_roots: int = 3, root_radius_mm: float = 1.4,
                      min_radius_mm: float = 0.25, noise: float = 0.035, bias: float = 0.25,
                      blobs: int = 2, texture: float = 1.0, speckle: float = 0.0,
                      scale: float = 1000.0) -> Tuple["object", np.ndarray]:
    """A synthetic TOF-MRA volume and its vessel mask, fully determined by `seed`.

    Returns `(Image, labels)`: the image is 1 channel float32 (intensities roughly 0..`scale`) on an
    oblique affine with `spacing`; labels is uint8 (I,J,K), 1 where a tube covers at least half a
    voxel. Sizes are in millimetres, so anisotropic spacing gives round tubes in world space.
    `texture` scales the tissue texture (1: brain-like; 2-3: the heterogeneous background of body
    angiograms) and `speckle` adds fine bright spots (0: none; 0.1-0.2: fat-like).
    """
    from .io import Image

    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng(seed)
    points, radii, bright = _grow_tree(shape, spacing, rng, n_roots, root_radius_mm, min_radius_mm)
    occupancy, vessel_brightness = _render_tubes(shape, spacing, points, radii, bright)
    labels = (occupancy >= 0.5).astype(np.uint8)

    # Tissue: a mid-grey background with two scales of texture (grey/white matter-like patches).
    tissue = 0.28 + texture * (0.05 * _smooth_noise(shape, 6.0, rng) + 0.025 * _smooth_noise(shape, 1.5, rng))
    if speckle > 0:  # fine bright spots (fat, bowel) of body angiograms; off for the brain sample
        tissue += speckle * np.clip(_smooth_noise(shape, 0.8, rng), 0, None)
    # Bright non-vessel distractors (fat, skin folds): blurred ellipsoids, not tubular.
    grid = np.indices(shape, dtype=np.float32)
    for _ in range(blobs):
        centre = rng.uniform(0.1, 0.9, 3) * np.asarray(shape)
        radius = rng.uniform(3, 7, 3)
        dist = np.sqrt(sum(((grid[a] - centre[a]) / radius[a]) ** 2 for a in range(3)))
        tissue += rng.uniform(0.15, 0.3) * ndimage.gaussian_filter(
            (dist < 1).astype(np.float32), 1.0)
    contrast = vessel_brightness * rng.uniform(0.75, 1.0)
    clean = tissue * (1 - occupancy) + contrast * occupancy
    # Smooth multiplicative coil bias field.
    field = 1.0 + bias * _smooth_noise(shape, max(shape) / 3.0, rng)
    clean = np.clip(clean * field, 0, None)
    # Rician noise (magnitude of complex Gaussian noise), as in magnitude MR images.
    noisy = np.sqrt((clean + noise * rng.standard_normal(shape)) ** 2
                    + (noise * rng.standard_normal(shape)) ** 2)
    volume = (noisy * scale).astype(np.float32)[None]
    affine = oblique_affine(shape, spacing, rng)
    return Image(array=volume, ijk_to_ras=affine, format="nifti", path=None), labels
