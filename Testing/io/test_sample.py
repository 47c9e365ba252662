"""The synthetic TOF-MRA generator and the bundled sample volume."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from EsegetaLib.io import read_image
from EsegetaLib.sample import (SAMPLE_SHAPE, SAMPLE_SPACING, generate_tof_like, load_sample,
                               load_sample_labels, resource_path)


@pytest.fixture(scope="module")
def generated():
    return generate_tof_like()


def test_same_seed_same_volume_other_seed_other_volume():
    a, la = generate_tof_like((40, 40, 32), (0.4, 0.4, 0.5), seed=7)
    b, lb = generate_tof_like((40, 40, 32), (0.4, 0.4, 0.5), seed=7)
    c, lc = generate_tof_like((40, 40, 32), (0.4, 0.4, 0.5), seed=8)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(a.ijk_to_ras, b.ijk_to_ras)
    assert not np.array_equal(la, lc)


def test_geometry_is_oblique_anisotropic_and_off_origin(generated):
    image, labels = generated
    assert image.array.shape == (1, *SAMPLE_SHAPE) and labels.shape == SAMPLE_SHAPE
    np.testing.assert_allclose(image.spacing, SAMPLE_SPACING, atol=1e-9)
    direction = image.ijk_to_ras[:3, :3] / np.asarray(SAMPLE_SPACING)
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-9)  # orthonormal
    off_diagonal = np.abs(direction - np.diag(np.diag(direction))).max()
    assert off_diagonal > 0.1  # oblique, not axis-aligned
    assert np.linalg.det(direction) < 0  # one flipped axis
    assert np.linalg.norm(image.ijk_to_ras[:3, 3]) > 5  # origin not at zero


def test_looks_like_an_angiogram(generated):
    image, labels = generated
    v = image.array[0]
    vessel = labels.astype(bool)
    assert 0.003 < vessel.mean() < 0.05  # sparse, as vessels are
    far = ~ndimage.binary_dilation(vessel, iterations=3)
    assert np.median(v[vessel]) > 2.0 * np.median(v[far])  # bright tubes on darker tissue
    assert v.min() >= 0  # magnitude (Rician) image
    # A branching tree: a few large connected pieces, not confetti.
    components, count = ndimage.label(vessel)
    sizes = np.sort(np.bincount(components.ravel())[1:])[::-1]
    assert sizes[:3].sum() > 0.8 * vessel.sum()
    # Varying radius: the distance-to-wall of centre-line voxels spans thin and thick vessels.
    depth = ndimage.distance_transform_edt(vessel, sampling=SAMPLE_SPACING)
    radii = depth[vessel & (depth >= ndimage.maximum_filter(depth, size=3))]
    assert radii.max() > 1.0 and np.percentile(radii, 10) <= 0.5  # mm: thick and thin vessels
    # Partial-volume edges: voxels just outside the mask are brighter than tissue further out.
    rim = ndimage.binary_dilation(vessel) & ~vessel
    assert np.median(v[rim]) > 1.2 * np.median(v[far])


def test_bundled_sample_is_the_generated_volume(generated):
    image, labels = generated
    sample = load_sample()
    assert sample.format == "nifti" and sample.array.dtype == np.float32
    assert np.abs(sample.array - image.array).max() <= 0.5 + 1e-3  # stored as rounded uint16
    np.testing.assert_allclose(sample.ijk_to_ras, image.ijk_to_ras, atol=2e-5)  # NIfTI float32
    mask = load_sample_labels()
    np.testing.assert_array_equal(mask.array[0], labels)
    np.testing.assert_array_equal(mask.ijk_to_ras, sample.ijk_to_ras)
    assert resource_path("sample_tof.nii.gz").stat().st_size < 3_000_000


def test_generator_respects_spacing_in_world_units():
    """Tubes are round in millimetres: at twice the slice thickness they span half as many slices."""
    _, fine = generate_tof_like((48, 48, 48), (0.4, 0.4, 0.4), seed=11, blobs=0)
    _, coarse = generate_tof_like((48, 48, 24), (0.4, 0.4, 0.8), seed=11, blobs=0)
    volume_fine = fine.sum() * 0.4 ** 3
    volume_coarse = coarse.sum() * 0.4 * 0.4 * 0.8
    assert abs(volume_fine - volume_coarse) < 0.2 * volume_fine
    assert read_image  # the reader is exercised in test_bundled_sample_is_the_generated_volume
