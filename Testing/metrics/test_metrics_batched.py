"""Metrics at the engine's speed: sensitivity's perturbed volumes go through the method's own window
batches (`ExplainSession.attribute_many`) and give the same numbers as one-by-one reruns for the
same draws; the patched score reruns only the windows a perturbation touched (counted); progress
is reported within each metric."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import metric_helpers as helpers
from metric_fixtures import trained_case  # noqa: F401  (fixture)
from EsegetaLib.engine import ExplainSession
from EsegetaLib.metrics import evaluate, evaluate_maps
from EsegetaLib.metrics.deletion import feature_ranks
from EsegetaLib.options import EngineOptions, Target
from EsegetaLib.results import MethodResult

METHODS = (("Saliency", None), ("IntegratedGradients", {"n_steps": 8}), ("GradCAM", None))


@pytest.fixture(scope="module")
def patched(trained_case):
    """24^3 tubes, 8 windows of 16^3 (overlap 0.25), batch 4: copies and windows share batches."""
    vol, _ = helpers.tube_volume(24, n_tubes=3, seed=11)
    options = EngineOptions(device="cpu", precision="fp32", patch_size=16, overlap=0.25, batch_size=4, divisor=4)
    session = ExplainSession(vol, trained_case["net"], Target(class_index=1, region="predicted"), options)
    results = {m: session.attribute(m, p) for m, p in METHODS}
    return session, results


def test_attribute_many_equals_attribute_one_by_one(patched):
    session, _ = patched
    assert len(session.windows) == 8 and len(session.active) > 1
    x = session.volume
    copies = x[None] + 0.05 * torch.randn((3,) + tuple(x.shape), generator=torch.Generator().manual_seed(1))
    for method, params in METHODS:
        many = session.attribute_many(method, params, copies).numpy()
        for j in range(copies.shape[0]):
            one = session.attribute(method, params, inputs=copies[j].numpy()).attribution
            scale = np.abs(one).max()
            assert scale > 0, method
            np.testing.assert_allclose(many[j], one, rtol=1e-4, atol=1e-5 * scale, err_msg=method)
        # a copy of the unperturbed input gives the method's own map
        np.testing.assert_allclose(session.attribute_many(method, params, x)[0].numpy(),
                                   session.attribute(method, params).attribution, rtol=1e-4,
                                   atol=1e-5 * np.abs(many).max())


def test_batched_sensitivity_equals_one_by_one(patched):
    session, results = patched
    params = {"sensitivity": {"n_samples": 4, "radius": 0.05}}
    messages = []
    batched = evaluate(session, results, metrics="sensitivity", params=params,
                       progress=lambda f, m: messages.append((f, m)))

    def one_by_one(name):
        result = results[name]
        return lambda xp: torch.from_numpy(session.attribute(name, result.params, inputs=xp.cpu()).attribution)

    reference = evaluate_maps(session.volume, {n: r.attribution for n, r in results.items()}, session.score,
                              metrics="sensitivity", params=params, stats=session.stats,
                              explain_fns={n: one_by_one(n) for n in results}, seed=session.options.seed,
                              region=session.region)
    for fast, slow in zip(batched.rows, reference.rows):
        assert fast["method"] == slow["method"]
        for key in ("sensitivity_max", "sensitivity_avg", "sensitivity_avg_se"):
            assert np.isfinite(slow[key]) and slow[key] > 0, (slow["method"], key)
            assert fast[key] == pytest.approx(slow[key], rel=1e-4), (fast["method"], key)
    # per-metric progress: samples inside sensitivity, monotone, ending at 1
    inside = [m for _, m in messages if "metric sensitivity of IntegratedGradients" in m and "sample" in m]
    assert inside and any("window" in m for m in inside)
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_perturbation_draws_are_shared_across_methods(patched):
    session, results = patched
    from EsegetaLib.metrics.context import MetricContext
    from EsegetaLib.metrics.sensitivity import perturbations, uniform_perturbation

    ctx = MetricContext(inputs=session.volume, score_fn=session.score, baseline=session.volume.clone(),
                        spread=1.0, seed=3)
    first = perturbations(ctx, 0, 4, 0.1, 4)
    again = perturbations(ctx, 1, 3, 0.1, 4)
    assert again.data_ptr() == first[1:3].data_ptr()  # the cached draws, not new ones
    torch.testing.assert_close(first[2], uniform_perturbation(ctx, 2, 0.1), rtol=0, atol=0)


def _windows_touched(session, volume: torch.Tensor) -> int:
    """Independent count: active windows in which `volume` differs from the session's input."""
    diff = (volume != session.volume).any(0).numpy()
    pad = [(0, p - s) for s, p in zip(diff.shape, session.grid.padded_shape)]
    diff = np.pad(diff, pad)  # edge padding of an unchanged volume leaves the padding unchanged
    return sum(bool(diff[session.windows[i]].any()) for i in session.active)


def test_only_touched_windows_rerun(patched):
    session, results = patched
    x = session.volume
    before = session.score_counters
    corner = x.clone()
    corner[:, :3, :3, :3] += 1.0
    whole = x + 0.5
    values = session.score(torch.stack([x, corner, whole]))
    after = session.score_counters
    expected = _windows_touched(session, corner) + _windows_touched(session, whole)
    assert _windows_touched(session, corner) < len(session.active) == _windows_touched(session, whole)
    assert after["windows_rerun"] - before["windows_rerun"] == expected
    assert after["volumes_evaluated"] - before["volumes_evaluated"] == 3
    # the patched values equal a full evaluation of each volume (every window computed afresh)
    for k, v in enumerate((x, corner, whole)):
        fresh = ExplainSession(v.numpy(), session.network, Target(class_index=1, region="roi", mask=session.region),
                               session.options)
        full = fresh.score(v[None])[0]
        assert fresh.score_counters["windows_rerun"] == 0
        assert float(values[k]) == pytest.approx(float(full), rel=1e-5)


def test_deletion_reruns_only_windows_its_steps_change(patched):
    session, results = patched
    # a map whose top-ranked cubes all lie in the first window's own corner, then ties in index order
    attribution = np.zeros(session.volume.shape, np.float32)
    attribution[:, :8, :8, :8] = 1.0
    steps = 27
    before = session.score_counters
    evaluate(session, {"corner": MethodResult(name="corner", attribution=attribution, params={}, seconds=0.0)},
             metrics="deletion", params={"deletion": {"n_steps": steps, "block": 4}})
    rerun = session.score_counters["windows_rerun"] - before["windows_rerun"]
    # expected: for every step, the windows in which the deleted cubes differ from the input
    from EsegetaLib.metrics.context import resolve_baseline

    baseline = resolve_baseline(session.volume, session.stats)
    ranks = feature_ranks(torch.from_numpy(attribution).sum(0), 4)
    n_features = int(ranks.max()) + 1
    counts = np.unique(np.round(np.linspace(0, n_features, steps + 1)).astype(np.int64))
    expected = 0
    for k in counts:
        volume = torch.where((ranks < int(k))[None], baseline, session.volume)
        expected += _windows_touched(session, volume)
    assert rerun == expected
    assert rerun < len(counts) * len(session.active)  # the early steps touch one corner only
