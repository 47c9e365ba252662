"""The catalogue: every required method is registered with complete metadata; user mistakes in
names and parameters give one-line errors with suggestions."""
import pytest

from EsegetaLib.errors import EsegetaError
from EsegetaLib.methods import all_methods, get_method
from EsegetaLib.methods.base import FAMILIES, PATCHING

REQUIRED = [
    "Saliency", "InputXGradient", "IntegratedGradients", "GuidedBackprop", "Deconvolution", "DeepLift",
    "DeepLiftShap", "GradientShap", "SmoothGrad", "SmoothGradSquared", "VarGrad", "GuidedGradCam", "GradCAM",
    "GradCAM++", "LayerActivation", "LayerConductance", "InternalInfluence", "LayerGradientXActivation",
    "LayerDeepLift", "LayerIntegratedGradients", "LayerGradientShap", "Occlusion", "FeatureAblation",
    "ShapleyValueSampling", "Lime", "KernelShap", "RISE", "ScoreCAM", "ExcitationBackprop",
    "ContrastiveExcitationBackprop", "LRP", "FeatureVisualization", "TopActivatingWindows",
]


def test_every_required_method_is_registered_with_metadata():
    names = [m.name for m in all_methods()]
    assert sorted(names) == sorted(REQUIRED)
    for spec in all_methods():
        meta = spec.metadata()
        assert meta["family"] in FAMILIES and meta["patching"] in PATCHING
        assert spec.cost > 0
        assert spec.needs_layer == (spec.family == "layer")
        if spec.patching == "blended":
            assert spec.approximation, spec.name  # blended maps must say why they approximate
        if spec.needs_baseline:
            assert spec.prepare is not None and "baseline" in spec.defaults(), spec.name
        for p in spec.params:  # every default passes its own validation
            assert p.validate(p.default, spec.name) == p.default


def test_patching_modes_follow_the_maths():
    assert {m.name for m in all_methods() if m.patching == "additive"} == {
        "Saliency", "InputXGradient", "IntegratedGradients", "GuidedBackprop", "Deconvolution", "DeepLift",
        "DeepLiftShap", "GradientShap", "ExcitationBackprop", "ContrastiveExcitationBackprop", "LRP"}
    assert {m.name for m in all_methods() if m.patching == "noise_tunnel"} == {"SmoothGrad", "SmoothGradSquared", "VarGrad"}
    assert {m.name for m in all_methods() if m.patching == "global"} == {
        "Occlusion", "FeatureAblation", "ShapleyValueSampling", "Lime", "KernelShap", "RISE", "ScoreCAM",
        "FeatureVisualization", "TopActivatingWindows"}
    # model-level visualisations and activation maps say that they are no attribution of the target
    assert {m.name for m in all_methods() if m.level == "model"} == {"FeatureVisualization"}
    assert {m.name for m in all_methods() if not m.explains_target} == {"FeatureVisualization", "TopActivatingWindows"}


def test_unknown_method_suggests_closest():
    with pytest.raises(EsegetaError, match="Did you mean 'IntegratedGradients'") as err:
        get_method("IntegratedGradient")
    assert "\n" not in str(err.value)
    assert get_method("gradcam++").name == "GradCAM++"


@pytest.mark.parametrize("name, params, message", [
    ("IntegratedGradients", {"n_steps": 1}, "must be >= 2"),
    ("IntegratedGradients", {"n_steps": 2.5}, "must be of type int"),
    ("IntegratedGradients", {"baseline": "black"}, "must be one of blur"),
    ("SmoothGrad", {"stdev_fraction": -0.1}, "must be >= 0"),
    ("SmoothGrad", {"base_method": "GradCAM"}, "must be one of"),
    ("Occlusion", {"stride_fraction": 0.0}, "must be >= 0.1"),
    ("RISE", {"p_keep": 1.5}, "must be <= 0.99"),
    ("IntegratedGradients", {"nsteps": 8}, "Did you mean 'n_steps'"),
    ("Saliency", {"absolut": False}, "Did you mean 'absolute'"),
])
def test_bad_parameters_give_one_line_errors(name, params, message):
    with pytest.raises(EsegetaError, match=message) as err:
        get_method(name).resolve_params(params)
    assert "\n" not in str(err.value)
