"""Methods that hook layers or intercept activations are refused on TorchScript before any work."""
import numpy as np
import pytest
import torch

from conftest import make_unet_instancenorm_prelu
from EsegetaLib.api import explain
from EsegetaLib.cli import main
from EsegetaLib.errors import EsegetaError
from EsegetaLib.methods import all_methods


def _scripted():
    return torch.jit.trace(make_unet_instancenorm_prelu(), torch.randn(1, 1, 16, 16, 16))


def test_layer_methods_flagged_and_dispatcher_rules_not():
    eager = {s.name for s in all_methods() if s.requires_eager}
    assert {"GradCAM", "GradCAM++", "GuidedGradCam"} <= eager
    # guided backprop, deconvolution and DeepLift rewrite backward kernels at the dispatcher: any format
    assert not {"Saliency", "IntegratedGradients", "Occlusion", "GuidedBackprop", "Deconvolution",
                "DeepLift", "DeepLiftShap"} & eager


def test_explain_refuses_all_at_once_before_running():
    calls = []
    with pytest.raises(EsegetaError) as err:
        explain(np.random.rand(16, 16, 16).astype(np.float32), _scripted(),
                ["Saliency", "GradCAM", "GuidedBackprop", "GradCAM++"], progress=lambda f, m: calls.append(m))
    message = str(err.value)
    assert "GradCAM," in message and "GradCAM++" in message
    assert "Saliency" not in message and "GuidedBackprop" not in message
    assert "\n" not in message and calls == []  # nothing ran


def test_cli_exit_2_and_no_output(tmp_path, capsys):
    import nibabel as nib

    volume = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(16, 16, 16).astype(np.float32), np.eye(4)), volume)
    model = tmp_path / "m.pt"
    _scripted().save(str(model))
    out = tmp_path / "out"
    code = main(["explain", str(volume), "--model", str(model), "--methods", "Saliency,GradCAM",
                 "--out", str(out), "--quiet"])
    assert code == 2
    assert "TorchScript" in capsys.readouterr().err
    assert not out.exists()
