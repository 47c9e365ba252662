"""Each metric against an independent reference on small inputs: Captum's own `infidelity` and
`sensitivity_max` on identical perturbations, Quantus 0.6 for pixel flipping, sparseness,
complexity, relevance mass/rank accuracy and MPRT, SciPy/scikit-image for Spearman and SSIM.

Tolerances: the network and the inputs are float64 and both sides compute the same formula, so
the remaining differences are summation order (~1e-12 relative). Where Quantus works in float32 or
adds an epsilon (1e-7 in Sparseness, 1e-12 in Complexity), the tolerance is set a little above that
effect and is stated beside the assertion.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from captum.metrics import infidelity as captum_infidelity
from captum.metrics import sensitivity_max as captum_sensitivity_max

import metric_helpers as helpers
from metric_fixtures import small_case  # noqa: F401  (fixtures)
from EsegetaLib.engine import volume_stats
from EsegetaLib.metrics.complexity import complexity, sparseness
from EsegetaLib.metrics.context import MetricContext, intensity_spread, resolve_baseline
from EsegetaLib.metrics.deletion import deletion_insertion
from EsegetaLib.metrics.infidelity import block_removal_batch, infidelity, noise_batch
from EsegetaLib.metrics.localisation import relevance_mass, relevance_rank
from EsegetaLib.metrics.randomisation import (average_ranks, compare_maps, parameter_randomisation,
                                              randomisable_layers, spearman, ssim)
from EsegetaLib.metrics.sensitivity import sensitivity, uniform_perturbation


def make_ctx(case, baseline=None, batch_size=3, seed=0, region=None):
    x = case["x"]
    stats = volume_stats(x.numpy(), (1.0, 1.0, 1.0))
    return MetricContext(inputs=x, score_fn=helpers.score_fn_of(case["score"]),
                         baseline=resolve_baseline(x, stats, baseline), spread=intensity_spread(stats),
                         region=None if region is None else torch.as_tensor(region), batch_size=batch_size,
                         seed=seed)


def saliency_map(case):
    return helpers.captum_explain_fn(case["score"], "Saliency")(case["x"])


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("perturbation", ["noise", "blocks"])
def test_infidelity_matches_captum(small_case, normalize, perturbation):
    ctx = make_ctx(small_case)
    attr = saliency_map(small_case)
    n = 12
    ours = infidelity(attr, ctx, n_samples=n, normalize=normalize, perturbation=perturbation, noise=0.05)
    sigma = 0.05 * ctx.spread
    pert = (noise_batch(ctx, 0, n, sigma) if perturbation == "noise" else block_removal_batch(ctx, 0, n, 4, 0.25))

    def perturb_fn(inputs):
        assert inputs.shape[0] == n  # Captum hands all n copies at once (no max_examples_per_batch)
        return pert, inputs - pert

    ref = captum_infidelity(small_case["score"], perturb_fn, small_case["x"][None], attr[None],
                            n_perturb_samples=n, normalize=normalize)
    assert ours["infidelity"] == pytest.approx(float(ref), rel=1e-9)
    if not normalize:
        # Standard error: Captum on each perturbation alone gives the per-sample squared errors.
        per_sample = []
        for i in range(n):
            ref_i = captum_infidelity(small_case["score"], lambda inp, i=i: (pert[i:i + 1], inp - pert[i:i + 1]),
                                      small_case["x"][None], attr[None], n_perturb_samples=1)
            per_sample.append(float(ref_i))
        assert ours["infidelity_se"] == pytest.approx(np.std(per_sample, ddof=1) / np.sqrt(n), rel=1e-9)
    assert ours["infidelity_se"] > 0


def test_infidelity_batching_does_not_change_draws(small_case):
    attr = saliency_map(small_case)
    one = infidelity(attr, make_ctx(small_case, batch_size=1), n_samples=10)
    many = infidelity(attr, make_ctx(small_case, batch_size=7), n_samples=10)
    assert one == pytest.approx(many, rel=1e-12)


def test_sensitivity_matches_captum(small_case):
    ctx = make_ctx(small_case)
    explain = helpers.captum_explain_fn(small_case["score"], "Saliency")
    attr = explain(small_case["x"])
    n, radius = 6, 0.05
    ours = sensitivity(attr, ctx, explain, n_samples=n, radius=radius)
    r = radius * ctx.spread
    perturbed = torch.stack([small_case["x"] + uniform_perturbation(ctx, i, r) for i in range(n)])
    # The draws are U(-r, r) as Captum's default perturbation: inside the L-inf ball, not degenerate.
    assert float((perturbed - small_case["x"]).abs().max()) <= r and float((perturbed - small_case["x"]).std()) > r / 3

    def batch_explain(inputs):
        if isinstance(inputs, tuple):  # Captum passes the unperturbed input as a tuple
            inputs = inputs[0]
        return (torch.stack([explain(v) for v in inputs]),)  # Captum iterates over a tuple of maps

    ref_max = captum_sensitivity_max(batch_explain, small_case["x"][None],
                                     perturb_func=lambda inputs, radius: perturbed, perturb_radius=r,
                                     n_perturb_samples=n)
    assert ours["sensitivity_max"] == pytest.approx(float(ref_max), rel=1e-9)
    singles = [float(captum_sensitivity_max(batch_explain, small_case["x"][None],
                                            perturb_func=lambda inputs, radius, i=i: perturbed[i:i + 1],
                                            n_perturb_samples=1)) for i in range(n)]
    assert ours["sensitivity_avg"] == pytest.approx(np.mean(singles), rel=1e-9)
    assert ours["sensitivity_avg_se"] == pytest.approx(np.std(singles, ddof=1) / np.sqrt(n), rel=1e-9)


class ScoreAsLogits(torch.nn.Module):
    """Quantus wants (N, classes): our score is one 'class'."""

    def __init__(self, score):
        super().__init__()
        self.score = score

    def forward(self, x):
        return self.score(x.double())[:, None]  # Quantus hands float32 tensors


def test_deletion_matches_quantus_pixel_flipping(small_case):
    import quantus

    ctx = make_ctx(small_case, baseline=0.25)
    rng = np.random.default_rng(0)
    attr = torch.from_numpy(rng.normal(size=small_case["x"].shape))
    ours = deletion_insertion(attr, ctx, mode="deletion", n_steps=16, domain="volume")  # Quantus' steps
    metric = quantus.PixelFlipping(features_in_step=16 ** 3 // 16, perturb_baseline=0.25, normalise=False,
                                   abs=False, disable_warnings=True)
    ref = metric(model=ScoreAsLogits(small_case["score"]).eval(), x_batch=small_case["x"][None].numpy(),
                 y_batch=np.array([0]), a_batch=attr[None].numpy(), channel_first=True, softmax=False,
                 device="cpu")
    # Quantus records the score after each step (no point at 0 % removed). It rounds the volume to
    # float32 before the (float64) network: ~1e-7 relative per voxel, 1e-5 leaves room for the sum.
    np.testing.assert_allclose(ours["curve"]["score"][1:], ref[0], rtol=1e-5)
    with torch.no_grad():
        f_x = float(small_case["score"](small_case["x"][None]))
    assert ours["curve"]["score"][0] == pytest.approx(f_x, rel=1e-12)


def test_insertion_points_are_the_scores_of_the_built_volumes(small_case):
    ctx = make_ctx(small_case)  # the engine's blurred baseline
    attr = saliency_map(small_case)
    ours = deletion_insertion(attr, ctx, mode="insertion", n_steps=8, block=2)
    flat_rank = torch.argsort(torch.nn.functional.avg_pool3d(attr[None], 2)[0, 0].flatten(), descending=True)
    for step in (0, 3, 8):
        k = round(step * 512 / 8)
        chosen = torch.zeros(512, dtype=torch.bool)
        chosen[flat_rank[:k]] = True
        keep = chosen.reshape(8, 8, 8).repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)
        built = torch.where(keep[None], small_case["x"], ctx.baseline)
        with torch.no_grad():
            expected = float(small_case["score"](built[None]))
        assert ours["curve"]["score"][step] == pytest.approx(expected, rel=1e-9)
    f_x, f_b = ours["curve"]["score"][-1], ours["curve"]["score"][0]
    norm = (np.array(ours["curve"]["score"]) - f_b) / (f_x - f_b)
    assert ours["insertion_auc"] == pytest.approx(np.trapezoid(norm, ours["curve"]["fraction"]), rel=1e-12)


def test_localisation_matches_quantus(small_case):
    import quantus

    ctx = make_ctx(small_case, region=small_case["mask"])
    rng = np.random.default_rng(1)
    attr = rng.normal(size=small_case["x"].shape) + 2.0 * small_case["mask"][None]
    s = small_case["mask"][None, None].astype(np.float64)
    # Relevance mass uses positive relevance (Arras et al.): Quantus' formula on max(a, 0).
    ref_mass = quantus.RelevanceMassAccuracy(abs=False, normalise=False, disable_warnings=True)(
        model=None, x_batch=small_case["x"][None].numpy(), y_batch=np.array([0]),
        a_batch=np.clip(attr, 0, None)[None], s_batch=s, channel_first=True)
    ref_rank = quantus.RelevanceRankAccuracy(abs=False, normalise=False, disable_warnings=True)(
        model=None, x_batch=small_case["x"][None].numpy(), y_batch=np.array([0]), a_batch=attr[None],
        s_batch=s, channel_first=True)
    assert relevance_mass(attr, ctx)["relevance_mass"] == pytest.approx(ref_mass[0], rel=1e-12)
    assert relevance_rank(attr, ctx)["relevance_rank"] == pytest.approx(ref_rank[0], rel=1e-12)
    # A user mask overrides the region; an empty mask is reported as NaN, not as 0.
    other = np.zeros_like(small_case["mask"])
    other[:8] = True
    assert relevance_mass(attr, ctx, mask=other)["relevance_mass"] == pytest.approx(
        np.clip(attr, 0, None)[0, :8].sum() / np.clip(attr, 0, None).sum(), rel=1e-12)
    assert np.isnan(relevance_rank(attr, ctx, mask=np.zeros_like(other))["relevance_rank"])


def test_sparseness_and_complexity_match_quantus(small_case):
    import quantus

    ctx = make_ctx(small_case)
    attr = np.random.default_rng(2).standard_t(df=2, size=small_case["x"].shape)
    kwargs = dict(model=None, x_batch=small_case["x"][None].numpy(), y_batch=np.array([0]), channel_first=True)
    ref_gini = quantus.Sparseness(abs=True, normalise=False, disable_warnings=True)(a_batch=attr[None].copy(), **kwargs)
    ref_h = quantus.Complexity(abs=True, normalise=False, disable_warnings=True)(a_batch=attr[None].copy(), **kwargs)
    # Quantus adds 1e-7 to every |a| (mean |a| ~ 1.5 here): a relative effect below 1e-6 on Gini.
    assert sparseness(attr, ctx)["sparseness"] == pytest.approx(ref_gini[0], rel=1e-6)
    # Quantus uses log(p + 1e-12): below 1e-8 relative with 4096 voxels of p ~ 2.4e-4.
    out = complexity(attr, ctx)
    assert out["complexity"] == pytest.approx(ref_h[0], rel=1e-8)
    assert out["complexity_rel"] == pytest.approx(ref_h[0] / np.log(attr.size), rel=1e-8)
    # Extremes: one voxel -> Gini (n-1)/n, entropy 0; a constant map -> Gini 0, entropy log n.
    one = np.zeros_like(attr)
    one[0, 3, 4, 5] = 1.0
    assert sparseness(one, ctx)["sparseness"] == pytest.approx(1 - 1 / one.size)
    assert complexity(one, ctx)["complexity"] == pytest.approx(0.0, abs=1e-15)
    assert sparseness(np.ones_like(attr), ctx)["sparseness"] == pytest.approx(0.0, abs=1e-12)


def test_spearman_and_ssim_match_scipy_and_skimage():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(3)
    a = np.round(rng.normal(size=(9, 10, 11)), 1)  # rounded: many ties
    b = a + rng.normal(scale=0.5, size=a.shape)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    np.testing.assert_allclose(average_ranks(ta).numpy(), scipy.stats.rankdata(a.ravel()))
    assert spearman(ta, tb) == pytest.approx(scipy.stats.spearmanr(a.ravel(), b.ravel())[0], rel=1e-12)
    rng_ab = float(max(a.max(), b.max()) - min(a.min(), b.min()))
    assert ssim(ta, tb) == pytest.approx(structural_similarity(a, b, data_range=rng_ab), rel=1e-10)


def test_randomisation_matches_quantus_mprt(small_case):
    import quantus

    score_net = small_case["net"]
    explain = lambda net: helpers.captum_explain_fn(helpers.RegionScore(net, small_case["mask"]).double(), "Saliency")
    ctx = make_ctx(small_case, seed=42)  # Quantus' default seed
    attr = explain(score_net)(small_case["x"])
    ours = parameter_randomisation(attr, ctx, score_net, explain, max_stages=None)
    names = [n for n, _ in randomisable_layers(score_net)]
    assert [s["layer"] for s in ours["stages"]] == names  # output side first, every parameterised layer

    class Logits(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return helpers.RegionScore(self.net, small_case["mask"]).double()(x.double())[:, None]

    def quantus_explain(model, inputs, targets, **kwargs):
        net = model.net if isinstance(model, Logits) else model
        x = torch.as_tensor(inputs, dtype=torch.float64)
        return np.stack([explain(net)(v).numpy() for v in x])

    metric = quantus.MPRT(layer_order="top_down", seed=42, disable_warnings=True)
    ref = metric(model=Logits(score_net).eval(), x_batch=small_case["x"][None].numpy(), y_batch=np.array([0]),
                 a_batch=None, channel_first=True, explain_func=quantus_explain, softmax=False, device="cpu")
    ref_by_layer = {k.replace("net.", "", 1): v[0] for k, v in ref.items() if k != "original"}
    for stage in ours["stages"]:
        # Same layers, same draws (seed + 1 before each reset), same |a| / max |a| Spearman.
        assert stage["spearman"] == pytest.approx(ref_by_layer[stage["layer"]], abs=1e-9), stage["layer"]
    # Leaving out parameter-free modules (non-affine InstanceNorm) skips only stages that change nothing.
    assert set(ref_by_layer) >= set(names)
    assert torch.equal(torch.as_tensor(attr), explain(score_net)(small_case["x"]))  # original untouched


def test_randomisation_of_a_map_that_goes_flat_says_why(small_case):
    """A map whose randomised counterpart is constant (a rectified CAM that is zero there) has no
    rank correlation: pass is None and randomisation_note names the constant map."""
    score_net = small_case["net"]
    ctx = make_ctx(small_case, seed=42)
    attr = helpers.captum_explain_fn(helpers.RegionScore(score_net, small_case["mask"]).double(), "Saliency")(
        small_case["x"])
    out = parameter_randomisation(attr, ctx, score_net, lambda net: (lambda x: torch.zeros_like(x)), max_stages=1)
    assert out["randomisation_pass"] is None and np.isnan(out["randomisation_spearman_signed"])
    assert out["randomisation_note"].startswith("the fully randomised network's map is constant over the volume")
