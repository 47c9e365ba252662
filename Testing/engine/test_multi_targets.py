"""Several targets in one pass: the K maps of one batched run equal K single-target runs (float
tolerance) on a MONAI UNet over several windows, for every batched method, with the vmap and the
loop backward; methods that cannot batch fall back to one target at a time and say so."""
import numpy as np
import pytest
import torch

from conftest import make_unet_instancenorm_prelu
from engine_helpers import tube_volume
from EsegetaLib.api import explain
from EsegetaLib.engine import ExplainSession
from EsegetaLib.errors import EsegetaError
from EsegetaLib.multitarget import MultiTargetScore, TargetRows
from EsegetaLib.options import EngineOptions, Target
from EsegetaLib.targets import TargetScore

IMAGE, TUBES = tube_volume((16, 16, 16), seed=3)
CASES = [("Saliency", None), ("InputXGradient", None), ("IntegratedGradients", {"n_steps": 6, "adaptive": False}),
         ("GuidedBackprop", None), ("SmoothGrad", {"nt_samples": 2})]


def _masks():
    halves = np.zeros((3,) + TUBES.shape, bool)
    halves[0, :8], halves[1, 8:], halves[2, :, :8] = True, True, True
    return [TUBES & h for h in halves] + [np.ones(TUBES.shape, bool)]


@pytest.fixture(scope="module")
def net():
    return make_unet_instancenorm_prelu().double()


@pytest.fixture(scope="module")
def singles(net):
    """One single-target session per mask (the reference runs)."""
    return [ExplainSession(IMAGE, net, Target(class_index=1, region="roi", mask=m), EngineOptions(patch_size=12, divisor=4))
            for m in _masks()]


@pytest.mark.parametrize("vjp,cases", [("loop", CASES), ("vmap", CASES[2:4])])
def test_batched_maps_equal_single_target_runs(net, singles, vjp, cases):
    options = EngineOptions(patch_size=12, divisor=4, target_batch=3, extra={"target_vjp": vjp})
    session = ExplainSession(IMAGE, net, Target(class_index=1, region="rois", masks=_masks()), options)
    assert session.target_names == ["roi_1", "roi_2", "roi_3", "roi_4"] and len(session.windows) == 8
    for method, params in cases:
        batched = session.attribute_targets(method, params)
        for k, (name, result) in enumerate(batched.items()):
            single = singles[k].attribute(method, params)
            assert np.allclose(result.attribution, single.attribution, rtol=1e-9, atol=1e-12), (method, name)
            assert np.abs(result.attribution).sum() > 0
            assert result.diagnostics["multi_target"].startswith("batched")
            if method != "SmoothGrad":
                assert result.diagnostics["target_vjp"] == vjp
            if method == "IntegratedGradients":  # completeness per target, not mixed over targets
                for key in ("convergence_delta", "score_change", "relative_convergence_delta"):
                    assert result.diagnostics[key] == pytest.approx(single.diagnostics[key], rel=1e-6, abs=1e-9)


def test_several_classes_and_fallback_say_how_they_ran(net):
    options = EngineOptions(patch_size=12, divisor=4)
    # adaptive: it picks its own rows (16 steps may miss 1 %: kept with a warning, no baseline fallback rerun)
    ig = ("IntegratedGradients", {"n_steps": 4, "max_steps": 16, "allow_incomplete": True, "baseline_fallback": False})
    methods = ["Saliency", ig, "DeepLift"]
    expl = explain(IMAGE, net, methods, Target(classes=[0, 1], region="whole"), options)
    assert sorted(expl.results) == ["class_0/DeepLift", "class_0/IntegratedGradients", "class_0/Saliency",
                                    "class_1/DeepLift", "class_1/IntegratedGradients", "class_1/Saliency"]
    # both classes' rows share each network input (adaptive IG's points and Captum's rows alike)
    assert expl.results["class_0/IntegratedGradients"].diagnostics["rows_per_network_input"] > 1.5
    assert expl.results["class_0/Saliency"].diagnostics["rows_per_network_input"] == 2
    assert [t["name"] for t in expl.targets] == ["class_0", "class_1"]
    assert expl.results["class_1/DeepLift"].diagnostics["multi_target"].startswith("one target at a time")
    for c in (0, 1):
        single = explain(IMAGE, net, methods, Target(class_index=c, region="whole"), options)
        for m in ("Saliency", "IntegratedGradients", "DeepLift"):
            assert np.allclose(expl.results[f"class_{c}/{m}"].attribution, single.results[m].attribution,
                               rtol=1e-9, atol=1e-12)
    assert set(expl.by_target()) == {"class_0", "class_1"}
    # class names name the targets
    named = ExplainSession(IMAGE, net, Target(classes=[0, 1], class_names=["background", "vessel wall"]), options)
    assert named.target_names == ["background", "vessel_wall"]


def test_shared_forward_runs_the_network_once_per_window(net):
    """The forward sees each distinct window once; rows that are not copies are not shared."""
    calls = []
    net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    scorer = MultiTargetScore(TargetScore(net, Target(class_index=1), torch.device("cpu")))
    x = torch.from_numpy(IMAGE)[None, None].double()
    rows = torch.cat([x, x, x]).requires_grad_(True)
    w = torch.rand((3, 1, 16, 16, 16), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = scorer(rows, w, TargetRows([0, 0, 0], [1, 0, 1]))
    grads = torch.autograd.grad(out.sum(), rows)[0]
    assert calls == [1]
    for r, c in enumerate([1, 0, 1]):
        xr = x.clone().requires_grad_(True)
        ref = torch.autograd.grad((net(xr)[:, c] * w[r:r + 1, 0]).sum(), xr)[0]
        assert torch.allclose(grads[r], ref[0], rtol=1e-10, atol=1e-12)
    calls.clear()
    different = torch.cat([x, x + 1.0]).requires_grad_(True)  # same window id, different inputs
    torch.autograd.grad(scorer(different, w[:2], TargetRows([0, 0], [1, 1])).sum(), different)
    assert calls == [2]


def test_target_errors(net):
    options = EngineOptions(patch_size=12, divisor=4)
    with pytest.raises(EsegetaError, match="out of range"):
        ExplainSession(IMAGE, net, Target(classes=[1, 5], region="whole"), options)
    session = ExplainSession(IMAGE, net, Target(classes=[0, 1], region="whole"), options)
    with pytest.raises(EsegetaError, match="No target named"):
        session.select_target("aorta")


@pytest.mark.parametrize("score, activation", [("probability", "softmax"), ("probability", "sigmoid")])
def test_probability_scores_batch_exactly(net, score, activation):
    options = EngineOptions(patch_size=12, divisor=4)
    common = dict(region="whole", score=score, activation=activation)
    batched = ExplainSession(IMAGE, net, Target(classes=[0, 1], **common), options).attribute_targets("InputXGradient")
    for c in (0, 1):
        single = ExplainSession(IMAGE, net, Target(class_index=c, **common), options).attribute("InputXGradient")
        assert np.allclose(batched[f"class_{c}"].attribution, single.attribution, rtol=1e-9, atol=1e-12)
