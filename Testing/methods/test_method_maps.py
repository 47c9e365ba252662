"""Every registered method returns a finite, non-constant map of the input's shape, on 1- and
2-channel input, on the InstanceNorm+PReLU UNet and the BatchNorm+ReLU net (16^3, cheap params)."""
import pytest
import torch

from EsegetaLib.errors import EsegetaError
from EsegetaLib.methods import all_methods
from method_helpers import make_context, make_net_batchnorm_relu, make_unet_instancenorm_prelu, run_method, structured_volume

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CHEAP = {  # fewer steps/samples keep the suite fast; defaults are exercised elsewhere
    "IntegratedGradients": {"n_steps": 4}, "GradientShap": {"n_samples": 3, "n_baselines": 2},
    "DeepLiftShap": {"n_baselines": 2}, "SmoothGrad": {"nt_samples": 2}, "SmoothGradSquared": {"nt_samples": 2},
    "VarGrad": {"nt_samples": 2}, "LayerConductance": {"n_steps": 4}, "InternalInfluence": {"n_steps": 4},
    "LayerIntegratedGradients": {"n_steps": 4}, "LayerGradientShap": {"n_samples": 3, "n_baselines": 2},
    "Occlusion": {"window_fraction": 0.5}, "FeatureAblation": {"block_fraction": 0.5},
    "ShapleyValueSampling": {"n_samples": 1, "block_fraction": 0.5}, "Lime": {"n_samples": 24, "block_fraction": 0.5},
    "KernelShap": {"n_samples": 24, "block_fraction": 0.5}, "RISE": {"n_masks": 24},
}
RECTIFIED = {"GradCAM", "GradCAM++", "GuidedGradCam"}
EXCITATION = {"ExcitationBackprop", "ContrastiveExcitationBackprop"}
# Methods that run once on the whole volume against the session's patched score (patching "global"
# with a layer activation from the session): through the engine, not one window's context.
WHOLE_VOLUME = {"ScoreCAM", "TopActivatingWindows", "FeatureVisualization"}
WHOLE_VOLUME_PARAMS = {
    # unrectified: on a random network every channel weight may be negative (the rectified map is
    # then zero, which the method's channel_weights check flags; test_scorecam covers that case)
    "ScoreCAM": {"relu": False, "max_channels": 4},
    "FeatureVisualization": {"steps": 8},
}


def make_context_and_run(name, network, x, params=None):
    spec, ctx = make_context(name, network, x, CHEAP.get(name) if params is None else params)
    return run_method(spec, ctx)


def whole_volume_run(name, network, x, params=None):
    from EsegetaLib.engine import ExplainSession
    from EsegetaLib.options import EngineOptions, Target

    session = ExplainSession(x[0].numpy(), network, Target(region="whole"),
                             EngineOptions(device="cpu", precision="fp32", divisor=4))
    result = session.attribute(name, {**WHOLE_VOLUME_PARAMS.get(name, {}), **(params or {})})
    if result.model_level:  # no map of the input (all zeros): the visualised volume instead
        assert not result.attribution.any()
        volume = torch.from_numpy(result.outputs["feature_volume"])
        assert volume.shape == x.shape[1:]
        return volume[None], {k: v for k, v in result.diagnostics.items() if k != "activation_factor"}
    return torch.from_numpy(result.attribution)[None], result.diagnostics  # (1, C, *S) like x

NETWORKS = {"unet_in_prelu": make_unet_instancenorm_prelu, "bn_relu": make_net_batchnorm_relu}


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("net_name", list(NETWORKS))
@pytest.mark.parametrize("name", [m.name for m in all_methods()])
def test_method_gives_finite_nonconstant_map(name, net_name, channels):
    network = NETWORKS[net_name](in_channels=channels)
    x = structured_volume(16, channels)
    if name in EXCITATION and net_name == "unet_in_prelu":
        # Excitation backprop is defined for non-negative activations only: refused, naming the layers.
        with pytest.raises(EsegetaError, match="no rule for .*PReLU"):
            make_context_and_run(name, network, x)
        return
    if name in WHOLE_VOLUME:
        attr, diag = whole_volume_run(name, network, x)
    else:
        attr, diag = make_context_and_run(name, network, x)
    assert attr.shape == x.shape
    assert torch.isfinite(attr).all()
    if name in RECTIFIED and float(attr.std()) == 0:
        # A CAM of a random network may be rectified away entirely: then the unrectified map must
        # be non-positive everywhere (so zero is the right answer) and itself non-constant.
        raw, _ = make_context_and_run(name, network, x, {"relu": False})
        cam = raw if name != "GuidedGradCam" else None
        assert float(attr.abs().max()) == 0.0
        assert float(raw.std()) > 0
        if cam is not None:
            assert float(cam.max()) <= 0.0
        return
    assert float(attr.std()) > 0, f"{name} gave a constant map"
    for value in diag.values():
        assert value == value  # no NaN diagnostics
