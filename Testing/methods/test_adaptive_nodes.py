"""Adaptive IG spends its passes on gradient evaluations only (#18 item 1): 5-point Gauss-Lobatto
intervals share their end nodes, a halving reuses the ends and the midpoint, and the forward pass of
each gradient evaluation gives F at the interval ends; the only forwards of their own are F(b), F(x)
in full precision under autocast, and none when the engine hands them over (it scores them for the
per-window allowances). Counted on a real MONAI UNet, not timed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from EsegetaLib.engine import ExplainSession
from EsegetaLib.methods.adaptive import (LOBATTO_W, NEW_PER_SPLIT, adaptive_integrated_gradients,
                                         gauss_lobatto)
from EsegetaLib.options import EngineOptions, Target
from EsegetaLib.targets import TargetScore


def _unet():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm="instance", act="prelu").eval()


class Counting(torch.nn.Module):
    """The engine's score with every evaluated point recorded (with or without gradient)."""

    def __init__(self, score: TargetScore):
        super().__init__()
        self.score = score
        self.grad_points, self.plain_points = [], []
        self.amp_dtype = score.amp_dtype

    def full_precision(self):
        return self.score.full_precision()

    def forward(self, x, w):
        kept = self.grad_points if torch.is_grad_enabled() else self.plain_points
        kept.extend(tuple(np.round(row[:6].tolist(), 6)) + (round(float(row.sum()), 3),) for row in x.detach().flatten(1))
        return self.score(x, w)


def _case(amp_dtype=None, examples=2):
    rng = np.random.RandomState(0)
    x = torch.from_numpy(rng.rand(examples, 1, 16, 16, 16).astype(np.float32))
    x[:, :, 5:11, 5:11, :] += 1.5
    weights = torch.ones(examples, 1, 16, 16, 16)
    score = TargetScore(_unet(), Target(class_index=1, region="whole"), torch.device("cpu"), amp_dtype)
    baselines = torch.zeros_like(x) + torch.arange(examples, dtype=x.dtype).view(-1, 1, 1, 1, 1) * 0.1  # distinct points
    return Counting(score), x, baselines, weights


def test_lobatto_rule():
    nodes, weights = gauss_lobatto(0.25, 0.75)
    assert nodes[0] == 0.25 and nodes[2] == 0.5 and nodes[4] == 0.75
    assert weights.sum() == pytest.approx(0.5) and weights[0] == pytest.approx(LOBATTO_W[0] * 0.25)
    for degree in range(8):  # exact for polynomials up to degree 7
        exact = (0.75 ** (degree + 1) - 0.25 ** (degree + 1)) / (degree + 1)
        assert float((weights * nodes ** degree).sum()) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("tolerance", [0.01, 1e-5])
def test_every_gradient_evaluation_is_a_new_node_and_no_forward_of_its_own(tolerance):
    """fp32: no forward without gradient at all (F at the ends comes from the gradient passes); every
    point evaluated once; the count is 13 initial evaluations (at most `initial_steps` = 16: 3
    intervals) + 6 per halving, equal to `steps_total`."""
    forward, x, b, w = _case()
    attr, diag = adaptive_integrated_gradients(forward, x, b, (w,), tolerance=tolerance, initial_steps=16, max_steps=96)
    assert forward.plain_points == []
    assert len(forward.grad_points) == len(set(forward.grad_points)) == diag["steps_total"]
    assert (diag["steps_total"] - 2 * 13) % NEW_PER_SPLIT == 0
    if tolerance == 1e-5:
        assert diag["steps_total"] > 2 * 13  # the strict tolerance made it halve intervals
    # the map is complete against F computed here independently
    with torch.no_grad():
        change = float((forward.score(x, w) - forward.score(b, w)).double().sum())
    assert float(attr.double().sum()) - change == pytest.approx(diag["convergence_delta"], abs=1e-3 * abs(change))
    assert diag["score_change"] == pytest.approx(change, rel=1e-6)


def test_autocast_ends_in_full_precision_only_where_not_handed_over():
    """Under bf16 autocast: F(b), F(x) in fp32 (two forwards per example), nothing else without
    gradient; with `ends` given (the engine's case) not even those, and the reference is the fp32 F."""
    forward, x, b, w = _case(torch.bfloat16)
    _, diag = adaptive_integrated_gradients(forward, x, b, (w,), tolerance=0.01, max_steps=64)
    assert len(forward.plain_points) == 2 * x.shape[0]
    with torch.no_grad(), forward.score.full_precision():
        fx, fb = forward.score(x, w).double(), forward.score(b, w).double()
    assert diag["score_change"] == pytest.approx(float((fx - fb).sum()), rel=1e-5)  # batch order only

    forward.plain_points.clear()
    forward.grad_points.clear()
    ends = torch.stack([fb, fx], dim=1)
    _, handed = adaptive_integrated_gradients(forward, x, b, (w,), tolerance=0.01, max_steps=64, ends=ends)
    assert forward.plain_points == [] and len(forward.grad_points) == handed["steps_total"]
    assert handed["score_change"] == pytest.approx(float((fx - fb).sum()), rel=1e-12)


def test_engine_hands_over_full_precision_ends():
    """Through the engine under bf16: the only forwards without gradient in IG are the per-window
    F(x), F(b) of the allowances, in fp32, and the map's completeness is against the fp32 F."""
    rng = np.random.RandomState(1)
    volume = rng.rand(16, 16, 16).astype(np.float32)
    volume[5:11, 5:11, :] += 1.5
    session = ExplainSession(volume, _unet(), Target(class_index=1, region="whole"),
                             EngineOptions(device="cpu", divisor=4, precision="bf16"))
    seen = []
    hook = session.network.register_forward_pre_hook(
        lambda module, args: seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), args[0].shape[0])))
    try:
        result = session.attribute("IntegratedGradients")
    finally:
        hook.remove()
    plain = [s for s in seen if not s[0]]
    assert sum(n for _, _, n in plain) == 2 * len(session.active) and not any(amp for _, amp, _ in plain)
    grad = sum(n for g, _, n in seen if g)
    assert grad == pytest.approx(result.diagnostics["steps_used_mean"] * len(session.active))
    with session.full_precision():
        from EsegetaLib.methods import get_method

        spec = get_method("IntegratedGradients")
        base = spec.prepare(session.volume[None], session.stats, spec.resolve_params({}),
                            torch.Generator().manual_seed(0))["baselines"]
        change = float(session.score(session.volume[None]) - session.score(base))
    assert result.diagnostics["score_change"] == pytest.approx(change, rel=1e-6)


def test_batched_copies_equal_one_by_one_under_bf16():
    """Perturbed copies through `attribute_many` (each copy with its own fp32 path ends and
    allowances) give the maps of `attribute` one copy at a time, under bf16 autocast too."""
    rng = np.random.RandomState(2)
    volume = rng.rand(24, 24, 24).astype(np.float32)
    volume[6:14, 6:14, :] += 1.5
    session = ExplainSession(volume, _unet(), Target(class_index=1, region="predicted"),
                             EngineOptions(device="cpu", precision="bf16", patch_size=16, overlap=0.25, divisor=4,
                                           batch_size=4))
    assert len(session.active) > 1
    x = session.volume
    copies = x[None] + 0.05 * torch.randn((2,) + tuple(x.shape), generator=torch.Generator().manual_seed(1))
    many = session.attribute_many("IntegratedGradients", {"allow_incomplete": True}, copies).numpy()
    compared = 0
    for j in range(copies.shape[0]):
        one = session.attribute("IntegratedGradients", {"allow_incomplete": True}, inputs=copies[j].numpy())
        if one.diagnostics["precision"] != "bf16":
            continue  # rerun in fp32 by the precision guard: attribute_many keeps the run's precision
        scale = np.abs(one.attribution).max()
        np.testing.assert_allclose(many[j], one.attribution, rtol=1e-5, atol=1e-6 * scale)
        compared += 1
    assert compared >= 1
