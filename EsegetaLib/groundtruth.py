"""Synthetic vessel volumes whose right explanation is known: a benchmark with a planted cue.

On real angiograms nobody knows which voxels a model used, so faithfulness metrics (infidelity,
deletion) can only say whether a map is consistent with the score. Here the generator decides the
label from a cue it controls and records, so the voxels that carry the evidence are known (the
idea of KWC, J. Med. Imaging 2023, and of SE3D's synthetic tasks, carried to vessels):

- **shortcut**: tubes are vessels (label 1) only where a small bright spherical *marker* lies within
  `reach_mm` of them; identical tubes away from any marker are background. A model that reproduces
  the labels must look at the marker. Ground-truth relevance: the marker balls and the labelled
  vessel voxels. The same volume without markers (`without_cue`) is rendered from the same draws, so
  "does the model fail when the marker is removed?" can be measured.
- **contrast**: every tube lies in its own shell of local background; a tube is a vessel only when it
  is brighter than its shell. Absolute intensities of tubes, shells and tissue overlap, so only the
  tube-versus-shell contrast decides. Ground-truth relevance: the labelled tubes and their shells.
  The same volume with every shell moved to the other side of its tube's level (`contrast_flipped`,
  tubes untouched, same noise) swaps which tubes are vessels (`flipped_labels`), so "does the model
  follow the contrast?" can be measured.

Everything is determined by the seed (NumPy's PCG64), sizes are in millimetres, and the rendering
(partial-volume tubes, texture, bias field, Rician noise) is the bundled sample's
(`EsegetaLib.sample`), so models and methods meet the same image statistics as in the demo.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .errors import EsegetaError
from .sample import _grow_tree, _render_tubes, _smooth_noise, oblique_affine

DESIGNS = ("shortcut", "contrast")
FILES = {"image": "image.nii.gz", "labels": "labels.nii.gz", "relevance": "relevance.nii.gz",
         "without_cue": "image_without_cue.nii.gz", "contrast_flipped": "image_contrast_flipped.nii.gz",
         "flipped_labels": "labels_contrast_flipped.nii.gz", "record": "case.json"}


@dataclass
class GroundTruthCase:
    """One benchmark volume. Arrays are (I, J, K) on `ijk_to_ras` (RAS mm)."""
    design: str
    seed: int
    image: np.ndarray  # float32 intensities, about 0..1000
    labels: np.ndarray  # uint8: 1 where the generator's rule says "vessel"
    relevance: np.ndarray  # uint8: 1 on the voxels that carry the evidence for the labels
    ijk_to_ras: np.ndarray
    without_cue: Optional[np.ndarray] = None  # shortcut only: the same volume with no marker
    record: Dict[str, Any] = field(default_factory=dict)  # what was planted where (voxel indices)
    contrast_flipped: Optional[np.ndarray] = None  # contrast only: every shell on the other side of its tube
    flipped_labels: Optional[np.ndarray] = None  # contrast only: the labels of `contrast_flipped`


MIN_SIZE = 16


def _check_shape(shape) -> Tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < MIN_SIZE:
        raise EsegetaError(f"benchmark volumes need three axes of at least {MIN_SIZE} voxels; got {shape}.")
    return shape


def _start(shape, spacing, seed: int, n_tubes: int, radius_mm: Tuple[float, float]):
    """Checked shape, spacing (array), the case's generator and its tubes (at least two)."""
    shape = _check_shape(shape)
    spacing = np.asarray(spacing, float)
    rng = np.random.default_rng(seed)
    tubes = _tubes(shape, spacing, rng, n_tubes, radius_mm)
    if len(tubes) < 2:
        raise EsegetaError(f"seed {seed}: fewer than two tubes fit in {shape}; use a larger shape.")
    return shape, spacing, rng, tubes


def _tubes(shape, spacing, rng, n_tubes: int, radius_mm: Tuple[float, float]):
    """Separate unbranched tubes: per tube its centre-line points (mm) and radius (mm)."""
    tubes = []
    for _ in range(n_tubes):
        radius = float(rng.uniform(*radius_mm))
        # min_radius above the root radius: no bifurcation, one smooth curved tube per root.
        points, radii, _ = _grow_tree(shape, spacing, rng, 1, radius, radius * 2.0)
        if len(points):
            tubes.append((points, radii))
    return tubes


def _occupancy(shape, spacing, points, radii, extra_mm: float = 0.0) -> np.ndarray:
    occ, _ = _render_tubes(shape, spacing, points, radii + extra_mm, np.ones(len(points)))
    return occ


def _texture(shape, rng, level: float, amount: float) -> np.ndarray:
    return level + amount * (0.6 * _smooth_noise(shape, 5.0, rng) + 0.4 * _smooth_noise(shape, 1.5, rng))


def _acquire(clean: np.ndarray, rng, noise: float, bias: float, scale: float) -> np.ndarray:
    """Coil bias field and Rician noise, as the bundled sample has them; returns float32 x scale."""
    shape = clean.shape
    field_ = 1.0 + bias * _smooth_noise(shape, max(shape) / 3.0, rng)
    clean = np.clip(clean * field_, 0, None)
    noisy = np.sqrt((clean + noise * rng.standard_normal(shape)) ** 2 + (noise * rng.standard_normal(shape)) ** 2)
    return (noisy * scale).astype(np.float32)


def _balls(shape, spacing, centres_vox, radius_mm) -> np.ndarray:
    """Partial-volume occupancy (0..1) of balls of `radius_mm` at voxel centres."""
    points = np.asarray(centres_vox, float) * np.asarray(spacing, float)
    return _render_tubes(shape, spacing, points, np.full(len(points), radius_mm), np.ones(len(points)))[0]


def shortcut_case(seed: int, shape: Sequence[int] = (48, 48, 48), spacing: Sequence[float] = (0.5, 0.5, 0.5),
                  n_tubes: int = 5, n_markers: int = 3, marker_radius_mm: float = 0.9, reach_mm: float = 4.0,
                  noise: float = 0.03, bias: float = 0.15, scale: float = 1000.0) -> GroundTruthCase:
    """The shortcut design: a tube is labelled only within `reach_mm` of a bright marker ball.

    Markers sit beside randomly chosen tubes (touching the tube wall, on a random side), at most one
    per tube, so every volume has labelled and unlabelled tubes of the same appearance."""
    shape, spacing, rng, tubes = _start(shape, spacing, seed, n_tubes, (0.7, 1.3))
    occupancy = np.zeros(shape, np.float32)
    for points, radii in tubes:
        occupancy = np.maximum(occupancy, _occupancy(shape, spacing, points, radii))
    vessel = occupancy >= 0.5
    # Markers: beside the middle third of chosen tubes, centre at wall + marker radius + 0.3 mm.
    # Marker sites: tube points well inside the volume (3 marker radii + the tube radius from every face).
    extent = (np.asarray(shape) - 1) * spacing
    inside = []
    for points, radii in tubes:
        margin = (3 * marker_radius_mm + radii)[:, None]
        inside.append(np.flatnonzero(np.all((points > margin) & (points < extent - margin), axis=1)))
    candidates = [t for t in range(len(tubes)) if len(inside[t])] or list(range(len(tubes)))
    chosen = rng.choice(candidates, size=min(n_markers, len(tubes) - 1, len(candidates)), replace=False)
    centres = []
    for t in sorted(chosen.tolist()):
        points, radii = tubes[t]
        i = int(rng.choice(inside[t])) if len(inside[t]) else len(points) // 2
        tangent = points[min(i + 1, len(points) - 1)] - points[max(i - 1, 0)]
        tangent /= np.linalg.norm(tangent) + 1e-9
        side = rng.normal(size=3)
        side -= side.dot(tangent) * tangent
        side /= np.linalg.norm(side) + 1e-9
        centre_mm = points[i] + side * (radii[i] + marker_radius_mm + 0.3)
        centres.append(np.clip(centre_mm / spacing, 1, np.asarray(shape) - 2))
    marker_occ = _balls(shape, spacing, centres, marker_radius_mm)
    marker = marker_occ >= 0.5
    grid = np.indices(shape, dtype=np.float32)
    near = np.zeros(shape, bool)
    for c in centres:
        d2 = sum(((grid[a] - c[a]) * spacing[a]) ** 2 for a in range(3))
        near |= d2 <= reach_mm ** 2
    labels = (vessel & near & ~marker).astype(np.uint8)
    relevance = (labels.astype(bool) | marker).astype(np.uint8)

    tissue = _texture(shape, rng, 0.28, 0.04)
    vessel_level = 0.8 * rng.uniform(0.9, 1.0)
    base = tissue * (1 - occupancy) + vessel_level * occupancy
    with_cue = base * (1 - marker_occ) + 1.6 * marker_occ  # markers: brighter than any vessel, round
    state = rng.bit_generator.state  # the same noise draws for both versions
    image = _acquire(with_cue, rng, noise, bias, scale)
    rng.bit_generator.state = state
    plain = _acquire(base, rng, noise, bias, scale)
    affine = oblique_affine(shape, spacing, rng, max_angle_deg=10.0)
    record = {"design": "shortcut", "seed": int(seed), "shape": list(shape), "spacing": spacing.tolist(),
              "markers_ijk": [np.round(c, 3).tolist() for c in centres], "marker_radius_mm": marker_radius_mm,
              "reach_mm": reach_mm, "tubes": len(tubes), "tubes_with_marker": sorted(int(t) for t in chosen),
              "vessel_voxels": int(vessel.sum()), "labelled_voxels": int(labels.sum()),
              "marker_voxels": int(marker.sum()), "relevance_voxels": int(relevance.sum())}
    return GroundTruthCase("shortcut", int(seed), image, labels, relevance, affine, plain, record)


def contrast_case(seed: int, shape: Sequence[int] = (48, 48, 48), spacing: Sequence[float] = (0.5, 0.5, 0.5),
                  n_tubes: int = 6, shell_mm: float = 1.5, noise: float = 0.03, bias: float = 0.1,
                  scale: float = 1000.0) -> GroundTruthCase:
    """The contrast design: each tube is labelled iff it is brighter than its own background shell.

    Tube and shell levels are drawn from overlapping ranges (0.35-0.85) with a contrast of 0.15-0.3
    of either sign, and the tissue between shells spans the same range, so no absolute threshold
    separates labelled from unlabelled tubes."""
    shape, spacing, rng, tubes = _start(shape, spacing, seed, n_tubes, (0.7, 1.2))
    clean = _texture(shape, rng, 0.6, 0.08)
    flipped = clean.copy()  # the counterfactual: each shell as far on the other side of its tube
    owner = np.full(shape, -1, np.int32)  # which tube (core or shell) a voxel shows; later tubes on top
    core = np.zeros(shape, bool)
    signs = []
    for t, (points, radii) in enumerate(tubes):
        tube_occ = _occupancy(shape, spacing, points, radii)
        shell_occ = _occupancy(shape, spacing, points, radii, extra_mm=shell_mm)
        tube_level = float(rng.uniform(0.45, 0.75))
        sign = 1.0 if rng.random() < 0.5 else -1.0
        contrast = float(rng.uniform(0.15, 0.3))
        shell_level = tube_level - sign * contrast
        signs.append(sign)
        # Soft edges: shell over tissue, then tube over shell (partial-volume fractions).
        clean = clean * (1 - shell_occ) + shell_level * shell_occ
        clean = clean * (1 - tube_occ) + tube_level * tube_occ
        flipped = flipped * (1 - shell_occ) + (tube_level + sign * contrast) * shell_occ
        flipped = flipped * (1 - tube_occ) + tube_level * tube_occ
        owner[shell_occ >= 0.5] = t
        core[shell_occ >= 0.5] = False
        core[tube_occ >= 0.5] = True
    bright = np.asarray(signs) > 0
    owned = owner >= 0
    labelled_owner = np.zeros(shape, bool)
    labelled_owner[owned] = bright[owner[owned]]
    labels = (core & labelled_owner).astype(np.uint8)
    relevance = labelled_owner.astype(np.uint8)  # the labelled tubes and their shells
    flipped_labels = (core & owned & ~labelled_owner).astype(np.uint8)
    state = rng.bit_generator.state  # the same noise draws for both versions
    image = _acquire(clean, rng, noise, bias, scale)
    rng.bit_generator.state = state
    image_flipped = _acquire(flipped, rng, noise, bias, scale)
    affine = oblique_affine(shape, spacing, rng, max_angle_deg=10.0)
    record = {"design": "contrast", "seed": int(seed), "shape": list(shape), "spacing": spacing.tolist(),
              "shell_mm": shell_mm, "tubes": len(tubes), "tube_brighter_than_shell": [bool(b) for b in bright],
              "labelled_voxels": int(labels.sum()), "relevance_voxels": int(relevance.sum()),
              "flipped_labelled_voxels": int(flipped_labels.sum())}
    return GroundTruthCase("contrast", int(seed), image, labels, relevance, affine, None, record,
                           contrast_flipped=image_flipped, flipped_labels=flipped_labels)


def make_case(design: str, seed: int, **kwargs) -> GroundTruthCase:
    if design == "shortcut":
        return shortcut_case(seed, **kwargs)
    if design == "contrast":
        return contrast_case(seed, **kwargs)
    raise EsegetaError(f"unknown benchmark design '{design}'; choose one of {', '.join(DESIGNS)}.")


def write_case(case: GroundTruthCase, folder) -> Dict[str, str]:
    """Write a case as NIfTI files (image, labels, relevance and, for shortcut, the image without its
    cue; for contrast, the contrast-flipped image and its labels) plus `case.json`, all on the case's grid. Returns {kind: path}. Bytes depend only on the case
    (gzip headers carry no time stamp)."""
    from .io import Image, write_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    reference = Image(array=case.image[None], ijk_to_ras=case.ijk_to_ras, format="nifti", path=None)
    written = {"image": write_image(folder / FILES["image"], case.image, reference),
               "labels": write_image(folder / FILES["labels"], case.labels, reference, dtype=np.uint8),
               "relevance": write_image(folder / FILES["relevance"], case.relevance, reference, dtype=np.uint8)}
    if case.without_cue is not None:
        written["without_cue"] = write_image(folder / FILES["without_cue"], case.without_cue, reference)
    if case.contrast_flipped is not None:
        written["contrast_flipped"] = write_image(folder / FILES["contrast_flipped"], case.contrast_flipped, reference)
        written["flipped_labels"] = write_image(folder / FILES["flipped_labels"], case.flipped_labels, reference,
                                                dtype=np.uint8)
    record_path = folder / FILES["record"]
    record_path.write_text(json.dumps(case.record, indent=1, sort_keys=True) + "\n")
    written["record"] = str(record_path)
    return written


def write_benchmark(out, design: str, seeds: Sequence[int], **kwargs) -> List[Dict[str, str]]:
    """One folder per seed, `out/<design>_<seed>/` (the same file names in every folder: a cohort
    layout that `esegeta study` globs as `out/*/image.nii.gz`)."""
    return [write_case(make_case(design, int(s), **kwargs), Path(out) / f"{design}_{int(s):04d}") for s in seeds]


def main(argv=None) -> int:
    """`python -m EsegetaLib.groundtruth OUT [--design D] [--seeds A-B]`: write benchmark volumes."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m EsegetaLib.groundtruth",
                                     description="Write ground-truth benchmark volumes (NIfTI + case.json).")
    parser.add_argument("out")
    parser.add_argument("--design", default="shortcut", choices=DESIGNS)
    parser.add_argument("--seeds", default="100-103", help="a range A-B (inclusive) or a list A,B,C")
    args = parser.parse_args(argv)
    try:
        if "-" in args.seeds:
            first, last = (int(v) for v in args.seeds.split("-", 1))
            seeds = list(range(first, last + 1))
        else:
            seeds = [int(v) for v in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be A-B or A,B,C; got {args.seeds!r}")
    for written in write_benchmark(args.out, args.design, seeds):
        print(Path(written["image"]).parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
