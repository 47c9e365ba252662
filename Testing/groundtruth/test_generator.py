"""The ground-truth benchmark generator: deterministic to the byte, and its masks are where the cue is."""
import hashlib

import numpy as np
import pytest
from scipy import ndimage

from EsegetaLib import groundtruth as G
from EsegetaLib.errors import EsegetaError


def digest(paths):
    return {k: hashlib.sha256(open(p, "rb").read()).hexdigest() for k, p in paths.items()}


@pytest.mark.parametrize("design", G.DESIGNS)
def test_same_seed_same_bytes_other_seed_other_volume(tmp_path, design):
    first = digest(G.write_case(G.make_case(design, 7, shape=(32, 32, 32)), tmp_path / "a"))
    again = digest(G.write_case(G.make_case(design, 7, shape=(32, 32, 32)), tmp_path / "b"))
    other = digest(G.write_case(G.make_case(design, 8, shape=(32, 32, 32)), tmp_path / "c"))
    assert first == again
    assert first["image"] != other["image"]
    from EsegetaLib.io import read_image

    image = read_image(tmp_path / "a" / G.FILES["image"])
    labels = read_image(tmp_path / "a" / G.FILES["labels"])
    np.testing.assert_allclose(image.ijk_to_ras, labels.ijk_to_ras)
    case = G.make_case(design, 7, shape=(32, 32, 32))
    np.testing.assert_array_equal(labels.array[0].astype(np.uint8), case.labels)
    np.testing.assert_allclose(image.array[0], case.image, rtol=1e-6)


def test_shortcut_labels_only_near_markers_and_markers_are_in_the_ground_truth():
    for seed in range(4):
        case = G.shortcut_case(seed)
        spacing = np.asarray(case.record["spacing"])
        centres = np.asarray(case.record["markers_ijk"])
        assert len(centres) >= 1 and case.labels.any()
        # Every marker centre is relevant and bright in the image, and gone from the cue-free volume.
        for c in np.round(centres).astype(int):
            assert case.relevance[tuple(c)] == 1 and case.labels[tuple(c)] == 0
            assert case.image[tuple(c)] > np.percentile(case.image, 99.5)
            assert case.without_cue[tuple(c)] < case.image[tuple(c)] * 0.75
        # Every labelled voxel lies within reach of a marker centre (mm).
        idx = np.argwhere(case.labels)
        d = np.sqrt((((idx[:, None, :] - centres[None]) * spacing) ** 2).sum(-1)).min(axis=1)
        assert d.max() <= case.record["reach_mm"] + 1e-6
        # Identical tubes without a marker exist: bright tube voxels far from every marker, unlabelled.
        assert case.record["vessel_voxels"] > case.record["labelled_voxels"] * 1.5
        # The two versions differ only around the markers (same noise draws).
        differ = np.abs(case.image - case.without_cue) > 1e-3
        near = ndimage.binary_dilation(case.relevance.astype(bool) & ~case.labels.astype(bool), iterations=2)
        assert differ.any() and not (differ & ~near).any()
        assert set(np.unique(case.relevance)) <= {0, 1} and not (case.labels & ~case.relevance).any()


def test_contrast_labels_are_tubes_brighter_than_their_shell():
    for seed in range(3):
        case = G.contrast_case(seed)
        labels, relevance = case.labels.astype(bool), case.relevance.astype(bool)
        assert labels.any() and not (labels & ~relevance).any()
        shell = relevance & ~ndimage.binary_dilation(labels, iterations=1)
        # Per labelled tube (connected component of the ground truth), the tube beats its own shell.
        components, n = ndimage.label(relevance)
        checked = 0
        for k in range(1, n + 1):
            tube, ring = labels & (components == k), shell & (components == k)
            if tube.sum() > 20 and ring.sum() > 20:
                assert np.median(case.image[tube]) > np.median(case.image[ring])
                # The counterfactual: the shell moved to the other side, the tube not relabelled.
                assert np.median(case.contrast_flipped[tube]) < np.median(case.contrast_flipped[ring])
                checked += 1
        assert checked >= 1
        assert any(case.record["tube_brighter_than_shell"]) or not labels.any()
        # Flipping swaps which tube cores are vessel; away from every tube and shell nothing changes
        # (the same noise draws).
        flipped = case.flipped_labels.astype(bool)
        assert flipped.any() and not (flipped & labels).any() and not (flipped & relevance).any()
        away = ~ndimage.binary_dilation(relevance | flipped, iterations=8)  # shells: 3 voxels + edges
        np.testing.assert_array_equal(case.contrast_flipped[away], case.image[away])


def test_unknown_design_and_tiny_volume_are_refused():
    with pytest.raises(EsegetaError, match="unknown benchmark design"):
        G.make_case("texture", 0)
    with pytest.raises(EsegetaError, match="at least 16 voxels"):
        G.shortcut_case(0, shape=(8, 32, 32))
