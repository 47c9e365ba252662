"""Progress counts every target (#15): the work a K-target run is planned with equals the window
passes the network actually runs, counted on the network's first convolution (forward rows and
backward rows, seen below autograd), for a batched method and a method that runs one target at a
time; the metrics stage is planned per target."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_unet_instancenorm_prelu
from engine_helpers import tube_volume
from EsegetaLib.engine import ExplainSession
from EsegetaLib.methods import get_method
from EsegetaLib.options import EngineOptions, Target
from EsegetaLib.work import (BACKWARD, BACKWARD_FORWARDS, FORWARD, group_units, method_work, single_target_work,
                             window_order)

IMAGE, TUBES = tube_volume((16, 16, 16), seed=3)


class PassCounter(TorchDispatchMode):
    """Rows through one convolution: forward (aten.convolution) and backward (convolution_backward)."""

    def __init__(self, conv):
        super().__init__()
        self.ptr = conv.weight.data_ptr()
        self.forward = self.backward = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default and args[1].data_ptr() == self.ptr:
            self.forward += int(args[0].shape[0])
        elif func is torch.ops.aten.convolution_backward.default and args[2].data_ptr() == self.ptr:
            self.backward += int(args[0].shape[0])
        return func(*args, **(kwargs or {}))


def _masks():
    """Four targets whose regions cover different windows (of 8: 2, 4, 4 and 8)."""
    parts = np.zeros((4,) + TUBES.shape, bool)
    parts[0, :3, :3], parts[1, 13:], parts[2, :, :, :3], parts[3] = True, True, True, True
    return list(parts)


@pytest.fixture(scope="module")
def net():
    return make_unet_instancenorm_prelu()


def _session(net, masks, **options):
    target = Target(class_index=1, region="rois" if len(masks) > 1 else "roi",
                    **({"masks": masks} if len(masks) > 1 else {"mask": masks[0]}))
    return ExplainSession(IMAGE, net, target, EngineOptions(patch_size=12, divisor=4, batch_size=3, **options))


def _first_conv(net):
    return next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d))


@pytest.mark.parametrize("target_batch", [8, 3])
def test_batched_method_work_counts_the_forwards_and_backwards_it_runs(net, target_batch):
    session = _session(net, _masks(), target_batch=target_batch)
    assert len(session.targets) == 4 and len(session.windows) == 8
    active = [len(a) for a in [_active(session, k) for k in range(4)]]
    assert len(set(active)) > 1  # the targets' regions cover different windows
    spec = get_method("Saliency")
    units, kind = method_work(spec, spec.resolve_params(None), session)
    counter = PassCounter(_first_conv(net))
    fractions, forwards_at_report = [], []

    def progress(fraction, message=""):
        fractions.append(fraction)
        forwards_at_report.append(counter.forward)

    session.progress = progress
    with counter:
        session.attribute_targets(spec, None)
    session.progress = None
    assert kind == BACKWARD
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    # the stage reports before its first forward: the plan's clock for the stage (started at its
    # first report) then counts all of its work, and the rate it extrapolates is not ~0
    assert forwards_at_report[0] == 0 and fractions[0] == 0.0
    if target_batch == 3:  # two passes (3 targets, then 1): each its share of the work
        sets = [frozenset(_active(session, k)) for k in range(4)]
        first = group_units(sets[:3], session.batch_size)
        share = first / (first + group_units(sets[3:], session.batch_size))
        assert 0 < share < 1 and any(f == pytest.approx(share) for f in fractions)
        assert max(f for f in fractions if f <= share + 1e-9) == pytest.approx(share)
    # a forward+backward unit is one forward and one backward row; a forward alone 1/3 of one
    assert units == pytest.approx(counter.forward / BACKWARD_FORWARDS
                                  + counter.backward * (1 - 1 / BACKWARD_FORWARDS))
    # every target's backward rows are counted (zero cotangent rows of a shared chunk included)
    assert counter.backward >= sum(active) and units > max(active)
    if target_batch == 8:  # one pass: windows ordered by their target count carry fewer zero rows
        sets = [frozenset(_active(session, k)) for k in range(4)]
        in_order = _backward_rows(window_order(sets), sets, session.batch_size)
        assert counter.backward == in_order < _backward_rows(sorted(frozenset().union(*sets)), sets,
                                                             session.batch_size)
    assert single_target_work(spec, spec.resolve_params(None), session)[0] == len(session.active)


def _backward_rows(windows, sets, batch):
    """Rows a pass backpropagates when it runs `windows` in this order, in chunks of `batch`."""
    chunks = [windows[c:c + batch] for c in range(0, len(windows), batch)]
    return sum(len(chunk) * max(sum(i in s for s in sets) for i in chunk) for chunk in chunks)


def _active(session, k):
    saved = session.current_target
    session.select_target(k)
    try:
        return list(session.active)
    finally:
        session.select_target(saved)


def test_one_target_at_a_time_counts_every_target(net):
    masks = _masks()
    session = _session(net, masks)
    spec = get_method("DeepLift")  # cannot batch targets: K single-target runs
    params = spec.resolve_params(None)
    units, kind = method_work(spec, params, session)
    singles = [method_work(spec, params, _session(net, [m]))[0] for m in masks]
    assert units == pytest.approx(sum(singles)) and kind == BACKWARD
    counter = PassCounter(_first_conv(net))
    fractions = []
    session.progress = lambda fraction, message="": fractions.append(fraction)
    with counter:
        results = session.attribute_targets(spec, params)
    session.progress = None
    # one pace over the targets: each target's share of the stage is its share of the work
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert max(f for f in fractions if f < 2 / 18 + 1e-9) == pytest.approx(2 / 18)  # target 1: 2 of 18 windows
    assert all(r.diagnostics["multi_target"].startswith("one target at a time") for r in results.values())
    single_rows = []
    for m in masks:  # K single-target runs pass the same rows through the network
        one = PassCounter(_first_conv(net))
        alone = _session(net, [m])
        with one:
            alone.attribute(spec, params)
        single_rows.append(one.backward)
    assert counter.backward == sum(single_rows) == sum(len(_active(session, k)) for k in range(len(masks)))
    occlusion = get_method("Occlusion")
    params = occlusion.resolve_params({"window_fraction": 0.5})
    units, kind = method_work(occlusion, params, session)
    singles = [method_work(occlusion, params, _session(net, [m]))[0] for m in masks]
    assert kind == FORWARD and units == pytest.approx(sum(singles)) and units > max(singles)


def test_metrics_are_planned_per_target(net):
    from EsegetaLib.runner import _plan_metrics
    from EsegetaLib.work import WorkPlan

    masks = _masks()
    requests = [(get_method("Saliency"), {}), (get_method("IntegratedGradients"), {"n_steps": 4})]
    prepared = SimpleNamespace(metrics=["deletion", "sensitivity"])

    def items(session):
        plan = WorkPlan(None, ["metrics"])
        _plan_metrics(plan, prepared, session, requests)
        return plan.weights["metrics"]

    several = items(_session(net, masks))
    singles = [items(_session(net, [m])) for m in masks]
    # target by target (the order the metrics run in), each target's items as its own run's
    assert several == pytest.approx([w for one in singles for w in one])
    assert len(several) == len(masks) * 2 * 2
