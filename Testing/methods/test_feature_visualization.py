"""Feature visualisation in 3D (#17 item 3, methods/featurevis.py): the optimised volume raises the
chosen channel's activation by a clear factor over the starting noise, is byte-identical for the same
seed and different for another, keeps its intensities in the input's range, and runs through the
engine as a model-level result (no map of the input; a window-sized volume in `outputs`).  Networks:
a BatchNorm/ReLU net (channel objective) and MONAI's UNet (InstanceNorm/PReLU: neuron objective)."""
import numpy as np
import pytest
import torch

from conftest import make_net_batchnorm_relu, make_unet_instancenorm_prelu, vessel_tubes
from EsegetaLib.engine import ExplainSession
from EsegetaLib.errors import EsegetaError
from EsegetaLib.methods.featurevis import (FourierVolume, channel_sqrt_correlation, choose_objective,
                                           intensity_range, spectrum_scale, visualise)
from EsegetaLib.options import EngineOptions, Target

OPTIONS = EngineOptions(device="cpu", precision="fp32", patch_size=16, divisor=4)


def _zscored(shape=(16, 16, 16)):
    vol = torch.from_numpy(vessel_tubes(shape, [(shape[0] // 2, shape[1] // 2)], 2))[None].double()
    return ((vol - vol.mean()) / vol.std()).float()


def _run(net, layer, channel, seed, objective, steps=48, lr=0.05, tv=0.05):
    modules = dict(net.named_modules())
    return visualise(net, modules[layer], channel, (16, 16, 16), _zscored(), steps, lr, tv, 2,
                     torch.Generator().manual_seed(seed), objective=objective, layer_name=layer)


def test_channel_objective_raises_mean_activation_on_relu_net():
    net = make_net_batchnorm_relu()
    volume, diag = _run(net, "5", 3, seed=0, objective="channel")  # ReLU after the stride-2 conv
    print(f"\nBatchNorm/ReLU net, layer '5' channel 3: mean activation {diag['activation_start']:.4f} -> "
          f"{diag['activation_final']:.4f}, factor {diag['activation_factor']:.2f}")
    assert diag["activation_start"] > 0
    assert diag["activation_factor"] > 2.0
    # intensities within the input's 1st-99th percentile range (x = m + h tanh(u))
    centre, half = intensity_range(_zscored()[0:1].double())
    assert volume.shape == (1, 16, 16, 16)
    assert float(volume.min()) >= float(centre - half) - 1e-4 and float(volume.max()) <= float(centre + half) + 1e-4


def test_monai_unet_layer_neuron_objective_and_seeds():
    net = make_unet_instancenorm_prelu()
    layer = "model.1.submodule.2"  # the decoder block (ConvTranspose + InstanceNorm + PReLU)
    objective, why = choose_objective(net, "auto")
    assert objective == "neuron" and "InstanceNorm3d" in why
    a, diag = _run(net, layer, 1, seed=0, objective=objective)
    b, _ = _run(net, layer, 1, seed=0, objective=objective)
    c, _ = _run(net, layer, 1, seed=1, objective=objective)
    print(f"\nMONAI UNet '{layer}' channel 1 (centre unit): {diag['activation_start']:.4f} -> "
          f"{diag['activation_final']:.4f}, factor {diag['activation_factor']}, "
          f"gain {diag['activation_gain_sd']:.2f} sd of the channel's units on the starting noise")
    assert diag["activation_start"] > 0 and diag["activation_factor"] > 2.0
    assert diag["activation_gain_sd"] > 0.5  # in units of the spread the starting noise gives the channel
    assert a.tobytes() == b.tobytes()  # same seed: the same bytes
    assert a.tobytes() != c.tobytes() and float(np.abs(a - c).max()) > 1e-3


def test_channel_mean_after_instance_norm_is_fixed_so_auto_picks_the_neuron():
    # What 'auto' avoids: the channel mean after InstanceNorm + PReLU barely moves.
    net = make_unet_instancenorm_prelu()
    _, diag = _run(net, "model.1.submodule.2", 1, seed=0, objective="channel")
    print(f"\nchannel mean after InstanceNorm: {diag['activation_start']:.4f} -> {diag['activation_final']:.4f}")
    assert abs(diag["activation_gain"]) < 0.2


def test_fourier_parameterisation():
    scale = spectrum_scale((16, 12, 10))
    assert scale.shape == (16, 12, 6) and float((scale ** 2).mean()) == pytest.approx(1.0)
    assert float(scale[0, 0, 0]) == pytest.approx(float(scale.max()))  # the lowest frequency weighs most
    # one channel: R^(1/2) = [1] (intensity scaling only); two correlated channels: the symmetric root
    assert channel_sqrt_correlation(torch.randn(1, 4, 4, 4)).tolist() == [[1.0]]
    base = torch.randn(1, 8, 8, 8, dtype=torch.float64)
    two = torch.cat([base, 0.8 * base + 0.6 * torch.randn(1, 8, 8, 8, dtype=torch.float64)])
    root = channel_sqrt_correlation(two)
    corr = torch.corrcoef(two.reshape(2, -1))
    torch.testing.assert_close(root @ root, corr, atol=1e-10, rtol=0)
    # the starting volume is centred in the range with mild noise; zero spectrum -> exactly the centre
    param = FourierVolume((8, 8, 8), root, torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5]),
                          torch.Generator().manual_seed(0), torch.float64)
    with torch.no_grad():
        param.spectrum.zero_()
        x, _ = param()
    assert torch.equal(x[0, 0], torch.full((8, 8, 8), 1.0, dtype=torch.float64))


def test_engine_result_is_model_level_with_the_window_volume():
    net = make_unet_instancenorm_prelu()
    volume = vessel_tubes((24, 16, 16), [(12, 8)], 2)
    session = ExplainSession(volume, net, Target(class_index=1, region="whole"), OPTIONS, spacing=(0.5, 0.5, 0.8))
    result = session.attribute("FeatureVisualization", {"steps": 16, "layer": "model.1.submodule.2", "channel": 2})
    assert result.model_level and not result.attribution.any()
    fv = result.outputs["feature_volume"]
    assert fv.shape == (1, 16, 16, 16)  # the model's window, not the input's grid
    assert result.outputs["channel"] == 2 and result.outputs["layer"] == "model.1.submodule.2"
    checks = {c.name: c for c in result.checks}
    assert checks["input_level"].status == "not_run" and "not explain this input" in checks["input_level"].detail
    assert checks["optimisation"].status in ("pass", "warn")
    assert "model-level" in result.diagnostics["level"]
    assert result.diagnostics["decorrelation"] == "one input channel: intensity scaling only"
    again = session.attribute("FeatureVisualization", {"steps": 16, "layer": "model.1.submodule.2", "channel": 2})
    assert again.outputs["feature_volume"].tobytes() == fv.tobytes()  # the run's seed: the same bytes


def test_bad_channel_and_bad_layer_are_one_line():
    net = make_unet_instancenorm_prelu()
    session = ExplainSession(vessel_tubes((16, 16, 16), [(8, 8)], 2), net, Target(class_index=1, region="whole"),
                             OPTIONS)
    with pytest.raises(EsegetaError) as err:
        session.attribute("FeatureVisualization", {"steps": 2, "layer": "model.1.submodule.2", "channel": 99})
    assert "channel 99 is out of range" in str(err.value) and "8 channels (0-7)" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(EsegetaError) as err:
        session.attribute("TopActivatingWindows", {"layer": "model.9"})
    message = str(err.value)
    assert "no layer 'model.9'" in message and "Layers that suit:" in message and "\n" not in message


def test_target_objective_raises_the_class_score_over_its_region():
    # "a class logit in a region": the engine's own target score (the class's logit averaged over the
    # target region as it falls in a window centred on it), not a layer channel.  A point target:
    # over a large region the mean logit of an InstanceNorm network is nearly fixed (the same reason
    # as a channel's mean; measured 0.669 -> 0.696 over the predicted half of this window).
    net = make_unet_instancenorm_prelu()
    session = ExplainSession(vessel_tubes((16, 16, 16), [(8, 8)], 2), net,
                             Target(class_index=1, region="point", point=(8, 8, 8)), OPTIONS)
    result = session.attribute("FeatureVisualization", {"objective": "target", "steps": 32})
    d = result.diagnostics
    print(f"\ntarget objective (class 1 logit at a point): {d['activation_start']:.4f} -> "
          f"{d['activation_final']:.4f} (factor {d['activation_factor']:.2f})")
    assert d["objective"] == "target" and d["layer"] == "target" and d["channel"] == 1
    assert d["activation_start"] > 0 and d["activation_factor"] > 2.0
    assert result.outputs["layer"] == "target" and result.outputs["feature_volume"].shape == (1, 16, 16, 16)
    check = {c.name: c for c in result.checks}["optimisation"]
    assert check.status == "pass" and "class 1's score over the target region" in check.detail


def test_several_classes_run_once_when_layer_and_region_are_the_same():
    """FeatureVisualization explains no target: with the same layer and region for both classes it runs
    once and says so (the same bytes as a single-class run); the 'target' objective runs per class."""
    net = make_unet_instancenorm_prelu()
    volume = vessel_tubes((16, 16, 16), [(8, 8)], 2)
    params = {"steps": 8, "layer": "model.1.submodule.2", "channel": 2}
    session = ExplainSession(volume, net, Target(classes=[0, 1], region="whole"), OPTIONS)
    calls = []
    attribute = session.attribute
    session.attribute = lambda *a, **k: calls.append(k.get("target")) or attribute(*a, **k)
    out = session.attribute_targets("FeatureVisualization", params)
    assert list(out) == ["class_0", "class_1"] and calls == [0]
    second = out["class_1"]
    assert second.diagnostics["multi_target"].startswith("run once, for target class_0")
    assert second.diagnostics["target"] == "class_1"
    single = ExplainSession(volume, net, Target(class_index=1, region="whole"), OPTIONS).attribute(
        "FeatureVisualization", params)
    assert second.outputs["feature_volume"].tobytes() == single.outputs["feature_volume"].tobytes()
    calls.clear()
    per_class = session.attribute_targets("FeatureVisualization", dict(params, objective="target"))
    assert calls == [0, 1] and "run once" not in per_class["class_1"].diagnostics["multi_target"]
