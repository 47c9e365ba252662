"""Ground-truth metrics (VxAP, pointing game, topology-aware deletion, relevance shares) and the
deletion domain, against values computed by hand on tiny arrays."""
import numpy as np
import pytest
import torch

from EsegetaLib.metrics.context import MetricContext
from EsegetaLib.metrics.deletion import deletion_insertion, feature_ranks
from EsegetaLib.metrics.groundtruth import (cl_dice, pointing_game, relevance_shares, topology_deletion,
                                            voxel_average_precision)


def context(x, region=None, spacing=(1.0, 1.0, 1.0), score_fn=None, baseline=None, batch_size=4):
    x = torch.as_tensor(np.asarray(x, np.float64))[None]
    b = torch.zeros_like(x) if baseline is None else torch.as_tensor(np.asarray(baseline, np.float64))[None]
    return MetricContext(inputs=x, score_fn=score_fn or (lambda batch: batch.sum(dim=tuple(range(1, batch.dim())))),
                         baseline=b, spread=1.0, batch_size=batch_size,
                         region=None if region is None else torch.as_tensor(region), spacing=spacing)


def test_vxap_equals_the_hand_computed_average_precision():
    # 8 voxels (2x2x2); scores ranked 0.9 (in), 0.8 (out), 0.7 (in), 0.6 (out), then three outs and one in.
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]).reshape(2, 2, 2)
    mask = np.array([1, 0, 1, 0, 0, 0, 0, 1], bool).reshape(2, 2, 2)
    ctx = context(np.ones((2, 2, 2)))
    # AP = sum over the positives of precision at their rank / #positives = (1/1 + 2/3 + 3/8) / 3
    expected = (1.0 + 2 / 3 + 3 / 8) / 3
    assert voxel_average_precision(scores, ctx, mask=mask)["vxap"] == pytest.approx(expected, abs=1e-12)
    # |attribution| ranking: a strongly negative voxel in the mask comes first.
    signed = scores.copy()
    signed.flat[7] = -5.0
    assert voxel_average_precision(signed, ctx, mask=mask, relevance="absolute")["vxap"] == pytest.approx(
        (1.0 + 2 / 2 + 3 / 4) / 3, abs=1e-12)


def test_pointing_game_hit_miss_and_tolerance():
    a = np.zeros((5, 5, 5))
    a[0, 0, 0] = 1.0
    mask = np.zeros((5, 5, 5), bool)
    mask[2, 0, 0] = True  # 2 voxels (2 mm at 1 mm spacing, 1 mm at 0.5 mm) from the peak
    ctx = context(np.ones((5, 5, 5)))
    assert pointing_game(a, ctx, mask=mask)["pointing_game"] == 0.0
    assert pointing_game(a, ctx, mask=mask, tolerance_mm=2.0)["pointing_game"] == 1.0
    assert pointing_game(a, ctx, mask=mask, tolerance_mm=1.9)["pointing_game"] == 0.0
    assert pointing_game(a, ctx, mask=mask, tolerance_mm=1.0, spacing=(0.5, 1, 1))["pointing_game"] == 1.0
    assert np.isnan(pointing_game(np.zeros((5, 5, 5)), ctx, mask=mask)["pointing_game"])


def test_cl_dice_by_hand():
    line = np.zeros((1, 9, 1), bool)
    line[0, 1:8, 0] = True  # a 7-voxel line: its own skeleton
    assert cl_dice(line, line) == 1.0
    half = line.copy()
    half[0, 5:8, 0] = False  # keep voxels 1..4
    # Tprec = |S(P) & G| / |S(P)| = 1; Tsens = |S(G) & P| / |S(G)| = 4/7 -> 2 * 4/7 / (1 + 4/7) = 8/11
    assert cl_dice(line, half) == pytest.approx(8 / 11)
    assert cl_dice(line, np.zeros_like(line)) == 0.0


def test_topology_deletion_curve_by_hand():
    """A bright line of 7 voxels, a 'model' that segments x > 0.5 (a real threshold, not a stub) and a
    map whose top voxel is the middle of the line: deleting it splits the line into two components."""
    x = np.zeros((1, 9, 1))
    x[0, 1:8, 0] = 1.0
    region = x[..., None][..., 0] > 0.5
    a = np.zeros_like(x)
    a[0, 4, 0] = 3.0  # the middle first, then the line from one end
    a[0, 1:4, 0] = [2.0, 1.9, 1.8]
    ctx = context(x, region=region, batch_size=2)

    def segment(batch):
        return (batch[:, 0] > 0.5).cpu().numpy()

    # Domain 'volume' over 9 voxels, 3 steps of 3 voxels: k = 0, 3, 6, 9.
    out = topology_deletion(a, ctx, segment, n_steps=3, domain="volume")
    curve = out["curve"]
    assert curve["fraction"] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    # k=3 deletes voxels 4, 1, 2 -> line {3} and {5,6,7}: 2 components; k=6 deletes 3 as well, then
    # the first two zero-attribution voxels in index order (0 and 5) -> {6,7}; k=9 deletes everything.
    assert curve["components"] == [1, 2, 1, 0]
    reference = region
    kept3 = reference.copy()
    kept3[0, [1, 2, 4], 0] = False
    kept6 = reference.copy()
    kept6[0, [1, 2, 3, 4, 5], 0] = False
    expected = [1.0, cl_dice(reference, kept3), cl_dice(reference, kept6), 0.0]
    assert expected[2] == pytest.approx(2 * (2 / 7) / (1 + 2 / 7))  # Tprec 1, Tsens 2/7
    assert curve["cldice"] == pytest.approx(expected)
    assert out["topology_auc"] == pytest.approx(np.trapezoid(expected, [0, 1 / 3, 2 / 3, 1]))
    # The default domain is the region grown by 2 mm: the 7 line voxels plus one on each side.
    assert topology_deletion(a, ctx, segment, n_steps=3)["curve"]["domain_voxels"] == 9


def test_relevance_shares_by_hand():
    seg = np.zeros((1, 7, 1), bool)
    seg[0, 2:5, 0] = True
    a = np.array([1.0, 1.0, 2.0, 4.0, 2.0, -1.0, 5.0]).reshape(1, 7, 1)
    mask = np.zeros_like(seg)
    mask[0, 6, 0] = True
    out = relevance_shares(a, context(np.ones((1, 7, 1))), segmentation=seg, mask=torch.as_tensor(mask), band_mm=1.0)
    total = 16.0
    assert out["share_segmentation"] == pytest.approx(8 / total)
    # band: voxel centres within 1 mm of the boundary surface: 1, 2, 4, 5 (2 and 4 inside, 1 and 5 outside)
    assert out["share_boundary"] == pytest.approx((1 + 2 + 2 + 1) / total)
    assert out["share_reference"] == pytest.approx(5 / total)
    assert out["share_elsewhere"] == pytest.approx(1 / total)  # voxel 0 only


def test_deletion_steps_run_over_the_foreground_only():
    """A sparse volume (background removed): 'foreground' steps over its 4 non-zero voxels, so the
    first step already removes real evidence; 'volume' steps spend most steps on zeros."""
    x = np.zeros((4, 4, 4))
    x[1, 1, 1:3] = [5.0, 4.0]
    x[2, 2, 1:3] = [3.0, 2.0]
    a = x.copy()  # a perfect map for the sum score
    ctx = context(x)
    fg = deletion_insertion(a, ctx, mode="deletion", n_steps=4)
    assert fg["curve"]["domain"] == "foreground" and fg["curve"]["domain_voxels"] == 4
    # Steps of one voxel: score 14 -> 9 -> 5 -> 2 -> 0, normalised by 14.
    assert fg["curve"]["score"] == pytest.approx([14, 9, 5, 2, 0])
    whole = deletion_insertion(a, ctx, mode="deletion", n_steps=4, domain="volume")
    assert whole["curve"]["domain_voxels"] == 64
    assert whole["curve"]["score"] == pytest.approx([14, 0, 0, 0, 0])
    assert fg["deletion_auc"] > whole["deletion_auc"]  # the sparse volume no longer makes every map look perfect
    ins = deletion_insertion(a, ctx, mode="insertion", n_steps=4)
    assert ins["curve"]["score"] == pytest.approx([0, 5, 9, 12, 14])


def test_domain_ranks_put_outside_voxels_last():
    values = torch.tensor([[[3.0, -1.0], [2.0, 9.0]]])
    domain = torch.tensor([[[True, True], [True, False]]])
    ranks = feature_ranks(values, 1, domain)
    assert ranks.flatten().tolist() == [0, 2, 1, 3]


def test_an_undefined_metric_says_why():
    """NaN never comes alone: a map without positive relevance, a zero map or an empty mask gives a
    `<metric>_note` with the reason (what the study's summary.csv shows)."""
    from EsegetaLib.metrics.localisation import relevance_mass, relevance_rank

    ctx = context(np.ones((3, 3, 3)))
    mask = np.zeros((3, 3, 3), bool)
    mask[1, 1, 1] = True
    negative = -np.arange(27, dtype=float).reshape(3, 3, 3)  # max 0 at one voxel, the rest below
    out = relevance_mass(negative, ctx, mask=mask)
    assert np.isnan(out["relevance_mass"]) and "no positive relevance (maximum 0)" in out["relevance_mass_note"]
    assert relevance_mass(negative, ctx, mask=mask, relevance="absolute")["relevance_mass"] == pytest.approx(
        13 / negative.__abs__().sum())
    assert relevance_mass(np.zeros((3, 3, 3)), ctx, mask=mask)["relevance_mass_note"] == "the map is zero at every voxel"
    assert relevance_rank(negative, ctx, mask=np.zeros((3, 3, 3), bool))["relevance_rank_note"] == "the reference mask is empty"
    assert "flat" in pointing_game(np.zeros((3, 3, 3)), ctx, mask=mask)["pointing_game_note"]
    shares = relevance_shares(np.zeros((3, 3, 3)), ctx, segmentation=mask, mask=mask)
    assert np.isnan(shares["share_reference"]) and shares["relevance_shares_note"] == "the map is zero at every voxel"
