"""A patched run explains the blended sliding-window model exactly (DESIGN.md, "What a patched run
explains"): per-window Saliency / IG summed equal the method on the one-graph blended model; occlusion
reruns only the windows a block touches; one window equals a direct Captum call."""
import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients, Occlusion, Saliency

from conftest import make_unet_instancenorm_prelu
from engine_helpers import IG, OCCLUSION, SALIENCY, OneGraphF
from EsegetaLib.engine import ExplainSession
from EsegetaLib.options import EngineOptions, Target


def _max_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture(scope="module")
def net64():
    return make_unet_instancenorm_prelu().double()


@pytest.fixture(scope="module")
def volume24():
    return np.random.default_rng(0).standard_normal((24, 24, 24))


@pytest.fixture(scope="module")
def patched(net64, volume24):
    """24^3 in 16^3 windows at overlap 0.25: 8 overlapping windows."""
    return ExplainSession(volume24, net64, Target(class_index=1, region="predicted"),
                          EngineOptions(patch_size=16, divisor=4))


def test_window_grid_overlaps(patched):
    assert len(patched.windows) == 8
    assert patched.grid.padded_shape == (24, 24, 24)
    weights = torch.zeros(24, 24, 24, dtype=torch.float64)
    for w in patched.windows:
        weights[w] += patched.grid.weight(w)
    assert torch.allclose(weights, torch.ones_like(weights), atol=1e-12)


def test_patched_saliency_and_ig_equal_one_graph_model(patched, net64, volume24):
    x = torch.from_numpy(volume24)[None, None]
    reference = OneGraphF(net64, 1, patched.region, (16, 16, 16))
    with torch.no_grad():
        assert abs(float(reference(x)) - float(patched.score(x))) < 1e-9 * abs(float(reference(x)))

    sal = patched.attribute(SALIENCY)
    ref_sal = Saliency(reference).attribute(x, abs=False)[0].numpy()
    err = _max_err(sal.attribution, ref_sal)
    print(f"\npatched Saliency vs one-graph: max abs error {err:.2e} (max |map| {np.abs(ref_sal).max():.3g})")
    assert err <= 1e-10 * np.abs(ref_sal).max()
    assert sal.diagnostics["n_windows_in_region"] == 8

    ig = patched.attribute(IG, {"n_steps": 8})
    baseline = torch.full_like(x, patched.stats.low)
    ref_ig, ref_delta = IntegratedGradients(reference).attribute(
        x, baselines=baseline, n_steps=8, return_convergence_delta=True)
    err = _max_err(ig.attribution, ref_ig[0].numpy())
    print(f"patched IG vs one-graph: max abs error {err:.2e} (max |map| {float(ref_ig.abs().max()):.3g})")
    assert err <= 1e-10 * float(ref_ig.abs().max())
    # The per-window deltas add up to the delta of F.
    assert ig.diagnostics["convergence_delta"] == pytest.approx(float(ref_delta), rel=1e-8, abs=1e-9)


def test_occlusion_reruns_only_touched_windows(net64, volume24):
    x = torch.from_numpy(volume24)[None, None]
    point = (4, 4, 4)
    for target in (Target(class_index=1, region="whole"), Target(class_index=1, region="point", point=point)):
        session = ExplainSession(volume24, net64, target, EngineOptions(patch_size=16, divisor=4))
        result = session.attribute(OCCLUSION, {"block": 8})
        # Independent count: the 27 blocks of 8^3 against the windows holding part of the region.
        active = [w for w in session.windows if session.region[w].any()]
        expected = 0
        for bi in range(0, 24, 8):
            for bj in range(0, 24, 8):
                for bk in range(0, 24, 8):
                    block = ((bi, bi + 8), (bj, bj + 8), (bk, bk + 8))
                    expected += sum(all(s.start < hi and lo < s.stop for s, (lo, hi) in zip(w, block))
                                    for w in active)
        print(f"\n{target.region}: {len(active)} windows in region, {result.diagnostics['windows_rerun']} "
              f"window reruns for 27 blocks (whole-volume reruns would be {27 * len(active)})")
        assert result.diagnostics["windows_rerun"] == expected
        assert expected < 27 * len(active)
        if target.region == "point":
            continue
        reference = OneGraphF(net64, 1, session.region, (16, 16, 16))
        ref = Occlusion(reference).attribute(x, sliding_window_shapes=(1, 8, 8, 8), strides=(1, 8, 8, 8),
                                             baselines=float(session.stats.low), perturbations_per_eval=9)[0].numpy()
        assert np.abs(ref).max() > 0
        assert _max_err(result.attribution, ref) <= 1e-9 * np.abs(ref).max()
    assert len(active) == 1  # the point target lives in one window only


class _Wrapped(torch.nn.Module):
    """The direct wrapping of a network for Captum: sum of class-c logits over a region."""

    def __init__(self, net, region, c=1):
        super().__init__()
        self.net, self.c = net, c
        self.register_buffer("region", torch.from_numpy(region.astype(np.float32)))

    def forward(self, x):
        return (self.net(x)[:, self.c] * self.region).flatten(1).sum(1)


def test_one_window_equals_direct_captum(unet_in_prelu):
    image = np.random.default_rng(1).standard_normal((24, 24, 24)).astype(np.float32)
    session = ExplainSession(image, unet_in_prelu, Target(class_index=1, region="predicted"),
                             EngineOptions(divisor=4))
    assert len(session.windows) == 1
    x = torch.from_numpy(image)[None, None]
    wrapped = _Wrapped(unet_in_prelu, session.region)
    direct = Saliency(wrapped).attribute(x, abs=False)[0].numpy()
    scale = np.abs(direct).max()
    assert _max_err(session.attribute(SALIENCY).attribution, direct) <= 1e-5 * scale
    baseline = torch.full_like(x, session.stats.low)
    direct = IntegratedGradients(wrapped).attribute(x, baselines=baseline, n_steps=8)[0].numpy()
    assert _max_err(session.attribute(IG, {"n_steps": 8}).attribution, direct) <= 1e-4 * np.abs(direct).max()
    direct = Occlusion(wrapped).attribute(x, sliding_window_shapes=(1, 8, 8, 8), strides=(1, 8, 8, 8),
                                          baselines=float(session.stats.low))[0].numpy()
    assert _max_err(session.attribute(OCCLUSION, {"block": 8}).attribution, direct) <= 1e-4 * np.abs(direct).max()


@pytest.mark.parametrize("shape,patch,pad_mode", [((21, 19, 23), None, "edge"), ((21, 19, 23), None, "reflect"),
                                                   ((10, 12, 9), 16, "edge")])
def test_padding_is_folded_back_exactly(net64, shape, patch, pad_mode):
    """Odd sizes and volumes smaller than a patch: padded, explained, folded back to the exact map."""
    image = np.random.default_rng(2).standard_normal(shape)
    session = ExplainSession(image, net64, Target(class_index=1, region="whole"),
                             EngineOptions(patch_size=patch, divisor=4, extra={"pad_mode": pad_mode}))
    assert session.grid.needs_padding and len(session.windows) == 1
    padded = session.grid.padded_shape
    assert all(p % 4 == 0 for p in padded)
    x = torch.from_numpy(image)[None, None]
    reference = OneGraphF(net64, 1, session.region, padded, padded_shape=padded,
                          pad_mode="replicate" if pad_mode == "edge" else "reflect")
    sal = session.attribute(SALIENCY).attribution
    assert sal.shape == (1,) + shape
    ref = Saliency(reference).attribute(x, abs=False)[0].numpy()
    assert _max_err(sal, ref) <= 1e-10 * np.abs(ref).max()
    ig = session.attribute(IG, {"n_steps": 4}).attribution
    ref = IntegratedGradients(reference).attribute(x, baselines=torch.full_like(x, session.stats.low), n_steps=4)
    assert _max_err(ig, ref[0].numpy()) <= 1e-10 * float(ref.abs().max())


def test_mean_reduction_divides_by_region_size(patched, net64, volume24):
    summed = patched.attribute(SALIENCY).attribution
    mean = ExplainSession(volume24, net64, Target(class_index=1, region="predicted", reduction="mean"),
                          EngineOptions(patch_size=16, divisor=4))
    assert mean.region_voxels == patched.region_voxels > 0
    np.testing.assert_allclose(mean.attribute(SALIENCY).attribution * mean.region_voxels, summed,
                               rtol=1e-9, atol=1e-12 * np.abs(summed).max())
