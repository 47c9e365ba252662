"""On a trained tube segmenter, the metrics must tell a real explanation from random noise of the
same shape, and the randomisation check must flag a model-independent map and pass IG."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import metric_helpers as helpers
from metric_fixtures import trained_case  # noqa: F401  (fixtures)
from EsegetaLib.engine import volume_stats
from EsegetaLib.metrics import evaluate_maps
from EsegetaLib.metrics.context import resolve_baseline
from EsegetaLib.metrics.randomisation import randomisable_layers


@pytest.fixture(scope="module")
def maps(trained_case):
    x = trained_case["x"]
    baseline = resolve_baseline(x, volume_stats(x.numpy(), (1, 1, 1)))  # the engine's blurred input
    out = {m: helpers.captum_explain_fn(trained_case["score"], m, baseline)(x)
           for m in ("Saliency", "InputXGradient", "IntegratedGradients")}
    out["random"] = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    return out


def test_real_explanations_rank_above_random(trained_case, maps):
    report = evaluate_maps(trained_case["x"], maps, helpers.score_fn_of(trained_case["score"]),
                           metrics="infidelity,deletion,insertion,relevance_mass,relevance_rank",
                           params={"infidelity": {"perturbation": "noise"}}, region=trained_case["region"], seed=0)
    rows = {r["method"]: r for r in report.rows}
    for r in report.rows:  # shown with -s / on failure
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items() if not k.endswith(("_s", "_mb"))})
    rnd = rows["random"]
    # Gaussian-noise infidelity favours maps that predict small score changes linearly: the gradient
    # best, IG less so, both clearly better than noise (which explains nothing: rel ~ 1).
    assert rows["Saliency"]["infidelity"] < 0.5 * rnd["infidelity"]
    assert rows["IntegratedGradients"]["infidelity"] < rnd["infidelity"]
    assert rnd["infidelity_rel"] > 0.9
    for m in ("InputXGradient", "IntegratedGradients"):
        assert rows[m]["deletion_auc"] < rnd["deletion_auc"] - 0.15  # the score collapses sooner
        assert rows[m]["insertion_auc"] > rnd["insertion_auc"] + 0.2
        assert rows[m]["relevance_mass"] > rnd["relevance_mass"] + 0.4
        assert rows[m]["relevance_rank"] > rnd["relevance_rank"] + 0.4
    # A random map puts about |region| / |volume| of its positive mass in the region.
    share = trained_case["region"].mean()
    assert rnd["relevance_mass"] == pytest.approx(share, abs=0.03)
    assert abs(rnd["deletion_auc"] - 0.5) < 0.35  # no better than deleting in random order
    # Block-removal infidelity (Yeh et al.'s square removal, the default) suits input-times-gradient maps.
    blocks = evaluate_maps(trained_case["x"], maps, helpers.score_fn_of(trained_case["score"]),
                           metrics="infidelity")
    rows_b = {r["method"]: r for r in blocks.rows}
    for m in ("InputXGradient", "IntegratedGradients"):
        assert rows_b[m]["infidelity"] + 3 * rows_b[m]["infidelity_se"] < rows_b["random"]["infidelity"]


def test_randomisation_flags_the_input_and_passes_integrated_gradients(trained_case):
    x = trained_case["x"]
    baseline = resolve_baseline(x, volume_stats(x.numpy(), (1, 1, 1)))
    region = trained_case["region"]

    def ig_on(net):
        return helpers.captum_explain_fn(helpers.RegionScore(net, region), "IntegratedGradients", baseline, n_steps=8)

    maps = {"IntegratedGradients": ig_on(trained_case["net"])(x), "input": x.clone()}
    report = evaluate_maps(x, maps, helpers.score_fn_of(trained_case["score"]), metrics="randomisation",
                           make_explain_fns={"IntegratedGradients": ig_on, "input": lambda net: (lambda v: v.clone())},
                           network=trained_case["net"], params={"randomisation": {"max_stages": 3}})
    rows = {r["method"]: r for r in report.rows}
    assert rows["input"]["randomisation_pass"] is False
    assert rows["input"]["randomisation_spearman_signed"] == pytest.approx(1.0)
    assert rows["IntegratedGradients"]["randomisation_pass"] is True
    assert abs(rows["IntegratedGradients"]["randomisation_spearman_signed"]) < 0.3
    stages = report.stages["IntegratedGradients"]
    layers = randomisable_layers(trained_case["net"])
    # Three evenly spaced stages, the last with every layer re-drawn (down to the first convolution).
    assert len(stages) == 3 and stages[-1]["stage"] == len(layers) and stages[-1]["layer"] == layers[-1][0]
    # Cascading: the map drifts further from the original as more layers are re-drawn.
    assert stages[0]["spearman_signed"] > stages[-1]["spearman_signed"]
    # The caller's network is untouched.
    with torch.no_grad():
        again = trained_case["net"](x[None]).argmax(1)[0].numpy().astype(bool)
    assert np.array_equal(again, region)
